"""The one error type for bad input: a single line naming file, key, expected and found."""

from __future__ import annotations

from pathlib import Path


class AdapterError(ValueError):
    """Bad input. The CLI prints ``str(error)`` on one line and exits with code 2."""

    def __init__(
        self,
        path: str | Path,
        key: str | None,
        expected: str,
        found: str | None = None,
    ):
        self.path, self.key, self.expected, self.found = str(path), key, expected, found
        parts = [self.path]
        if key:
            parts.append(key)
        message = f"expected {expected}" if found is not None else expected
        if found is not None:
            message += f", found {found}"
        parts.append(message)
        super().__init__(": ".join(parts))


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"

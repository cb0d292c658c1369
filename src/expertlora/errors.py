"""The one error type for bad input: a single line naming file, key, expected and found."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

# A file-supplied name or value longer than this is cut in the middle: the line stays readable.
_MAX_PART = 240
# Characters that break a line or a terminal: controls (ANSI escapes start with one), line and
# paragraph separators, and format characters (bidi overrides can reorder what is shown).
_UNSAFE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class AdapterError(ValueError):
    """Bad input. The CLI prints ``str(error)`` on one line and exits with code 2.

    Every part is printable whatever a file holds: control characters are escaped
    (``\\n``, ``\\x1b``, ``\\u202e``) and very long file-supplied text is shortened.
    """

    def __init__(
        self,
        path: str | Path,
        key: str | None,
        expected: str,
        found: str | None = None,
    ):
        self.path, self.key, self.expected, self.found = str(path), key, expected, found
        parts = [printable(self.path, limit=None)]
        if key:
            parts.append(printable(key))
        message = f"expected {expected}" if found is not None else expected
        if found is not None:
            message += f", found {found}"
        parts.append(printable(message, limit=4 * _MAX_PART))
        super().__init__(": ".join(parts))


def printable(text: str, limit: int | None = _MAX_PART) -> str:
    """``text`` on one line: unsafe characters escaped, and cut in the middle beyond ``limit``."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = f"{text[: limit // 2]}...({len(text) - limit} characters)...{text[-(limit // 2):]}"
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour / style sequences (torch puts some in its messages)."""
    return _ANSI.sub("", text)


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a message, bounded: a 400-digit int or a long string stays short."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}" + (f" of {len(value)} items" if value else " (empty)")
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escape(c: str) -> str:
    if c == "\n":
        return "\\n"
    if c == "\r":
        return "\\r"
    if c == "\t":
        return "\\t"
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"

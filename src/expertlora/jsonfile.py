"""JSON files from users (adapter_config.json, config.json, index.json), read within bounds and
turned into typed values one field at a time.

``read_json_object`` reads at most ``max_bytes``, insists on UTF-8, refuses duplicate keys and
nesting beyond ``MAX_DEPTH``. ``Fields`` takes each value with its type and range checked, so
a config dataclass is built from values that are already right; every refusal is one
AdapterError naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import AdapterError, short_repr

MAX_DEPTH = 32
MAX_CONFIG_BYTES = 8 << 20  # adapter_config.json / config.json: a few KB in practice
MAX_INDEX_BYTES = 256 << 20  # model.safetensors.index.json: ~10 MB for the largest models


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


def parse_json(text: str | bytes, where: str | Path, key: str | None = None) -> Any:
    """Parse JSON text from a file (or a file's metadata entry ``key``) within the bounds above."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AdapterError(where, key, "UTF-8 text", f"byte 0x{e.object[e.start]:02x} at offset {e.start}") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise AdapterError(where, key, "valid JSON", f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise AdapterError(where, key, f"JSON nested at most {MAX_DEPTH} deep", "deeper nesting") from None
    except _Duplicate as e:
        raise AdapterError(where, key, "JSON objects with distinct keys", f"{short_repr(e.key)} twice") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise AdapterError(where, key, "valid JSON numbers", str(e).split(":")[0]) from None
    depth = _depth(value)
    if depth > MAX_DEPTH:
        raise AdapterError(where, key, f"JSON nested at most {MAX_DEPTH} deep", f"{depth} levels")
    return value


def read_json_object(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON file whose top level is an object, read within the bounds above."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise AdapterError(path, None, "a JSON file", e.strerror or "no such file") from None
    if len(data) > max_bytes:
        raise AdapterError(path, None, f"a JSON file of at most {max_bytes >> 20} MiB", f"{path.stat().st_size} bytes")
    value = parse_json(data, path)
    if not isinstance(value, dict):
        raise AdapterError(path, None, "a JSON object", f"a JSON {_json_type(value)}")
    return value


def _depth(value: Any) -> int:
    """Nesting depth, without recursion (the parser bounds it already; this makes MAX_DEPTH ours)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def describe(value: Any) -> str:
    """A JSON value for a message: its type, and its text when short."""
    kind = _json_type(value)
    if kind in ("object", "array", "null"):
        return short_repr(value) if kind != "null" else "null"
    return f"{kind} {short_repr(value)}"


_MISSING = object()


class Fields:
    """Typed access to one JSON object of a file: ``Fields(cfg, path).integer("r", hi=MAX_RANK)``.

    A missing key or a JSON null gives the default when one is given (PEFT and transformers
    treat null as "not set"), else an error. ``prefix`` names a nested object in messages.
    """

    def __init__(self, data: dict, path: str | Path, prefix: str = ""):
        self.data, self.path, self.prefix = data, path, prefix

    def error(self, key: str, expected: str, value: Any) -> AdapterError:
        return AdapterError(self.path, self.prefix + key, expected, describe(value))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _get(self, key: str, default: Any, expected: str) -> tuple[Any, bool]:
        """(the value, False), or (the default, True) for a missing key or a null."""
        value = self.data.get(key)
        if value is None:
            if default is _MISSING:
                raise AdapterError(self.path, self.prefix + key, expected, "missing" if key not in self.data else "null")
            return default, True
        return value, False

    def integer(self, key: str, default: Any = _MISSING, *, lo: int = 1, hi: int) -> int:
        expected = f"an integer from {lo} to {hi}"
        value, missing = self._get(key, default, expected)
        return value if missing else check_int(value, lo, hi, lambda: self.error(key, expected, value))

    def number(self, key: str, default: Any = _MISSING, *, hi: float) -> float:
        """A positive finite number up to ``hi`` (an alpha, a scaling)."""
        expected = number_text(hi)
        value, missing = self._get(key, default, expected)
        return value if missing else check_number(value, hi, lambda: self.error(key, expected, value))

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value, missing = self._get(key, default, "true or false")
        if not missing and not isinstance(value, bool):
            raise self.error(key, "true or false (a JSON boolean)", value)
        return value

    def string(self, key: str, default: Any = _MISSING, *, max_len: int = 4096) -> str:
        value, missing = self._get(key, default, "a string")
        if not missing and (not isinstance(value, str) or len(value) > max_len):
            raise self.error(key, f"a string of at most {max_len} characters", value)
        return value

    def strings(self, key: str, default: Any = _MISSING, *, max_len: int = 4096) -> tuple[str, ...]:
        value, missing = self._get(key, default, "a list of strings")
        if missing:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= max_len for v in value):
            raise self.error(key, "a list of strings", value)
        return tuple(value)

    def mapping(self, key: str, default: Any = _MISSING) -> dict:
        value, missing = self._get(key, default, "a JSON object")
        if not missing and not isinstance(value, dict):
            raise self.error(key, "a JSON object", value)
        return value


def check_int(value: Any, lo: int, hi: int, error) -> int:
    """``value`` if it is an int (not a bool) in [lo, hi], else ``raise error()``."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise error()
    return value


def number_text(hi: float) -> str:
    return f"a positive finite number up to {hi:g}"


def check_number(value: Any, hi: float, error) -> float:
    """``value`` as a float if it is an int or float (not a bool) in (0, hi], else ``raise error()``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error()
    if isinstance(value, int) and not 0 < value <= hi:  # before float(): 10**400 overflows
        raise error()
    value = float(value)
    if not 0 < value <= hi:  # NaN and inf fail too
        raise error()
    return value

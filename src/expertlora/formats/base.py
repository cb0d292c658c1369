"""What every format reader gives: the adapter's description, then its layers one at a time;
and the checks every reader shares (safetensors headers, shapes, numbers in keys, values)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import AdapterError, shape_str
from ..lora import AdapterInfo, ExpertLoRA, LayerLoRA, ModuleLoRA

# A tensor name longer than this is not a module path (and would make key regexes slow).
MAX_KEY = 1024


class AdapterReader(ABC):
    """A validated view of one adapter. Opening checks every shape; tensors load per layer."""

    info: AdapterInfo

    @abstractmethod
    def read_layer(self, layer: int) -> LayerLoRA:
        """The canonical stacked LoRA of one MoE layer (checked for NaN / Inf)."""

    def read_modules(self) -> dict[str, ModuleLoRA]:
        """Non-expert LoRA modules (attention, shared experts, dense MLP), PEFT-style A / B."""
        return {}

    def load(self) -> ExpertLoRA:
        """Read everything into memory."""
        layers = {L: self.read_layer(L) for L in sorted(self.info.layers)}
        return ExpertLoRA(self.info, layers, self.read_modules())


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open``, with a corrupt or truncated file (header or data) refused in one line."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise AdapterError(path, None, "a safetensors file", _first_line(e)) from None


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """A safetensors file's ``__metadata__`` and {key: (dtype, shape)}, without reading data.

    safetensors itself checks that the data offsets tile the file exactly, so the shapes
    here are backed by bytes actually present: a size taken from them is never a bluff.
    """
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        header = {}
        for key in f.keys():
            if len(key) > MAX_KEY:
                raise AdapterError(path, key, f"a tensor name of at most {MAX_KEY} characters", f"{len(key)} characters")
            if not key.isprintable() or " " in key:  # a module path: no spaces, controls or newlines
                raise AdapterError(path, key, "a tensor name of printable characters without spaces", "other characters")
            sl = f.get_slice(key)
            header[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return meta, header


def read_tensor(f, path: Path, key: str) -> torch.Tensor:
    """One tensor of an open file, checked for NaN / Inf."""
    try:
        t = f.get_tensor(key)
    except SafetensorError as e:
        raise AdapterError(path, key, "a readable tensor", _first_line(e)) from None
    return check_finite(path, key, t)


def parse_index(path: Path, key: str, text: str, what: str, bound: int) -> int:
    """A layer or expert number (``what``) from a tensor name, refused when it reaches ``bound``."""
    if len(text) > len(str(bound)) or int(text) >= bound:
        shown = text if len(text) <= 12 else f"a number of {len(text)} digits"
        raise AdapterError(path, key, f"{'an' if what[0] in 'aeiou' else 'a'} {what} id below {bound}", shown)
    return int(text)


def check_shape(path, key: str, found, expected, why: str | None = None) -> None:
    if tuple(found) != tuple(expected):
        reason = f" ({why})" if why else ""
        raise AdapterError(path, key, f"shape {shape_str(expected)}{reason}", shape_str(found))


def check_finite(path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterError(path, key, "finite values", f"{bad} NaN/Inf")
    return tensor


def check_dtypes(path: Path, dtypes: set[str]) -> torch.dtype:
    """The one float dtype of a file's tensors."""
    if len(dtypes) != 1 or not dtypes <= SAFETENSORS_DTYPES.keys():
        raise AdapterError(path, None, f"one float dtype of {sorted(SAFETENSORS_DTYPES)}", str(sorted(dtypes)))
    return SAFETENSORS_DTYPES[next(iter(dtypes))]


def duplicate(path: Path, key: str, other: str) -> AdapterError:
    """Two names for one tensor (prefix, ``.default``, ``original_moe.``, zero-padded numbers)."""
    return AdapterError(path, key, "one tensor per name (these two keys name the same tensor)", f"also {other}")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

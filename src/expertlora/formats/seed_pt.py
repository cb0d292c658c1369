"""The seed design's ``.pt`` layout: ``{"metadata": {...}, "layer_{L}": {"gate_lora_a": [E, r, H], ...}}``.

Read with ``torch.load(weights_only=True)`` only (never a full unpickle), memory-mapped.
It holds one rank and one alpha for the whole adapter, and all six tensors of every layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import AdapterError, shape_str, short_repr, strip_ansi
from ..jsonfile import check_int, check_number, number_text
from ..lora import MAX_ALPHA, MAX_RANK, PROJECTIONS, AdapterInfo, LayerLoRA, LoRASpec, ProjLoRA
from ..model_config import MAX_LAYERS
from .base import SAFETENSORS_DTYPES, AdapterReader, check_finite, check_shape, duplicate, parse_index

_NAMES = [f"{p}_lora_{ab}" for p in PROJECTIONS for ab in "ab"]
_LAYER_KEY = re.compile(r"^layer_(?P<layer>[0-9]+)\Z")
_FLOAT_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
_ZIP_MAGIC = b"PK\x03\x04"
# metadata entries that restate sizes: each must agree with the tensors when present
_SIZES = ("num_experts", "hidden_size", "intermediate_size", "num_layers")


class SeedPtReader(AdapterReader):
    def __init__(self, path: Path):
        self.path = path
        obj = _load(path)
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            raise AdapterError(path, "metadata", "the seed layout {'metadata': {...}, 'layer_L': {...}}", type(obj).__name__)
        meta = obj["metadata"]
        layers: dict[int, str] = {}  # layer -> its key in the file
        for key in obj:
            if key == "metadata":
                continue
            m = _LAYER_KEY.match(key) if isinstance(key, str) else None
            if not m:
                raise AdapterError(path, short_repr(key), "metadata or layer_L (the seed layout)", "another entry")
            L = parse_index(path, key, m["layer"], "layer", MAX_LAYERS)
            if L in layers:  # layer_01 beside layer_1
                raise duplicate(path, key, layers[L])
            layers[L] = key
        if not layers:
            raise AdapterError(path, "layer_L", "at least one layer", "none")
        r = check_int(meta.get("lora_rank"), 1, MAX_RANK, lambda: AdapterError(path, "metadata.lora_rank", f"an integer from 1 to {MAX_RANK}", short_repr(meta.get("lora_rank"))))
        alpha = check_number(meta.get("lora_alpha"), MAX_ALPHA, lambda: AdapterError(path, "metadata.lora_alpha", number_text(MAX_ALPHA), short_repr(meta.get("lora_alpha"))))
        spec = LoRASpec.of(r, alpha, False, path, "metadata.lora_alpha")

        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        for L, key in sorted(layers.items()):
            group = obj[key]
            if not isinstance(group, dict):
                raise AdapterError(path, key, f"a dict of {', '.join(_NAMES)}", type(group).__name__)
            for name in group:
                if name not in _NAMES:
                    raise AdapterError(path, f"{key}.{short_repr(name)}", f"one of {', '.join(_NAMES)}", "another entry")
            for name in _NAMES:
                if name not in group:
                    raise AdapterError(path, f"{key}.{name}", "present", "missing")
                _check_tensor(path, f"{key}.{name}", group[name])
            self.tensors[L] = group
        first_key = layers[min(layers)]
        first = self.tensors[min(layers)]
        E, _, H = _dims3(path, f"{first_key}.gate_lora_a", first["gate_lora_a"])
        I = _dims3(path, f"{first_key}.gate_lora_b", first["gate_lora_b"])[1]
        dtype = first["gate_lora_a"].dtype
        for L, group in self.tensors.items():
            for name in _NAMES:
                in_dim, out_dim = (I, H) if name.startswith("down") else (H, I)
                expected = (E, r, in_dim) if name.endswith("_a") else (E, out_dim, r)
                why = f"metadata.lora_rank = {r}" if group[name].dim() == 3 and group[name].shape[1 if name.endswith("_a") else 2] != r else None
                check_shape(path, f"{layers[L]}.{name}", group[name].shape, expected, why)
                if group[name].dtype != dtype:
                    raise AdapterError(path, f"{layers[L]}.{name}", f"{dtype} like {first_key}.gate_lora_a", str(group[name].dtype))
        for key, value in (("num_experts", E), ("hidden_size", H), ("intermediate_size", I), ("num_layers", len(layers))):
            if key in meta and not (isinstance(meta[key], int) and not isinstance(meta[key], bool) and meta[key] == value):
                raise AdapterError(path, f"metadata.{key}", f"{value} (as the tensors hold)", short_repr(meta[key]))
        self.keys = layers
        self.info = AdapterInfo(
            path=path,
            format="seed-pt",
            num_experts=E,
            hidden_size=H,
            intermediate_size=I,
            layers={L: {p: spec for p in PROJECTIONS} for L in self.tensors},
            modules={},
            dtype=dtype,
        )

    def read_layer(self, layer: int) -> LayerLoRA:
        t, spec = self.tensors[layer], self.info.layers[layer]["gate"]
        key = self.keys[layer]
        out = LayerLoRA(layer)
        for p in PROJECTIONS:
            a = check_finite(self.path, f"{key}.{p}_lora_a", t[f"{p}_lora_a"])
            b = check_finite(self.path, f"{key}.{p}_lora_b", t[f"{p}_lora_b"])
            setattr(out, p, ProjLoRA(a, b, spec))
        return out


def _load(path: Path):
    """``torch.load(weights_only=True)``, memory-mapped, with every refusal in one line."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _ZIP_MAGIC:
        raise AdapterError(path, None, "a torch.save file (a zip archive, torch's format since 1.6)", "not a zip archive")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except PermissionError:
        raise
    except Exception as e:  # a corrupt pickle or zip raises anything from IndexError to RuntimeError
        raise AdapterError(path, None, "a tensors-only torch file (weights_only=True)", _why(e)) from None


def _why(e: Exception) -> str:
    text = strip_ansi(str(e))
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"refusing a pickle that needs {m[1]}, which is not a tensor type"
    if m := re.search(r"WeightsUnpickler error: ([^\n]*)", text):
        return f"refusing a pickle: {m[1].strip()[:160]}"
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {line[:160]}" if line else type(e).__name__


def _check_tensor(path: Path, key: str, t) -> None:
    """A plain float tensor whose elements all lie in its own storage (no stride tricks that
    make a few bytes look like a huge tensor)."""
    if not isinstance(t, torch.Tensor):
        raise AdapterError(path, key, "a tensor", type(t).__name__)
    if t.layout != torch.strided or t.dtype not in _FLOAT_DTYPES:
        raise AdapterError(path, key, f"a dense float tensor ({', '.join(sorted(str(d) for d in _FLOAT_DTYPES))})", f"{t.layout} {t.dtype}")
    if not t.is_contiguous() or (t.storage_offset() + t.numel()) * t.element_size() > t.untyped_storage().nbytes():
        raise AdapterError(path, key, "a contiguous tensor backed by its storage", f"shape {shape_str(t.shape)} over {t.untyped_storage().nbytes()} bytes")


def _dims3(path: Path, key: str, t: torch.Tensor) -> tuple[int, int, int]:
    if t.dim() != 3 or min(t.shape) < 1:
        raise AdapterError(path, key, "a stacked 3-D tensor [E, r, in] / [E, out, r]", shape_str(t.shape))
    return tuple(t.shape)


def write_pt(info: AdapterInfo, layers: Iterable[LayerLoRA], out: Path, dtype: torch.dtype) -> None:
    """Write the seed layout (the whole adapter is held in memory: it is one pickle-free torch file)."""
    specs = {s for projs in info.layers.values() for s in projs.values()}
    if len(specs) != 1:
        raise AdapterError(info.path, None, "one rank and alpha for every layer and projection (the seed .pt layout holds one; use safetensors)", f"{len(specs)}")
    for L, projs in info.layers.items():
        if set(projs) != set(PROJECTIONS):
            raise AdapterError(info.path, f"layers.{L}", "gate, up and down (the seed .pt layout needs all three)", "/".join(projs))
    spec = specs.pop()
    obj = {
        "metadata": {
            "lora_rank": spec.rank,
            # the seed scales by alpha / r: keep the scaling exact for rsLoRA or rewritten alphas
            "lora_alpha": spec.scaling * spec.rank,
            "num_layers": len(info.layers),
            "num_experts": info.num_experts,
            "hidden_size": info.hidden_size,
            "intermediate_size": info.intermediate_size,
        }
    }
    for layer in layers:
        obj[f"layer_{layer.layer}"] = {
            f"{p}_lora_{ab}": getattr(lora, ab).to(dtype).contiguous() for p, lora in layer.projections().items() for ab in "ab"
        }
    torch.save(obj, out)

"""The seed design's ``.pt`` layout: ``{"metadata": {...}, "layer_{L}": {"gate_lora_a": [E, r, H], ...}}``.

Read with ``torch.load(weights_only=True)`` only (never a full unpickle), memory-mapped.
It holds one rank and one alpha for the whole adapter, and all six tensors of every layer.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import AdapterError
from ..lora import PROJECTIONS, AdapterInfo, LayerLoRA, LoRASpec, ProjLoRA
from .base import AdapterReader, check_finite, check_shape

_NAMES = [f"{p}_lora_{ab}" for p in PROJECTIONS for ab in "ab"]


class SeedPtReader(AdapterReader):
    def __init__(self, path: Path):
        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdapterError(path, None, "a tensors-only torch file (weights_only=True)", first[:200]) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            raise AdapterError(path, "metadata", "the seed layout {'metadata': {...}, 'layer_L': {...}}", type(obj).__name__)
        meta = obj["metadata"]
        layer_keys = sorted((k for k in obj if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
        if not layer_keys:
            raise AdapterError(path, "layer_L", "at least one layer", "none")
        for key in ("lora_rank", "lora_alpha"):
            if not isinstance(meta.get(key), (int, float)):
                raise AdapterError(path, f"metadata.{key}", "a number", repr(meta.get(key)))
        r, alpha = int(meta["lora_rank"]), float(meta["lora_alpha"])
        first = obj[layer_keys[0]]
        if not isinstance(first, dict) or "gate_lora_a" not in first or "gate_lora_b" not in first:
            raise AdapterError(path, f"{layer_keys[0]}.gate_lora_a", "present", "missing")
        for name in ("gate_lora_a", "gate_lora_b"):
            if not isinstance(first[name], torch.Tensor) or first[name].dim() != 3:
                raise AdapterError(path, f"{layer_keys[0]}.{name}", "a stacked 3-D tensor", repr(getattr(first[name], "shape", type(first[name]).__name__)))
        E, _, H = first["gate_lora_a"].shape
        I = first["gate_lora_b"].shape[1]
        for key, value in (("num_experts", E), ("hidden_size", H), ("intermediate_size", I)):
            if key in meta and meta[key] != value:
                raise AdapterError(path, f"metadata.{key}", str(value), str(meta[key]))
        spec = LoRASpec(r, alpha, alpha / r)
        self.layers = {}
        for key in layer_keys:
            L, tensors = int(key.split("_")[1]), obj[key]
            for name in _NAMES:
                if name not in tensors:
                    raise AdapterError(path, f"{key}.{name}", "present", "missing")
                in_dim, out_dim = (I, H) if name.startswith("down") else (H, I)
                expected = (E, r, in_dim) if name.endswith("_a") else (E, out_dim, r)
                check_shape(path, f"{key}.{name}", tensors[name].shape, expected)
            self.layers[L] = tensors
        self.info = AdapterInfo(
            path=path,
            format="seed-pt",
            num_experts=E,
            hidden_size=H,
            intermediate_size=I,
            layers={L: {p: spec for p in PROJECTIONS} for L in self.layers},
            modules={},
            dtype=first["gate_lora_a"].dtype,
        )

    def read_layer(self, layer: int) -> LayerLoRA:
        t, spec = self.layers[layer], self.info.layers[layer]["gate"]
        out = LayerLoRA(layer)
        for p in PROJECTIONS:
            a = check_finite(self.path, f"layer_{layer}.{p}_lora_a", t[f"{p}_lora_a"])
            b = check_finite(self.path, f"layer_{layer}.{p}_lora_b", t[f"{p}_lora_b"])
            setattr(out, p, ProjLoRA(a, b, spec))
        return out


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

"""The canonical stacked file (ours, ``expertlora/1``) and KTransformers' ``fused_expert_lora.safetensors``.

Both use the keys ``layers.{L}.experts.{gate,up,down}_lora_{a,b}`` with a [E, r, in], b [E, out, r].
Ours adds ``__metadata__`` (sizes, per-layer rank / alpha / scaling, source) and may name a PEFT
directory beside it holding the non-expert LoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterError, shape_str
from ..lora import PROJECTIONS, AdapterInfo, LayerLoRA, LoRASpec, ModuleLoRA, ProjLoRA
from ..peft_config import PeftLoraConfig
from .base import SAFETENSORS_DTYPES, AdapterReader, check_finite, check_shape

FORMAT_TAG = "expertlora/1"
KT_FILE_NAME = "fused_expert_lora.safetensors"
_KEY = re.compile(r"^layers\.(?P<layer>\d+)\.experts\.(?P<proj>gate|up|down)_lora_(?P<ab>[ab])$")


def tensor_key(layer: int, proj: str, ab: str) -> str:
    return f"layers.{layer}.experts.{proj}_lora_{ab}"


def is_stacked_key(key: str) -> bool:
    return _KEY.match(key) is not None


class StackedReader(AdapterReader):
    """Our canonical file, or KTransformers' (rank / alpha then come from adapter_config.json)."""

    def __init__(self, path: Path, lora_alpha: float | None = None):
        self.path = path
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        found: dict[int, dict[str, set[str]]] = {}
        for key in shapes:
            m = _KEY.match(key)
            if not m:
                raise AdapterError(path, key, "layers.L.experts.{gate,up,down}_lora_{a,b}", "another key")
            found.setdefault(int(m["layer"]), {}).setdefault(m["proj"], set()).add(m["ab"])
        if not found:
            raise AdapterError(path, None, "expert LoRA tensors", "an empty file")
        if len(dtypes) > 1 or not dtypes <= SAFETENSORS_DTYPES.keys():
            raise AdapterError(path, None, f"one float dtype of {sorted(SAFETENSORS_DTYPES)}", str(sorted(dtypes)))
        for L, projs in found.items():
            for proj, abs_ in projs.items():
                for ab in "ab":
                    if ab not in abs_:
                        raise AdapterError(path, tensor_key(L, proj, ab), "present (its partner is)", "missing")

        ours = meta.get("format") == FORMAT_TAG
        if ours:
            E, H, I = (_meta_int(path, meta, k) for k in ("num_experts", "hidden_size", "intermediate_size"))
            try:
                specs = {int(L): {p: LoRASpec.from_json(s) for p, s in projs.items()} for L, projs in json.loads(_meta(path, meta, "layers")).items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise AdapterError(path, "__metadata__.layers", 'JSON {"L": {"gate|up|down": {"rank", "alpha", "scaling"}}}', f"{type(e).__name__}: {e}"[:120]) from None
        else:
            # KTransformers' file: sizes from the shapes, rank / alpha from the PEFT config beside it.
            L0 = min(found)
            proj0 = next(p for p in PROJECTIONS if p in found[L0])
            a0, b0 = shapes[tensor_key(L0, proj0, "a")], shapes[tensor_key(L0, proj0, "b")]
            if len(a0) != 3 or len(b0) != 3:
                raise AdapterError(path, tensor_key(L0, proj0, "a"), "3-D stacked tensors [E, r, in] / [E, out, r]", f"{shape_str(a0)} / {shape_str(b0)}")
            E = a0[0]
            H, I = (b0[1], a0[2]) if proj0 == "down" else (a0[2], b0[1])
            config = _kt_config(path)
            specs = {}
            for L, projs in found.items():
                specs[L] = {}
                for proj in projs:
                    a_shape = shapes[tensor_key(L, proj, "a")]
                    if len(a_shape) != 3 or a_shape[1] <= 0:
                        raise AdapterError(path, tensor_key(L, proj, "a"), "a stacked [E, r, in] tensor with r > 0", shape_str(a_shape))
                    r = a_shape[1]
                    spec = config.spec(_kt_module_name(config, L, proj)) if config else None
                    if spec is None:
                        if lora_alpha is None:
                            raise AdapterError(path.parent / "adapter_config.json", None, "the adapter's config (lora_alpha) or --lora-alpha", "no such file")
                        spec = LoRASpec(r, lora_alpha, lora_alpha / r)
                    specs[L][proj] = spec
        if {L: set(p) for L, p in specs.items()} != {L: set(p) for L, p in found.items()}:
            raise AdapterError(path, "__metadata__.layers", f"the projections present {_layout(found)}", _layout(specs))
        for L, projs in specs.items():
            for proj, spec in projs.items():
                in_dim, out_dim = (I, H) if proj == "down" else (H, I)
                check_shape(path, tensor_key(L, proj, "a"), shapes[tensor_key(L, proj, "a")], (E, spec.rank, in_dim))
                check_shape(path, tensor_key(L, proj, "b"), shapes[tensor_key(L, proj, "b")], (E, out_dim, spec.rank))

        self.sidecar = None
        if ours and meta.get("non_expert_adapter"):
            self.sidecar = path.parent / meta["non_expert_adapter"]
        elif not ours and (path.parent / "adapter_model.safetensors").is_file() and (path.parent / "adapter_config.json").is_file():
            self.sidecar = path.parent  # KTransformers keeps the non-expert LoRA as a PEFT adapter beside
        if self.sidecar is not None:
            from .peft import WEIGHTS_NAME, _Scan

            weights = self.sidecar / WEIGHTS_NAME
            if not weights.is_file():
                raise AdapterError(weights, None, "the non-expert LoRA named by the adapter", "no such file")
            self.modules_scan = _Scan(weights)
            if self.modules_scan.per_expert or self.modules_scan.fused:
                raise AdapterError(weights, None, "only non-expert LoRA beside a stacked expert file", "expert LoRA too")
            self.modules_config = PeftLoraConfig.from_file(self.sidecar / "adapter_config.json")
            modules = self.modules_scan.read_modules(self.modules_config)
        else:
            modules = {}

        self.info = AdapterInfo(
            path=path,
            format="expertlora" if ours else "kt",
            num_experts=E,
            hidden_size=H,
            intermediate_size=I,
            layers=dict(sorted(specs.items())),
            modules=modules,
            dtype=SAFETENSORS_DTYPES[dtypes.pop()],
            use_rslora=meta.get("use_rslora") == "true",
            peft_version=meta.get("peft_version") or None,
            orientation=meta.get("orientation") or None,
            expert_naming=meta.get("expert_naming") or None,
            base_model=meta.get("base_model") or None,
        )

    def read_layer(self, layer: int) -> LayerLoRA:
        out = LayerLoRA(layer)
        with safe_open(self.path, framework="pt") as f:
            for proj, spec in self.info.layers[layer].items():
                a, b = (check_finite(self.path, k, f.get_tensor(k)) for k in (tensor_key(layer, proj, "a"), tensor_key(layer, proj, "b")))
                setattr(out, proj, ProjLoRA(a, b, spec))
        return out

    def read_modules(self) -> dict[str, ModuleLoRA]:
        if self.sidecar is None:
            return {}
        from .peft import _read_linear

        return _read_linear(self.modules_scan, self.info)


def _meta(path: Path, meta: dict, key: str) -> str:
    if key not in meta:
        raise AdapterError(path, f"__metadata__.{key}", "present", "missing")
    return meta[key]


def _meta_int(path: Path, meta: dict, key: str) -> int:
    value = _meta(path, meta, key)
    if not value.isdigit() or int(value) <= 0:
        raise AdapterError(path, f"__metadata__.{key}", "a positive integer", repr(value))
    return int(value)


def _layout(specs: dict) -> str:
    return "{" + ", ".join(f"{L}: {'/'.join(sorted(p))}" for L, p in sorted(specs.items())) + "}"


def _kt_module_name(config: PeftLoraConfig, layer: int, proj: str) -> str:
    """The name the config's rank / alpha patterns are written against, in the config's own style."""
    if config.target_parameters:
        return f"model.layers.{layer}.mlp.experts.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
    return f"model.layers.{layer}.mlp.experts.0.{proj}_proj"


def _kt_config(path: Path) -> PeftLoraConfig | None:
    cfg = path.parent / "adapter_config.json"
    return PeftLoraConfig.from_file(cfg) if cfg.is_file() else None


# ---- writing -------------------------------------------------------------------------------

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def metadata(info: AdapterInfo, non_expert_adapter: str | None = None) -> dict[str, str]:
    meta = {
        "format": FORMAT_TAG,
        "num_experts": str(info.num_experts),
        "hidden_size": str(info.hidden_size),
        "intermediate_size": str(info.intermediate_size),
        "layers": json.dumps({str(L): {p: s.to_json() for p, s in projs.items()} for L, projs in sorted(info.layers.items())}),
        "use_rslora": "true" if info.use_rslora else "false",
        "source_format": info.format,
    }
    optional = {
        "peft_version": info.peft_version,
        "orientation": info.orientation,
        "expert_naming": info.expert_naming,
        "base_model": info.base_model,
        "non_expert_adapter": non_expert_adapter,
    }
    meta.update({k: str(v) for k, v in optional.items() if v})
    return meta


def write_safetensors(
    info: AdapterInfo,
    layers: Iterable[LayerLoRA],
    out: Path,
    dtype: torch.dtype,
    meta: dict[str, str],
) -> None:
    """Write the canonical file one layer at a time, so memory stays near one layer.

    safetensors' own ``save_file`` needs every tensor in memory at once, so the header (whose
    shapes ``info`` already knows) is written first and each layer's bytes follow as they come.
    The result is a plain safetensors file; ``safe_open`` reads it.
    """
    entries, offset = {}, 0
    for L in sorted(info.layers):
        for proj in (p for p in PROJECTIONS if p in info.layers[L]):  # the order LayerLoRA.projections() yields
            for ab, shape in zip("ab", info.expert_shapes(L, proj)):
                size = math.prod(shape) * dtype.itemsize
                entries[tensor_key(L, proj, ab)] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
    header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        names = iter(entries)
        for layer in layers:
            for proj, lora in layer.projections().items():
                for ab, t in (("a", lora.a), ("b", lora.b)):
                    name = next(names)
                    assert name == tensor_key(layer.layer, proj, ab) and list(t.shape) == entries[name]["shape"], name
                    f.write(t.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
            del layer, lora, t  # free this layer before the next one is read
        f.flush()
        os.fsync(f.fileno())

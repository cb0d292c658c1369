"""Writing PEFT adapter directories: the non-expert sidecar of `convert`, and `export-peft`.

Two expert layouts:
- ``per-expert`` (transformers 4.x): ``model.layers.L.mlp.experts.E.{gate,up,down}_proj``
  (Mixtral ``block_sparse_moe.experts.E.{w1,w3,w2}``), A [r, in], B [out, r].
- ``fused`` (transformers 5.x, ``target_parameters``, peft >= 0.19.1): per layer
  ``experts.base_layer.lora_*`` for gate_up_proj and ``experts.lora_*`` for down_proj, A [E·r, in]
  expert-major, B [out, E·r] with column k·E + e. gate and up share one A there, so distinct
  gate / up LoRAs are stacked block-wise (rank r_gate + r_up), which is exact.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .formats.canonical import narrowed
from .lora import AdapterInfo, LayerLoRA, LoRASpec, ModuleLoRA
from .model_config import MoEConfig

LAYOUTS = ("per-expert", "fused")
_PROJ_NAMES = {
    "mlp": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "block_sparse_moe": {"gate": "w1", "up": "w3", "down": "w2"},
}
_FIRST_FUSED_PEFT = "0.19.1"  # the first peft release with the layout written here


def alpha_for(scaling: float, rank: int, use_rslora: bool) -> float:
    """The alpha that gives ``scaling`` at ``rank`` (inverse of lora_scaling)."""
    return scaling * (math.sqrt(rank) if use_rslora else rank)


def peft_config(
    specs: dict[str, LoRASpec],
    use_rslora: bool,
    target_modules: list[str] | str | None,
    target_parameters: list[str] | None = None,
    base_model: str | None = None,
    peft_version: str | None = None,
    pattern_keys: dict[str, str] | None = None,
) -> dict:
    """A LoRA adapter_config.json for these module (or parameter) specs.

    The most common rank and alpha become ``r`` / ``lora_alpha``; the others go to
    ``rank_pattern`` / ``alpha_pattern`` under ``pattern_keys[name]`` (default: the name).
    """
    ranks = Counter(s.rank for s in specs.values())
    alphas = Counter(alpha_for(s.scaling, s.rank, use_rslora) for s in specs.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rank_pattern, alpha_pattern = {}, {}
    for name, s in specs.items():
        key = (pattern_keys or {}).get(name, name)
        if s.rank != r:
            rank_pattern[key] = s.rank
        a = alpha_for(s.scaling, s.rank, use_rslora)
        if a != alpha:
            alpha_pattern[key] = a
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": target_modules,
        "target_parameters": target_parameters,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
        "peft_version": peft_version,
    }


def write_peft_dir(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """adapter_model.safetensors + adapter_config.json, the way PeftModel.save_pretrained lays them out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Each tensor its own storage: safetensors refuses views of one tensor (per-expert slices of a
    # stacked factor, gate and up sharing one A).
    save_file({k: _own_storage(v) for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0 else t.clone()


def module_tensors(modules: dict[str, ModuleLoRA], dtype: torch.dtype | None, path: str | Path = "adapter") -> dict[str, torch.Tensor]:
    """PEFT's keys and tensors for the non-expert modules, in ``dtype`` (None: as they are);
    a value that overflows ``dtype`` is refused, naming the tensor."""
    out = {}
    for name, m in modules.items():
        for ab, t in (("A", m.a), ("B", m.b)):
            key = f"base_model.model.{name}.lora_{ab}.weight"
            out[key] = narrowed(t, dtype or t.dtype, path, key)
    return out


def write_modules_dir(out_dir: Path, info: AdapterInfo, modules: dict[str, ModuleLoRA], dtype: torch.dtype | None) -> None:
    """The non-expert LoRA alone, as a standard PEFT adapter directory."""
    config = peft_config(info.modules, info.use_rslora, sorted(modules), base_model=info.base_model, peft_version=info.peft_version)
    write_peft_dir(out_dir, module_tensors(modules, dtype, info.path), config)


def export_peft(
    info: AdapterInfo,
    layers: Iterable[LayerLoRA],
    modules: dict[str, ModuleLoRA],
    out_dir: Path,
    layout: str,
    dtype: torch.dtype | None = None,
    base: MoEConfig | None = None,
) -> None:
    """Write a PEFT adapter directory that PEFT loads onto transformers 4.x (per-expert) or 5.x (fused)."""
    build: Callable = _per_expert if layout == "per-expert" else _fused
    tensors, specs, patterns = module_tensors(modules, dtype, info.path), dict(info.modules), {}
    targets: list[str] = []
    naming = info.expert_naming or (base.expert_naming if base else "mlp")
    for layer in layers:
        build(info, layer, naming, dtype, tensors, specs, patterns, targets)
    base_model = info.base_model or (str(base.path.parent) if base and base.path else None)
    if layout == "per-expert":
        # One full-match regex: the expert modules of each layer, then the non-expert modules by name.
        regex = "|".join(targets + [re.escape(m) for m in sorted(modules)])
        config = peft_config(specs, info.use_rslora, regex, base_model=base_model, peft_version=info.peft_version, pattern_keys=patterns)
    else:
        from importlib.metadata import PackageNotFoundError, version
        from packaging.version import Version

        try:
            installed = version("peft")
        except PackageNotFoundError:
            installed = _FIRST_FUSED_PEFT
        peft_version = max(installed, _FIRST_FUSED_PEFT, key=Version)
        config = peft_config(specs, info.use_rslora, sorted(modules) or None, targets, base_model, peft_version)
    write_peft_dir(out_dir, tensors, config)


def _per_expert(info, layer: LayerLoRA, naming, dtype, tensors, specs, patterns, targets) -> None:
    names = _PROJ_NAMES[naming]
    prefix = f"model.layers.{layer.layer}.{naming}.experts"
    for proj, lora in layer.projections().items():
        for e in range(info.num_experts):
            module = f"{prefix}.{e}.{names[proj]}"
            for ab, t in (("A", lora.a[e]), ("B", lora.b[e])):
                key = f"base_model.model.{module}.lora_{ab}.weight"
                tensors[key] = narrowed(t, dtype or t.dtype, info.path, key)
            specs[module] = lora.spec
            patterns[module] = rf"{re.escape(prefix)}\.\d+\.{names[proj]}"
    projs = "|".join(names[p] for p in layer.projections())
    targets.append(rf"{re.escape(prefix)}\.\d+\.(?:{projs})")


def _fused(info, layer: LayerLoRA, naming, dtype, tensors, specs, patterns, targets) -> None:
    E, I = info.num_experts, info.intermediate_size
    module = f"model.layers.{layer.layer}.mlp.experts"
    params = {}
    gate_up = [lora for lora in (layer.gate, layer.up) if lora is not None]
    if gate_up:
        params["gate_up_proj"] = _stack_gate_up(layer, E, I, info.use_rslora)
    if layer.down is not None:
        params["down_proj"] = (layer.down.a, layer.down.b, layer.down.spec)
    for i, (param, (a, b, spec)) in enumerate(params.items()):
        r = spec.rank
        nesting = "base_layer." * (len(params) - 1 - i)  # the first parameter is innermost
        key = f"base_model.model.{module}.{nesting}"
        a2, b2 = a.reshape(E * r, a.shape[2]), b.permute(1, 2, 0).reshape(b.shape[1], r * E)  # [E·r, in], [out, r·E]
        tensors[key + "lora_A.weight"] = narrowed(a2, dtype or a.dtype, info.path, key + "lora_A.weight")
        tensors[key + "lora_B.weight"] = narrowed(b2, dtype or b.dtype, info.path, key + "lora_B.weight")
        specs[f"{module}.{param}"] = spec
        targets.append(f"{module}.{param}")


def _stack_gate_up(layer: LayerLoRA, E: int, I: int, use_rslora: bool):
    gate, up = layer.gate, layer.up
    if gate is not None and up is not None and gate.spec == up.spec and torch.equal(gate.a, up.a):
        return gate.a, torch.cat([gate.b, up.b], dim=1), gate.spec  # already one shared A
    parts = [(rows, lora) for rows, lora in ((slice(0, I), gate), (slice(I, 2 * I), up)) if lora is not None]
    ref = parts[0][1].spec.scaling
    a = torch.cat([lora.a for _, lora in parts], dim=1)  # [E, r_gate + r_up, H]
    b = torch.zeros(E, 2 * I, a.shape[1], dtype=a.dtype)  # block-diagonal [E, 2I, r_gate + r_up]
    col = 0
    for rows, lora in parts:
        b[:, rows, col : col + lora.spec.rank] = lora.b * (lora.spec.scaling / ref)
        col += lora.spec.rank
    rank = a.shape[1]
    return a, b, LoRASpec(rank, alpha_for(ref, rank, use_rslora), ref)


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or directory into place."""
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    tmp.replace(final)

"""Checks of an adapter against the model it is for."""

from __future__ import annotations

import re

from .errors import AdapterError
from .lora import AdapterInfo
from .model_config import MoEConfig

_LAYER = re.compile(r"(?:^|\.)layers\.([0-9]+)\.")


def check_against_base(info: AdapterInfo, base: MoEConfig) -> None:
    """Expert count, sizes and MoE layers must agree with the base model's config.json."""
    where = base.path or "base config"
    for key, ours, theirs, unit in (
        ("num_experts", info.num_experts, base.num_experts, " experts"),
        ("hidden_size", info.hidden_size, base.hidden_size, ""),
        ("moe_intermediate_size", info.intermediate_size, base.intermediate_size, ""),
    ):
        if ours != theirs:  # "the adapter has 8 experts, the base 16"
            raise AdapterError(info.path, key, f"{theirs}{unit} as in {where}", f"{ours}{unit} in the adapter")
    for layer in info.layers:
        if layer not in base.moe_layers:
            kind = "a dense layer" if layer < base.num_layers else f"beyond the model's {base.num_layers} layers"
            raise AdapterError(info.path, f"layers.{layer}", f"a MoE layer of {where} (MoE layers: {_ranges(base.moe_layers)})", kind)
    for module in info.modules:
        m = _LAYER.search(module)
        if m and (len(m.group(1)) > 9 or int(m.group(1)) >= base.num_layers):
            raise AdapterError(info.path, module, f"a layer below {base.num_layers} as in {where}", f"layer {m.group(1)[:12]}")


def _ranges(layers: tuple[int, ...]) -> str:
    if not layers:
        return "none"
    out, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + (None,)):
        if cur != prev + 1 if cur is not None else True:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)

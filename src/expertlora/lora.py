"""The canonical in-memory adapter: per-layer stacked expert LoRA, plus non-expert modules.

Shape legend: E = num_experts, H = hidden size, I = expert intermediate size, r = rank.

    gate: a [E, r, H], b [E, I, r]
    up:   a [E, r, H], b [E, I, r]
    down: a [E, r, I], b [E, H, r]

For expert e the weight delta of a projection is ``scaling * b[e] @ a[e]`` ([out, in]), the
orientation of ``nn.Linear.weight``. Every reader turns its format into this, once, at load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROJECTIONS = ("gate", "up", "down")


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha and the scaling actually applied (the scaling is authoritative)."""

    rank: int
    alpha: float
    scaling: float

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "scaling": self.scaling}

    @classmethod
    def from_json(cls, d: dict) -> "LoRASpec":
        return cls(int(d["rank"]), float(d["alpha"]), float(d["scaling"]))


@dataclass
class ProjLoRA:
    """One projection of one MoE layer, stacked over experts."""

    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    spec: LoRASpec

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Per-expert weight deltas [E, out, in]: the reference, never used in the hot path."""
        return self.spec.scaling * torch.bmm(self.b.to(dtype), self.a.to(dtype))


@dataclass
class LayerLoRA:
    """The expert LoRA of one MoE layer; an untargeted projection is None."""

    layer: int
    gate: ProjLoRA | None = None
    up: ProjLoRA | None = None
    down: ProjLoRA | None = None

    def projections(self) -> dict[str, ProjLoRA]:
        return {p: getattr(self, p) for p in PROJECTIONS if getattr(self, p) is not None}


@dataclass
class ModuleLoRA:
    """LoRA of one non-expert linear module (attention, shared expert, dense MLP, router)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    spec: LoRASpec

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.spec.scaling * (self.b.to(dtype) @ self.a.to(dtype))


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter holds, known without reading its tensors."""

    path: Path
    format: str  # one of formats.FORMATS
    num_experts: int
    hidden_size: int
    intermediate_size: int
    layers: dict[int, dict[str, LoRASpec]]  # layer -> projection -> spec
    modules: dict[str, LoRASpec]  # non-expert module name -> spec
    dtype: torch.dtype
    use_rslora: bool = False
    peft_version: str | None = None
    orientation: str | None = None  # "new" / "old" for PEFT fused adapters
    expert_naming: str | None = None  # "mlp" or "block_sparse_moe" when the source says
    base_model: str | None = None

    def expert_shapes(self, layer: int, proj: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Canonical (a, b) shapes of one projection."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        r = self.layers[layer][proj].rank
        if proj == "down":
            return (E, r, I), (E, H, r)
        return (E, r, H), (E, I, r)

    def num_params(self) -> int:
        n = 0
        for layer, projs in self.layers.items():
            for proj in projs:
                a, b = self.expert_shapes(layer, proj)
                n += math.prod(a) + math.prod(b)
        return n


@dataclass
class ExpertLoRA:
    """A whole adapter in canonical form: expert layers and non-expert modules."""

    info: AdapterInfo
    layers: dict[int, LayerLoRA] = field(default_factory=dict)
    modules: dict[str, ModuleLoRA] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.info.num_experts

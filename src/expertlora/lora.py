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

from .errors import AdapterError
from .jsonfile import Fields
from .model_config import MAX_EXPERTS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS

PROJECTIONS = ("gate", "up", "down")


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# Bounds on what a file may claim: far above any real adapter, low enough that nothing sized
# or scaled by them (an allocation, a loop, a product in bf16) is absurd. An alpha is at most
# a scaling times a rank, so any spec can be written back as PEFT's (r, lora_alpha).
MAX_RANK = 1 << 16
MAX_SCALING = 1e4
MAX_ALPHA = MAX_SCALING * MAX_RANK


@dataclass(frozen=True)
class LoRASpec:
    """Rank, alpha and the scaling actually applied (the scaling is authoritative)."""

    rank: int
    alpha: float
    scaling: float

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"LoRA rank must be an integer from 1 to {MAX_RANK}, not {self.rank!r}")
        for name, bound in (("alpha", MAX_ALPHA), ("scaling", MAX_SCALING)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= bound:
                raise ValueError(f"LoRA {name} must be a positive finite number up to {bound:g}, not {value!r}")

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "scaling": self.scaling}

    @classmethod
    def from_json(cls, d: object, path: str | Path = "adapter", key: str = "spec") -> "LoRASpec":
        """``{"rank", "alpha", "scaling"}`` from a file, each checked (an AdapterError names ``key``)."""
        if not isinstance(d, dict):
            raise AdapterError(path, key, '{"rank", "alpha", "scaling"}', type(d).__name__)
        f = Fields(d, path, key + ".")
        return cls(
            f.integer("rank", hi=MAX_RANK),
            f.number("alpha", hi=MAX_ALPHA),
            f.number("scaling", hi=MAX_SCALING),
        )

    @classmethod
    def of(cls, rank: int, alpha: float, use_rslora: bool, path: str | Path, key: str | None) -> "LoRASpec":
        """The spec PEFT applies for ``rank`` and ``alpha`` (already checked), refused with an
        AdapterError naming ``key`` when the resulting scaling is out of bounds."""
        scaling = lora_scaling(rank, alpha, use_rslora)
        if not 0 < scaling <= MAX_SCALING:
            raise AdapterError(path, key, f"a scaling (alpha / {'sqrt(r)' if use_rslora else 'r'}) up to {MAX_SCALING:g}",
                               f"{alpha:g} / {'sqrt(%d)' % rank if use_rslora else rank} = {scaling:g}")
        return cls(rank, float(alpha), scaling)


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

    def __post_init__(self):
        for key, value, hi in (
            ("num_experts", self.num_experts, MAX_EXPERTS),
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            ("intermediate_size", self.intermediate_size, MAX_INTERMEDIATE),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise AdapterError(self.path, key, f"an integer from 1 to {hi} (from the adapter's shapes)", repr(value))
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < MAX_LAYERS:
                raise AdapterError(self.path, f"layers.{layer}", f"a layer id below {MAX_LAYERS}", repr(layer))

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

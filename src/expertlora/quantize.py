"""Expert weight storage: one projection of all experts in fp32, bf16, int8 or int4.

Shape legend: E = num_experts, N = output features, K = input features, G = K / group_size.

    fp32 / bf16: data [E, N, K]
    int8:        data [E, N, K] int8,       scale [E, N, 1] fp32   (symmetric, per output row)
    int4:        data [E, N, K/2] uint8,    scale [E, N, G] fp32   (symmetric, per group of K)

int4's group size is a property of each stack: by default the largest of 128 / 64 / 32 that
divides K, else K itself (one group per row), so gate_up (K = H) and down (K = I) of one layer
may differ.

int4 packs two values per byte, element 2j in the low nibble and 2j+1 in the high one, each
stored as q + 8 with q in [-8, 7]. Weights are quantized once, at load, one expert at a time
so that memory peaks near the final size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("fp32", "bf16", "int8", "int4")
# The seed's kt-kernel method names (SFT, and inference for --kt-method).
METHOD_ALIASES = {
    "AMXBF16_SFT": "bf16", "AMXINT8_SFT": "int8", "AMXINT4_SFT": "int4",
    "AMXBF16": "bf16", "AMXINT8": "int8", "AMXINT4": "int4",
}
INT4_GROUP_SIZES = (128, 64, 32)  # the choices, largest first; the compiled kernel runs each
DEFAULT_GROUP_SIZE = 128  # kept for callers that name one size; quantize's default is per K


def int4_group_size(in_features: int, forced: int | None = None) -> int:
    """The int4 group size for input size ``in_features``: ``forced`` (one of INT4_GROUP_SIZES,
    which must divide it), else the largest of INT4_GROUP_SIZES that divides it, else
    ``in_features`` (one group per row)."""
    if forced is not None:
        if isinstance(forced, bool) or not isinstance(forced, int) or forced not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {forced!r}: expected one of {', '.join(map(str, INT4_GROUP_SIZES))}")
        if in_features % forced:
            raise ValueError(f"int4 group size {forced}: it does not divide the input size {in_features}")
        return forced
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), in_features)


def resolve_method(name: str) -> str:
    """``bf16`` / ``AMXBF16_SFT`` -> ``bf16``; anything else is a ValueError naming the choices."""
    method = METHOD_ALIASES.get(name, name)
    if method not in METHODS:
        choices = ", ".join(METHODS + tuple(METHOD_ALIASES))
        raise ValueError(f"unknown method {name!r}: expected one of {choices}")
    return method


@dataclass(frozen=True)
class QuantizedStack:
    """One projection of every expert of a layer: W_e [N, K] for e < E, stored in ``method``."""

    method: str
    data: torch.Tensor
    scale: torch.Tensor  # empty for fp32 / bf16
    group_size: int = 0  # int4 only: input features per scale (divides K)

    def __post_init__(self):
        if self.method != "int4":
            return
        E, N, K = self.num_experts, self.out_features, self.in_features
        if self.group_size <= 0 or K % self.group_size:
            raise ValueError(f"int4 group size {self.group_size}: expected a divisor of the input size {K}")
        if tuple(self.scale.shape) != (E, N, K // self.group_size):
            raise ValueError(f"int4 scale: expected [{E}, {N}, {K // self.group_size}], found {list(self.scale.shape)}")

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    @property
    def out_features(self) -> int:
        return self.data.shape[1]

    @property
    def in_features(self) -> int:
        return self.data.shape[2] * (2 if self.method == "int4" else 1)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def dequantize(self, expert: int | slice = slice(None)) -> torch.Tensor:
        """Float32 weights of one expert [N, K] or of a slice of experts [e, N, K]."""
        data, scale = self.data[expert], self.scale[expert] if self.scale.numel() else None
        if self.method in ("fp32", "bf16"):
            return data.float()
        if self.method == "int8":
            return data.float() * scale
        q = torch.stack((data & 0x0F, data >> 4), dim=-1).flatten(-2).float() - 8  # [..., N, K]
        groups = q.unflatten(-1, (-1, self.group_size))  # [..., N, G, group]
        return (groups * scale.unsqueeze(-1)).flatten(-2)


def quantize(w: torch.Tensor, method: str, group_size: int | None = None) -> QuantizedStack:
    """Store stacked weights ``w`` [E, N, K] (any float dtype) in ``method``. ``group_size``
    (int4 only): one of INT4_GROUP_SIZES dividing K; None chooses by K (int4_group_size)."""
    method = resolve_method(method)
    E, N, K = w.shape
    empty = torch.empty(0)
    if method == "fp32":
        return QuantizedStack(method, w.to(torch.float32).contiguous(), empty)
    if method == "bf16":
        return QuantizedStack(method, w.to(torch.bfloat16).contiguous(), empty)
    if method == "int8":
        data = torch.empty(E, N, K, dtype=torch.int8)
        scale = torch.empty(E, N, 1)
        for e in range(E):
            data[e], scale[e] = _int8(w[e].float())
        return QuantizedStack(method, data, scale)
    if K % 2:
        raise ValueError(f"int4: input size {K} is odd; two values share each byte")
    group_size = int4_group_size(K, group_size)
    data = torch.empty(E, N, K // 2, dtype=torch.uint8)
    scale = torch.empty(E, N, K // group_size)
    for e in range(E):
        data[e], scale[e] = _int4(w[e].float(), group_size)
    return QuantizedStack(method, data, scale, group_size)


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127  # [N, 1]
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


def _int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = w.unflatten(1, (-1, group_size))  # [N, G, group]
    scale = groups.abs().amax(dim=2).clamp_min(1e-12) / 7  # [N, G]
    q = torch.round(groups / scale.unsqueeze(-1)).clamp_(-8, 7).flatten(1).to(torch.int16) + 8
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K/2]
    return packed.to(torch.uint8), scale

"""One MoE layer's routed experts, stored for the engine.

Shape legend: E = num_experts, H = hidden size, I = expert intermediate size.

    gate_up: [E, 2I, H]  rows [0, I) are gate, rows [I, 2I) are up (the transformers 5 layout)
    down:    [E, H, I]

With int4 each stack carries its own group size (gate_up's divides H, down's divides I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantize import QuantizedStack, quantize


@dataclass(frozen=True)
class ExpertWeights:
    """The base weights of one layer's routed experts in one storage method."""

    gate_up: QuantizedStack  # [E, 2I, H]
    down: QuantizedStack  # [E, H, I]

    def __post_init__(self):
        E, two_i, H = self.gate_up.num_experts, self.gate_up.out_features, self.gate_up.in_features
        if two_i % 2 or (self.down.num_experts, self.down.out_features, self.down.in_features) != (E, H, two_i // 2):
            raise ValueError(
                f"expert weights disagree: gate_up [{E}, {two_i}, {H}], "
                f"down [{self.down.num_experts}, {self.down.out_features}, {self.down.in_features}]"
            )
        if self.gate_up.method != self.down.method:
            raise ValueError(f"gate_up is {self.gate_up.method} but down is {self.down.method}")

    @classmethod
    def from_tensors(
        cls,
        gate: torch.Tensor,  # [E, I, H]
        up: torch.Tensor,  # [E, I, H]
        down: torch.Tensor,  # [E, H, I]
        method: str = "bf16",
        group_size: int | None = None,
    ) -> ExpertWeights:
        return cls.from_gate_up(torch.cat((gate, up), dim=1), down, method, group_size)

    @classmethod
    def from_gate_up(
        cls,
        gate_up: torch.Tensor,  # [E, 2I, H]
        down: torch.Tensor,  # [E, H, I]
        method: str = "bf16",
        group_size: int | None = None,
    ) -> ExpertWeights:
        """Quantize both stacks; int4's ``group_size`` (None: chosen per stack by its input size,
        see quantize.int4_group_size) must divide H and I when given."""
        return cls(quantize(gate_up, method, group_size), quantize(down, method, group_size))

    @property
    def method(self) -> str:
        return self.gate_up.method

    @property
    def group_sizes(self) -> tuple[int, int]:
        """int4's (gate_up, down) group sizes; (0, 0) for the other methods."""
        return self.gate_up.group_size, self.down.group_size

    @property
    def num_experts(self) -> int:
        return self.gate_up.num_experts

    @property
    def hidden_size(self) -> int:
        return self.gate_up.in_features

    @property
    def intermediate_size(self) -> int:
        return self.down.in_features

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def expert_nbytes(self) -> int:
        """Bytes read to run one expert once (its weights and scales)."""
        return self.nbytes // self.num_experts

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float32 (gate [E, I, H], up [E, I, H], down [E, H, I]) as the engine sees them."""
        gate_up = self.gate_up.dequantize()
        I = self.intermediate_size
        return gate_up[:, :I], gate_up[:, I:], self.down.dequantize()

"""What every format reader gives: the adapter's description, then its layers one at a time."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import AdapterError, shape_str
from ..lora import AdapterInfo, ExpertLoRA, LayerLoRA, ModuleLoRA


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


def check_shape(path, key: str, found, expected) -> None:
    if tuple(found) != tuple(expected):
        raise AdapterError(path, key, f"shape {shape_str(expected)}", shape_str(found))


def check_finite(path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterError(path, key, "finite values", f"{bad} NaN/Inf")
    return tensor


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

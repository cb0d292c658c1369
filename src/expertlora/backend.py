"""The protocol every MoE backend implements (the CPU engine, the hybrid, kt-kernel's): what the
model's experts call, and what the adapter manager calls to load and unload adapters."""

from __future__ import annotations

from typing import Protocol

import torch

from .lora import ExpertLoRA


class MoEBackend(Protocol):
    def prepare_adapter(self, adapter: ExpertLoRA) -> object:
        """The per-adapter forms this backend runs (stacks, scalings, transposes), built without
        changing any state: may run on another thread while the backend serves forwards."""

    def load_adapter(self, name: str, adapter: ExpertLoRA, prepared: object | None = None) -> int:
        """Install ``adapter`` (with ``prepare_adapter``'s forms, or built now); returns its slot."""

    def unload_adapter(self, name: str) -> None: ...

    def adapters_changed(self) -> None:
        """Rebuild what depends on the whole set of adapters (GPU stacks, kernel argument lists)
        now, between steps, rather than on the next forward."""

    def slot(self, name: str | None) -> int: ...

    def token_slots(self, names: list[str | None]) -> torch.Tensor: ...

    def forward(
        self,
        layer: int,
        x: torch.Tensor,  # [T, H]
        topk_ids: torch.Tensor,  # [T, k]
        topk_weights: torch.Tensor,  # [T, k]
        token_slots: torch.Tensor | None = None,  # [T]
    ) -> torch.Tensor: ...  # [T, H]

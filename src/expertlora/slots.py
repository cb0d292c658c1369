"""Adapter slots: any number of canonical adapters loaded at once, each token picking one.

Each adapter is turned, once per layer when it is loaded (``prepare``, which may run off the step
loop), into the form the engine runs (SlotLoRA):
the scaling folded into B, B transposed (so the expand runs along output columns), gate's and
up's A stacked so one shrink serves both, and a projection the adapter does not target given
rank 0, so no kernel ever asks "is there LoRA?".

Shape legend: E = experts, H = hidden, I = intermediate, rg / ru / rd = gate / up / down rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .errors import AdapterError
from .lora import ExpertLoRA, LayerLoRA, ProjLoRA

NO_ADAPTER = -1


@dataclass(frozen=True)
class SlotLoRA:
    """One adapter's expert LoRA for one layer, ready for the engine."""

    a_gate_up: torch.Tensor  # [E, rg + ru, H]
    bt_gate: torch.Tensor  # [E, rg, I]  scaling · Bᵀ
    bt_up: torch.Tensor  # [E, ru, I]
    a_down: torch.Tensor  # [E, rd, I]
    bt_down: torch.Tensor  # [E, rd, H]

    @property
    def gate_rank(self) -> int:
        return self.bt_gate.shape[1]

    def select(self, experts: torch.Tensor) -> SlotLoRA:
        """The LoRA of ``experts`` only, in that order."""
        return SlotLoRA(*(getattr(self, f.name).index_select(0, experts).contiguous() for f in fields(self)))

    @classmethod
    def from_layer(cls, lora: LayerLoRA | None, E: int, H: int, I: int, dtype: torch.dtype) -> SlotLoRA:
        gate_a, gate_b = _scaled(lora and lora.gate, E, H, I, dtype)
        up_a, up_b = _scaled(lora and lora.up, E, H, I, dtype)
        down_a, down_b = _scaled(lora and lora.down, E, I, H, dtype)
        return cls(torch.cat((gate_a, up_a), dim=1).contiguous(), gate_b, up_b, down_a, down_b)


def _scaled(proj: ProjLoRA | None, E: int, n_in: int, n_out: int, dtype: torch.dtype):
    """(A [E, r, in], scaling · Bᵀ [E, r, out]) in ``dtype``."""
    if proj is None:
        return torch.empty(E, 0, n_in, dtype=dtype), torch.empty(E, 0, n_out, dtype=dtype)
    bt = proj.b.to(torch.float32).transpose(1, 2) * proj.spec.scaling
    return proj.a.to(dtype).contiguous(), bt.to(dtype).contiguous()


class AdapterSlots:
    """Named adapters in numbered slots; a slot keeps its number while others come and go."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        experts: dict[int, torch.Tensor] | None = None,
    ):
        """``experts``: per layer, the ids of the experts the engine holds, in its order, where it
        holds only some (the CPU side of the hybrid); that layer's forms cover those only."""
        self.shape = (num_experts, hidden_size, intermediate_size)
        self.dtype = dtype
        self.experts = experts or {}
        self._adapters: list[ExpertLoRA | None] = []  # slot -> adapter
        self._forms: list[dict[int, SlotLoRA]] = []  # slot -> layer -> engine form, built at load
        self._index: dict[str, int] = {}
        self._kernel_args: dict[int, tuple[list[torch.Tensor], ...]] = {}  # cleared on load / unload
        self._empty: dict[int, SlotLoRA] = {}  # experts held -> rank-0 form

    @property
    def names(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def prepare(self, adapter: ExpertLoRA) -> dict[int, SlotLoRA]:
        """The engine forms of every layer ``adapter`` targets, on the experts held here. Changes
        nothing: it may run on any thread while the engine steps; ``load`` then takes them."""
        E, H, I = self.shape
        info = adapter.info
        for key, expected, found in (
            ("num_experts", E, info.num_experts),
            ("hidden_size", H, info.hidden_size),
            ("intermediate_size", I, info.intermediate_size),
        ):
            if expected != found:
                raise AdapterError(info.path, key, f"{expected} (the engine's experts)", str(found))
        forms = {}
        for layer, lora in adapter.layers.items():
            form = SlotLoRA.from_layer(lora, E, H, I, self.dtype)
            forms[layer] = form.select(self.experts[layer]) if layer in self.experts else form
        return forms

    def load(self, name: str, adapter: ExpertLoRA, forms: dict[int, SlotLoRA] | None = None) -> int:
        """Add an adapter under ``name`` with its forms (``prepare``'s, or built now); returns its
        slot number (the per-token index)."""
        if name in self._index:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        forms = self.prepare(adapter) if forms is None else forms
        slot = self._adapters.index(None) if None in self._adapters else len(self._adapters)
        if slot == len(self._adapters):
            self._adapters.append(None)
            self._forms.append({})
        self._adapters[slot] = adapter
        self._forms[slot] = forms
        self._index[name] = slot
        self._kernel_args.clear()
        return slot

    def unload(self, name: str) -> None:
        slot = self.index(name)
        self._adapters[slot] = None
        self._forms[slot] = {}
        del self._index[name]
        self._kernel_args.clear()

    def index(self, name: str | None) -> int:
        """Slot number of ``name``; None means no adapter (NO_ADAPTER)."""
        if name is None:
            return NO_ADAPTER
        if name not in self._index:
            raise KeyError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._index) or 'none'})")
        return self._index[name]

    def token_slots(self, names: list[str | None]) -> torch.Tensor:
        """Per-token slot tensor from per-token adapter names (None for no adapter)."""
        return torch.tensor([self.index(n) for n in names], dtype=torch.int64)

    def adapter(self, slot: int) -> ExpertLoRA:
        """The adapter in a loaded slot."""
        if not self.is_loaded(slot):
            raise ValueError(f"token_slots: slot {slot} holds no adapter")
        return self._adapters[slot]

    def adapters(self) -> list[ExpertLoRA]:
        return [a for a in self._adapters if a is not None]

    def by_slot(self) -> list[ExpertLoRA | None]:
        """The adapter in each slot, None where a slot is empty."""
        return list(self._adapters)

    def layer(self, layer: int) -> list[SlotLoRA]:
        """Every slot's LoRA for ``layer``, indexed by slot; empty slots have rank 0."""
        return [self._form(slot, layer) for slot in range(len(self._adapters))]

    def _form(self, slot: int, layer: int) -> SlotLoRA:
        form = self._forms[slot].get(layer)
        if form is None:  # an empty slot, or a layer the adapter does not target: rank 0
            held = len(self.experts[layer]) if layer in self.experts else self.shape[0]
            if held not in self._empty:
                self._empty[held] = SlotLoRA.from_layer(None, held, *self.shape[1:], self.dtype)
            form = self._empty[held]
        return form

    def kernel_args(self, layer: int) -> tuple[list[torch.Tensor], ...]:
        """The compiled kernel's five per-slot lists for ``layer`` (A_gu, Bᵀ_g, Bᵀ_u, A_d, Bᵀ_d)."""
        if layer not in self._kernel_args:
            slots = self.layer(layer)
            self._kernel_args[layer] = tuple(
                [getattr(s, f) for s in slots] for f in ("a_gate_up", "bt_gate", "bt_up", "a_down", "bt_down")
            )
        return self._kernel_args[layer]

    @property
    def has_empty_slots(self) -> bool:
        return None in self._adapters

    def is_loaded(self, slot: int) -> bool:
        return 0 <= slot < len(self._adapters) and self._adapters[slot] is not None

"""The GPU MoE-LoRA backend: moe.py's math for the experts that live on the GPU.

Each layer keeps its resident experts (any subset of its E experts) in bf16, or fp32 for the
fp32 method. Routed pairs are sorted by resident expert and each projection runs as one grouped
matmul (torch._grouped_mm where the device has it, else one matmul per expert). Each adapter
adds its shrink and expand on its own tokens' rows only, so tokens without an adapter get the
base result bit for bit. Pairs whose expert is not resident, or whose id is outside [0, E), are
skipped: the CPU engine runs them (hybrid.py).

Shape legend as in moe.py; Eg = resident experts of a layer, n = pairs run here,
R = LoRA rank padded to a multiple of 8 (grouped matmuls want 16-byte rows; the padding is zeros).
Every weight is kept as [Eg, out, in] and multiplied transposed, like F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from .slots import NO_ADAPTER, AdapterSlots, SlotLoRA

RANK_MULTIPLE = 8


@dataclass(frozen=True)
class GpuLayer:
    """One layer's resident experts."""

    group: torch.Tensor  # [E + 1] int64: expert id -> resident index; Eg (skip) for the rest and for id E
    resident: torch.Tensor  # [Eg] int64 expert ids, on the CPU
    gate_up: torch.Tensor  # [Eg, 2I, H]
    down: torch.Tensor  # [Eg, H, I]


@dataclass(frozen=True)
class GpuLoRA:
    """One adapter's LoRA on one layer's resident experts; gate and up share one shrink, their
    B's sit side by side in one expand (the off blocks are zeros)."""

    a_gate_up: torch.Tensor  # [Eg, R, H]
    b_gate_up: torch.Tensor  # [Eg, 2I, R]  scaling folded in
    a_down: torch.Tensor  # [Eg, R, I]
    b_down: torch.Tensor  # [Eg, H, R]

    @classmethod
    def from_slot(cls, s: SlotLoRA, resident: torch.Tensor, device: torch.device) -> GpuLoRA:
        E, rgu, H = s.a_gate_up.shape
        I, rg = s.bt_gate.shape[2], s.gate_rank
        R = _padded(rgu)
        pick = lambda t: t.index_select(0, resident)  # noqa: E731
        a_gu = torch.zeros(len(resident), R, H, dtype=s.a_gate_up.dtype)
        a_gu[:, :rgu] = pick(s.a_gate_up)
        b_gu = torch.zeros(len(resident), 2 * I, R, dtype=s.a_gate_up.dtype)
        b_gu[:, :I, :rg] = pick(s.bt_gate).transpose(1, 2)
        b_gu[:, I:, rg:rgu] = pick(s.bt_up).transpose(1, 2)
        rd = s.a_down.shape[1]
        a_d = torch.zeros(len(resident), _padded(rd), I, dtype=s.a_down.dtype)
        a_d[:, :rd] = pick(s.a_down)
        b_d = torch.zeros(len(resident), H, _padded(rd), dtype=s.a_down.dtype)
        b_d[:, :, :rd] = pick(s.bt_down).transpose(1, 2)
        return cls(*(t.to(device) for t in (a_gu, b_gu, a_d, b_d)))


def _padded(rank: int) -> int:
    return max(RANK_MULTIPLE, -(-rank // RANK_MULTIPLE) * RANK_MULTIPLE)


class GpuMoELoRA:
    """The resident experts of every MoE layer, run with each token's own LoRA."""

    def __init__(
        self,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        slots: AdapterSlots | None = None,  # the adapters; HybridMoE shares the CPU engine's
    ):
        self.device, self.dtype, self.slots = torch.device(device), dtype, slots
        self.layers: dict[int, GpuLayer] = {}
        self._loras: dict[tuple[int, int], tuple[SlotLoRA, GpuLoRA]] = {}  # (slot, layer) -> (source, GPU form)

    def add_layer(
        self,
        layer: int,
        gate_up: torch.Tensor,  # [E, 2I, H], any float dtype, on the CPU
        down: torch.Tensor,  # [E, H, I]
        mask: torch.Tensor,  # [E] bool: the experts that live here
    ) -> None:
        """Copy the layer's resident experts to the device (one layer at a time while loading)."""
        E = gate_up.shape[0]
        mask = mask.to("cpu", torch.bool)
        if mask.shape != (E,):
            raise ValueError(f"layer {layer}: GPU expert mask must be [{E}], found {list(mask.shape)}")
        resident = mask.nonzero().squeeze(1)
        group = torch.full((E + 1,), len(resident), dtype=torch.int64)
        group[resident] = torch.arange(len(resident))
        self.layers[layer] = GpuLayer(
            group.to(self.device), resident,
            gate_up.index_select(0, resident).to(self.device, self.dtype).contiguous(),
            down.index_select(0, resident).to(self.device, self.dtype).contiguous(),
        )

    def num_resident(self, layer: int) -> int:
        return len(self.layers[layer].resident)

    def resident(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, k] bool: which routed pairs this backend runs."""
        g = self.layers[layer]
        return g.group[_group_ids(topk_ids, g)] < len(g.resident)

    def forward(
        self,
        layer: int,
        x: torch.Tensor,  # [T, H] on the device
        topk_ids: torch.Tensor,  # [T, k]
        topk_weights: torch.Tensor,  # [T, k]
        token_slots: torch.Tensor | None = None,  # [T] on the device; None: no adapter anywhere
    ) -> torch.Tensor:  # [T, H] float32: the resident experts' share of the layer's output
        g = self.layers[layer]
        T, k = topk_ids.shape
        Eg, H, I = g.gate_up.shape[0], g.gate_up.shape[2], g.down.shape[2]
        group = g.group[_group_ids(topk_ids, g)].reshape(-1)  # [T * k], Eg: not run here
        order = torch.argsort(group, stable=True)
        ends = torch.bincount(group, minlength=Eg + 1)[:Eg].cumsum(0).to(torch.int32)
        n = int(ends[-1]) if Eg else 0  # the one host sync: slicing needs the count
        y = torch.zeros(T * k, H, dtype=torch.float32, device=x.device)
        if n:
            pairs = order[:n]  # flat pair index, grouped by resident expert
            tokens = pairs // k
            xs = x[tokens].to(self.dtype)  # [n, H]
            adapters = self._adapter_rows(layer, g, token_slots, tokens, group[pairs], ends)
            gu = grouped_mm(xs, g.gate_up, ends).float()  # [n, 2I]
            for lora, rows, ends_s in adapters:
                gu[rows] += grouped_mm(grouped_mm(xs[rows], lora.a_gate_up, ends_s), lora.b_gate_up, ends_s).float()
            h = (F.silu(gu[:, :I]) * gu[:, I:]).to(self.dtype)  # [n, I]
            d = grouped_mm(h, g.down, ends).float()  # [n, H]
            for lora, rows, ends_s in adapters:
                d[rows] += grouped_mm(grouped_mm(h[rows], lora.a_down, ends_s), lora.b_down, ends_s).float()
            y[pairs] = d * topk_weights.reshape(-1)[pairs, None].float()
        return y.view(T, k, H).sum(1)  # a fixed order: no atomics, the same bits every run

    def _adapter_rows(self, layer: int, g: GpuLayer, token_slots, tokens, groups, ends):
        """(GPU LoRA, its rows among the n pairs, its group ends) for each adapter in the batch."""
        if token_slots is None:
            return []
        pair_slots = token_slots[tokens]
        present = [s for s in pair_slots.unique().tolist() if s != NO_ADAPTER]
        out = []
        for s in present:
            if len(present) == 1 and bool((pair_slots == s).all()):
                rows, ends_s = slice(None), ends
            else:
                rows = (pair_slots == s).nonzero().squeeze(1)
                ends_s = torch.bincount(groups[rows], minlength=len(ends)).cumsum(0).to(torch.int32)
            out.append((self._lora(s, layer, g), rows, ends_s))
        return out

    def _lora(self, slot: int, layer: int, g: GpuLayer) -> GpuLoRA:
        source = self.slots.layer(layer)[slot]
        cached = self._loras.get((slot, layer))
        if cached is None or cached[0] is not source:  # built on first use, again after a reload
            cached = (source, GpuLoRA.from_slot(source, g.resident, self.device))
            self._loras[(slot, layer)] = cached
        return cached[1]


def _group_ids(topk_ids: torch.Tensor, g: GpuLayer) -> torch.Tensor:
    """Expert ids with those outside [0, E) mapped to E, the group table's skip entry."""
    E = g.group.numel() - 1
    return torch.where((topk_ids >= 0) & (topk_ids < E), topk_ids, E)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows of group j (up to ends[j], int32) times w[j]ᵀ: x [n, K], w [G, N, K] -> [n, N].
    Rows past ends[-1] are left undefined."""
    if _has_grouped_mm(x.device.type, x.dtype):
        return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for j, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[j].T
        start = end
    return out


@cache
def _has_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here (CUDA: bf16 on Hopper and newer; CPU: recent torch)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, dtype=dtype, device=device_type)
        w = torch.ones(2, 16, 16, dtype=dtype, device=device_type)
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([1, 4], dtype=torch.int32, device=device_type))
        return bool((y == 16).all())
    except (RuntimeError, NotImplementedError):
        return False

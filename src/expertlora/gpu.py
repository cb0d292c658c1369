"""The GPU MoE-LoRA backend: moe.py's math for the experts that live on the GPU.

Each layer keeps its resident experts (any subset of its E experts) in bf16, or fp32 for the
fp32 method. Routed pairs are sorted by resident expert and each projection runs as one grouped
matmul (torch._grouped_mm where the device has it, else one matmul per expert). Within each
expert the rows are sorted by adapter, so the LoRA of all adapters runs as one more grouped
shrink and expand over (expert, adapter) groups on the same rows; rows without an adapter meet
zeros and get the base result bit for bit. Pairs
whose expert is not resident, or whose id is outside [0, E), are skipped: the CPU engine runs
them (hybrid.py). Nothing waits on the GPU, so small batches replay as CUDA graphs.

Shape legend as in moe.py; Eg = resident experts of a layer, n = pairs run here,
R = LoRA rank padded to a multiple of 8 (grouped matmuls want 16-byte rows; the padding is zeros).
Every weight is kept as [Eg, out, in] and multiplied transposed, like F.linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from .slots import AdapterSlots, SlotLoRA

RANK_MULTIPLE = 8
# Batches up to this many tokens (decode) replay a CUDA graph per layer: at one token the work is
# tens of microseconds and launching some thirty kernels one by one would cost more.
GRAPH_MAX_TOKENS = 16
# With fused on, batches up to this many tokens run gpu_triton's kernels, if their routed pairs are
# at most FUSED_MAX_PAIRS_PER_EXPERT times the layer's experts: the fused kernels read an expert's
# weights once per pair, the grouped matmuls once per expert. On the H200, Mixtral (8 experts, top-2)
# gained at 16 pairs and lost at 32; Qwen3 (128, top-8) gained at 128 (gpu_layer.py --parts sweep).
FUSED_MAX_TOKENS = 16
FUSED_MAX_PAIRS_PER_EXPERT = 2


@dataclass(frozen=True)
class GpuLayer:
    """One layer's resident experts."""

    group: torch.Tensor  # [E + 1] int64: expert id -> resident index; Eg (skip) for the rest and for id E
    elsewhere: torch.Tensor  # [E + 1] int64, on the CPU: expert id -> its index among the experts not resident here, -1 if resident (and for id E)
    resident: torch.Tensor  # [Eg] int64 expert ids, on the CPU
    gate_up: torch.Tensor  # [Eg, 2I, H]
    down: torch.Tensor  # [Eg, H, I]


@dataclass(frozen=True)
class GpuLoRA:
    """Every slot's LoRA on one layer's resident experts, stacked expert-major with zeros first:
    group e·(S+1) is "no adapter" on resident expert e, group e·(S+1) + 1 + s is slot s's LoRA
    of it (zeros for an empty slot or an untargeted projection). Rows sorted by (expert, slot)
    then serve both the base's groups and these, in the same order. Gate and up share one
    shrink; their B's sit side by side in one expand."""

    sources: tuple  # the adapter in each slot (None: empty) it was built from: rebuilt when a slot changes
    a_gate_up: torch.Tensor  # [Eg·(S+1), R, H]
    b_gate_up: torch.Tensor  # [Eg·(S+1), 2I, R]  scaling folded in
    a_down: torch.Tensor  # [Eg·(S+1), R, I]
    b_down: torch.Tensor  # [Eg·(S+1), H, R]

    @classmethod
    def stack(cls, sources: tuple, slots: list[SlotLoRA], device: torch.device, dtype: torch.dtype) -> GpuLoRA:
        """``slots``: each slot's LoRA on the resident experts, in slot order."""
        Eg, S = slots[0].a_gate_up.shape[0], len(slots)
        H, I = slots[0].a_gate_up.shape[2], slots[0].bt_gate.shape[2]
        R = _padded(max(max(s.a_gate_up.shape[1], s.a_down.shape[1]) for s in slots))
        a_gu, b_gu = torch.zeros(Eg, S + 1, R, H, dtype=dtype), torch.zeros(Eg, S + 1, 2 * I, R, dtype=dtype)
        a_d, b_d = torch.zeros(Eg, S + 1, R, I, dtype=dtype), torch.zeros(Eg, S + 1, H, R, dtype=dtype)
        for j, s in enumerate(slots, start=1):
            rg, rgu, rd = s.gate_rank, s.a_gate_up.shape[1], s.a_down.shape[1]
            a_gu[:, j, :rgu] = s.a_gate_up
            b_gu[:, j, :I, :rg] = s.bt_gate.transpose(1, 2)
            b_gu[:, j, I:, rg:rgu] = s.bt_up.transpose(1, 2)
            a_d[:, j, :rd] = s.a_down
            b_d[:, j, :, :rd] = s.bt_down.transpose(1, 2)
        return cls(sources, *(t.flatten(0, 1).to(device) for t in (a_gu, b_gu, a_d, b_d)))


def _padded(rank: int) -> int:
    return max(RANK_MULTIPLE, -(-rank // RANK_MULTIPLE) * RANK_MULTIPLE)


class GpuMoELoRA:
    """The resident experts of every MoE layer, run with each token's own LoRA."""

    def __init__(
        self,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        slots: AdapterSlots | None = None,  # the adapters; HybridMoE shares the CPU engine's
        fused: bool | None = None,
    ):
        """``fused``: small batches (FUSED_MAX_TOKENS) run the fused Triton kernels (gpu_triton.py)
        instead of the grouped matmuls; default: on CUDA where triton is installed."""
        self.device, self.dtype, self.slots = torch.device(device), dtype, slots
        self.fused = self.device.type == "cuda" and _has_triton() if fused is None else fused
        self.layers: dict[int, GpuLayer] = {}
        self._loras: dict[int, GpuLoRA] = {}  # layer -> every slot's LoRA, stacked
        # Graphs need a path that never waits on the GPU: the per-expert loop reads group sizes,
        # and so does PyTorch's own grouped matmul outside bf16.
        self.graphs = self.device.type == "cuda" and dtype == torch.bfloat16 and _has_grouped_mm("cuda", dtype)
        self._graphs: dict[tuple, _Graph] = {}
        self._graph_pool = None
        self._elsewhere_here: dict[int, torch.Tensor] = {}  # layer -> its elsewhere table on the device

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
        elsewhere = torch.full((E + 1,), -1, dtype=torch.int64)
        elsewhere[(~mask).nonzero().squeeze(1)] = torch.arange(E - len(resident))
        self._elsewhere_here.pop(layer, None)
        self.layers[layer] = GpuLayer(
            group.to(self.device), elsewhere, resident,
            gate_up.index_select(0, resident).to(self.device, self.dtype).contiguous(),
            down.index_select(0, resident).to(self.device, self.dtype).contiguous(),
        )

    def adapters_changed(self) -> None:
        """Stack every layer's LoRA for the current adapters now (a GPU copy), not on first use."""
        if self.slots is not None and len(self.slots):
            for layer, g in self.layers.items():
                self._stacked(layer, g)

    def num_resident(self, layer: int) -> int:
        return len(self.layers[layer].resident)

    def elsewhere(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, k] ids -> the pairs this backend does not run, as indices among the experts it
        does not hold (the CPU engine holds just those, in id order); -1 for the pairs it runs.
        Ids on the device are mapped there (the table is copied on first use: eagerly, not
        while a graph is captured)."""
        g = self.layers[layer]
        table = g.elsewhere
        if topk_ids.device != table.device:
            table = self._elsewhere_here.get(layer)
            if table is None:
                table = self._elsewhere_here[layer] = g.elsewhere.to(topk_ids.device)
        return table[_group_ids(topk_ids, g)]

    def forward(
        self,
        layer: int,
        x: torch.Tensor,  # [T, H] on the device
        topk_ids: torch.Tensor,  # [T, k]
        topk_weights: torch.Tensor,  # [T, k]
        token_slots: torch.Tensor | None = None,  # [T] on the device; None: no adapter anywhere
    ) -> torch.Tensor:  # [T, H] float32: the resident experts' share of the layer's output
        if not (self.graphs and x.is_cuda and x.shape[0] <= GRAPH_MAX_TOKENS) or torch.cuda.is_current_stream_capturing():
            # (inside a graph the caller captures, e.g. a whole decode step, the ops are captured as they are)
            return self._forward(layer, x, topk_ids, topk_weights, token_slots)
        if token_slots is not None and len(self.slots):
            self._stacked(layer, self.layers[layer])  # a changed adapter set drops the layer's graphs
        key = (layer, *topk_ids.shape, x.dtype, topk_ids.dtype, topk_weights.dtype, token_slots is None, self.fused)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(layer, x, topk_ids, topk_weights, token_slots)
        for static, value in zip(graph.inputs, (x, topk_ids, topk_weights, token_slots)):
            if static is not None:
                static.copy_(value)
        graph.graph.replay()
        return graph.output.clone()  # the next replay overwrites the static output

    def _capture(self, layer, *inputs) -> _Graph:
        static = tuple(None if t is None else t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as CUDA graphs require
            for _ in range(2):
                self._forward(layer, *static)
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            output = self._forward(layer, *static)
        return _Graph(graph, static, output)

    def _forward(self, layer, x, topk_ids, topk_weights, token_slots) -> torch.Tensor:
        """No host synchronisation (where the device has grouped matmuls): every one of the
        T·k pairs takes a row, pairs not run here sort last and fall outside every group."""
        g = self.layers[layer]
        T, k = topk_ids.shape
        Eg, H, I = g.gate_up.shape[0], g.gate_up.shape[2], g.down.shape[2]
        lora = self._stacked(layer, g) if token_slots is not None and len(self.slots) else None
        if self.fused and T <= FUSED_MAX_TOKENS and T * k <= FUSED_MAX_PAIRS_PER_EXPERT * (g.group.numel() - 1):
            from .gpu_triton import fused_forward

            return fused_forward(g.group, g.gate_up, g.down, lora, x, topk_ids, topk_weights, token_slots)
        group = g.group[_group_ids(topk_ids, g)].reshape(-1)  # [P = T·k]; Eg: not run here
        if lora is None:
            key, per_expert = group, 1
        else:  # rows grouped by expert, and within each expert by adapter (no adapter first)
            per_expert = len(lora.sources) + 1
            key = group * per_expert + 1 + token_slots[:, None].expand(T, k).reshape(-1)
        order = torch.argsort(key, stable=True)
        key = key[order]
        ends = _group_ends(key // per_expert, Eg)
        tokens = order // k
        xs = x[tokens].to(self.dtype)  # [P, H]
        gu = grouped_mm(xs, g.gate_up, ends).float()  # [P, 2I]
        if lora is not None:
            lora_ends = _group_ends(key, Eg * per_expert)
            gu += grouped_mm(grouped_mm(xs, lora.a_gate_up, lora_ends), lora.b_gate_up, lora_ends).float()
        h = (F.silu(gu[:, :I]) * gu[:, I:]).to(self.dtype)  # [P, I]
        d = grouped_mm(h, g.down, ends).float()  # [P, H]
        if lora is not None:
            d += grouped_mm(grouped_mm(h, lora.a_down, lora_ends), lora.b_down, lora_ends).float()
        run_here = (key < Eg * per_expert)[:, None]
        d = torch.where(run_here, d * topk_weights.reshape(-1)[order, None].float(), 0.0)  # rows past the groups are garbage
        y = torch.empty_like(d).index_copy_(0, order, d)  # back to pair order
        return y.view(T, k, H).sum(1)  # a fixed order: no atomics, the same bits every run

    def _stacked(self, layer: int, g: GpuLayer) -> GpuLoRA:
        sources = tuple(self.slots.by_slot())
        cached = self._loras.get(layer)
        if cached is None or len(cached.sources) != len(sources) or any(a is not b for a, b in zip(cached.sources, sources)):
            E, H, I = self.slots.shape
            forms = [SlotLoRA.from_layer(a.layers.get(layer) if a else None, E, H, I, self.dtype).select(g.resident) for a in sources]
            cached = GpuLoRA.stack(sources, forms, self.device, self.dtype)  # on first use, after a change
            self._loras[layer] = cached
            self._graphs = {key: graph for key, graph in self._graphs.items() if key[0] != layer}
        return cached


@dataclass(frozen=True)
class _Graph:
    """One captured layer call: copy inputs into ``inputs``, replay, read ``output``."""

    graph: torch.cuda.CUDAGraph
    inputs: tuple  # static x, topk_ids, topk_weights, token_slots (None: captured without adapters)
    output: torch.Tensor


def _group_ends(sorted_groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """int32 end row of each group 0 .. num_groups-1 in rows sorted by group; larger values are
    rows of no group (no host sync, unlike bincount on CUDA)."""
    counts = torch.zeros(num_groups + 1, dtype=torch.int64, device=sorted_groups.device)
    counts.scatter_add_(0, sorted_groups.clamp(max=num_groups), torch.ones_like(sorted_groups))  # past the end: skipped
    return counts[:num_groups].cumsum(0).to(torch.int32)


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
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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

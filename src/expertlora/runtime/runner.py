"""The model runner: one packed step through the transformers model, logits of the sampled rows.

The model runs with the ``expertlora`` attention (kv_cache.py) and no transformers cache: the
step's AttentionPlan travels as a keyword argument down to every attention layer, and the
per-token adapter slots go to the MoE layers and the per-token LoRA modules through the model's
BatchAdapters for the duration of the call.

Decode-only steps on a GPU model (bf16 GPU experts) replay CUDA graphs, one per (batch size,
cached length) bucket, whatever share of the experts lives on the GPU: a layer's CPU experts run
inside the graph through host nodes (hybrid_graph.py). The step's rows are copied into the
graph's static buffers (token, position, cache slot, cached length, adapter slot), padding rows point at the
cache's pad slot with no adapter, and the graph replays the whole forward, mixed adapters
included. A graph is captured on the first step of its bucket and dropped when the set of
adapters changes (it holds their tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..integration import LoadedModel
from ..slots import NO_ADAPTER
from .batch import StepBatch
from .kv_cache import ATTENTION_IMPLEMENTATION, AttentionPlan, KVCache, LayerShape, ShapeProbe, register

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
GRAPH_MIN_CACHED = 128  # cached lengths are bucketed by powers of two from here up to max_model_len


@dataclass
class _StepGraph:
    """A captured step and every tensor allocated outside the graph that it reads: they must live
    as long as it does (freed, their memory would go to other tensors while the graph still reads it)."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [1, B]
    positions: torch.Tensor  # [1, B]
    cache_slots: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]
    adapter_slots: torch.Tensor  # [B]
    logits: torch.Tensor  # [B, V]
    rows: torch.Tensor  # [B] the logits rows kept (all)
    host_calls: list  # the CPU experts' captured calls (hybrid), run by the graph worker on replay


class ModelRunner:
    def __init__(self, lm: LoadedModel, graphs: bool = True):
        """``graphs``: replay decode steps as CUDA graphs where the model allows it."""
        register()
        self.lm = lm
        self.model = lm.model
        self.model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
        self.device = self.model.device
        self.graphs = graphs and graphs_possible(lm)
        # graphs_possible holds only for a HybridMoE; its graph_part runs CPU experts in graphs (None: all on the GPU)
        self._part = lm.engine.graph_part if self.graphs else None
        self._graphs: dict[tuple[int, int], _StepGraph] = {}
        self._pool = None

    def layer_shapes(self) -> dict[int, LayerShape]:
        """Each attention layer's K/V heads and sizes, from one probing forward of one token."""
        probe = ShapeProbe()
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.lm.use([None])
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=ids, use_cache=False, logits_to_keep=1, expertlora_step=probe)
        return probe.shapes

    def run(self, batch: StepBatch) -> torch.Tensor:
        """[n, V] logits of ``batch.logits_rows``."""
        plan = batch.plan
        if self.graphs and not plan.prefills and batch.num_tokens <= GRAPH_BATCH_SIZES[-1]:
            return self._replay(batch)
        self.lm.batch.set(batch.adapter_slots)  # one "sequence" per token: packed rows, each its own slot
        try:
            with torch.no_grad():
                out = self.model(
                    input_ids=batch.input_ids, position_ids=batch.positions, use_cache=False,
                    logits_to_keep=batch.logits_rows, expertlora_step=plan,
                )
        finally:
            self.lm.batch.set(None)
        return out.logits[0]

    def adapters_changed(self) -> None:
        """The captured graphs hold the old adapters' tensors: capture anew on next use."""
        self._graphs.clear()

    # -- CUDA graphs ---------------------------------------------------------------------------

    def _replay(self, batch: StepBatch) -> torch.Tensor:
        plan, D = batch.plan, batch.num_tokens
        B = next(b for b in GRAPH_BATCH_SIZES if b >= D)
        S = min(max(GRAPH_MIN_CACHED, 1 << (plan.decode_max_len - 1).bit_length()), plan.cache.max_len)
        g = self._graphs.get((B, S))
        if g is None:
            g = self._graphs[(B, S)] = self._capture(B, S, plan.cache)
        _fill(g.input_ids[0], batch.input_ids[0], 0)
        _fill(g.positions[0], batch.positions[0], 0)
        _fill(g.cache_slots, plan.token_slots, plan.cache.pad_slot)
        _fill(g.lengths, plan.decode_lengths, 1)
        _fill(g.adapter_slots, batch.adapter_slots, NO_ADAPTER)
        if self._part is None:
            g.graph.replay()
        else:
            self._part.replay(g.host_calls, g.graph)
        return g.logits[:D]

    def _capture(self, B: int, S: int, cache: KVCache) -> _StepGraph:
        def full(value):
            return torch.full((B,), value, dtype=torch.long, device=self.device)

        # every row starts as padding: warm-up and capture touch only the pad slot
        ids, positions, slots, lengths, adapters = full(0)[None], full(0)[None], full(cache.pad_slot), full(1), full(NO_ADAPTER)
        plan = AttentionPlan(cache, token_slots=slots, token_positions=positions[0], decode_slots=slots, decode_lengths=lengths,
                             decode_max_len=S, prefills=())
        rows = torch.arange(B, device=self.device)

        def step() -> torch.Tensor:
            self.lm.batch.set_static(adapters)
            try:
                out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=rows, expertlora_step=plan)
            finally:
                self.lm.batch.set(None)
            return out.logits[0]

        part = self._part
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph: kernels compiled, caches filled
                if part is not None:
                    part.preparing = True  # the CPU parts' pinned buffers, allocated now
                try:
                    for _ in range(2):
                        step()
                finally:
                    if part is not None:
                        part.preparing = False
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = step()
        calls = part.take_captured() if part is not None else []
        return _StepGraph(graph, ids, positions, slots, lengths, adapters, logits, rows, calls)


def _fill(static: torch.Tensor, values: torch.Tensor, pad: int) -> None:
    n = values.numel()
    static[:n].copy_(values, non_blocking=True)
    static[n:].fill_(pad)


def graphs_possible(lm: LoadedModel) -> bool:
    """Whether decode steps can be captured: a GPU, GPU experts on a path that never waits for
    the device (bf16, where grouped matmuls run there), and for CPU experts, host nodes."""
    from ..hybrid import HybridMoE

    return isinstance(lm.engine, HybridMoE) and lm.engine.graphs_ready()


"""The hybrid executor: each MoE layer's routed pairs split between the GPU and the CPU engine.

Per layer call, in this order:
  1. x, the routed ids and their weights are copied into pinned host buffers without blocking;
  2. the GPU backend's work for the resident pairs is queued on the current stream (it never
     waits on the GPU; at decode it is one CUDA graph replay);
  3. as soon as the copies have landed, the ids are mapped on the host to indices among the CPU
     engine's experts (only the non-resident ones; -1 for resident ones), and the CPU engine runs
     its pairs while the GPU works;
  4. the CPU result goes back to the GPU (pinned, non-blocking) and is added.
Step 3 runs on a worker thread that starts before step 2 (the kernel releases the GIL) for
batches of WORKER_TOKENS, on this thread otherwise. The hand-off costs more than it saves at
decode, where the GPU part's host time is small; at 32 tokens, where launching the GPU part takes
longer, the worker kept the overlap on the H200 host (BENCHMARKS.md). ``worker=True`` / ``False``
forces either.

Layers with all experts on one side skip the other. Without a GPU device the same code runs
with both parts on the CPU (CI checks the split that way).

With GPU prefill on (``gpu_prefill_threshold``, gpu_prefill.py), a forward of at least that many
tokens runs the CPU experts on the GPU too, their weights copied there layer by layer, and the
CPU engine sits it out.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from .engine import MoELoRAEngine, available_cores
from .experts import ExpertWeights
from .gpu import GpuMoELoRA
from .hybrid_graph import GraphCpuPart, KernelHostCalls, host_calls_in_kernel
from .gpu_prefill import GpuPrefill
from .lora import ExpertLoRA

# Batch sizes whose CPU part runs on the worker thread by default. Measured on the H200 host (two
# sessions): the worker won at 32 tokens (hybrid / slower part 1.03-1.06 against 1.06-1.25 inline),
# lost at 1 token, and was mixed at 512; sizes in between were not measured.
WORKER_TOKENS = range(32, 257)


class HybridMoE:
    """The engine API of MoELoRAEngine, over a CPU engine and a GPU backend sharing one set of
    adapter slots."""

    def __init__(self, cpu: MoELoRAEngine, gpu: GpuMoELoRA, worker: bool | None = None):
        """``cpu`` holds, per layer, exactly the experts ``gpu`` does not (see ``build``)."""
        E = cpu.slots.shape[0]
        for L, g in gpu.layers.items():
            held = cpu.slots.experts.get(L, torch.arange(E))
            if not torch.equal(held, (g.elsewhere[:E] >= 0).nonzero().squeeze(1)):
                raise ValueError(f"layer {L}: the CPU engine must hold exactly the experts that are not on the GPU")
        gpu.slots = cpu.slots  # one set of adapters: a slot means the same adapter on both sides
        self.cpu, self.gpu, self.slots = cpu, gpu, cpu.slots
        self.layers = cpu.layers
        self.worker = worker  # None: for batches of WORKER_TOKENS
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="expertlora-cpu-experts") if worker is not False else None
        self._host: dict[str, torch.Tensor] = {}  # pinned staging buffers, grown as needed
        self.graph_part: GraphCpuPart | KernelHostCalls | None = None  # set by enable_graphs()
        self._slots_source = self._slots_device = None
        self.prefill: GpuPrefill | None = None  # set by enable_gpu_prefill

    def enable_gpu_prefill(self, threshold: int) -> None:
        """From now on, forwards of at least ``threshold`` tokens run every layer's CPU experts on
        the GPU (gpu_prefill.py). The CPU engine's storage moves into page-locked memory, one
        layer at a time; raises ValueError when the GPU lacks the memory for two layers."""
        self.prefill = GpuPrefill(threshold, self.cpu.layers, self.slots, self.gpu.device, self.gpu.dtype)

    @classmethod
    def build(
        cls,
        layers: Iterable[tuple[int, torch.Tensor, torch.Tensor]],  # (L, gate_up [E, 2I, H], down [E, H, I]), full precision
        masks: dict[int, torch.Tensor],  # L -> [E] bool: on the GPU (a layer without a mask: none)
        method: str = "bf16",
        group_size: int | None = None,  # int4: None chooses per projection (quantize.int4_group_size)
        device: str | torch.device = "cuda",
        threads: int | None = None,
        worker: bool | None = None,
        kernel: str = "auto",
        gpu_prefill_threshold: int | None = None,
    ) -> HybridMoE:
        """Split each layer as it comes (one layer in memory at full precision): the experts of
        its mask copied to the GPU in bf16 (fp32 for the fp32 method), the others stored in
        ``method`` for the CPU engine, which holds nothing else. ``gpu_prefill_threshold``
        (None / 0: off): see enable_gpu_prefill."""
        gpu = GpuMoELoRA(device, torch.float32 if method == "fp32" else torch.bfloat16)
        cpu_layers, cpu_experts, E = {}, {}, None
        for L, gate_up, down in layers:
            E = gate_up.shape[0]
            mask = masks.get(L, torch.zeros(E, dtype=torch.bool)).to("cpu", torch.bool)
            gpu.add_layer(L, gate_up, down, mask)
            held = (~mask).nonzero().squeeze(1)
            if len(held) < E:
                gate_up, down = gate_up.index_select(0, held), down.index_select(0, held)
            cpu_layers[L] = ExpertWeights.from_gate_up(gate_up, down, method, group_size)
            cpu_experts[L] = held
        # One core stays free for the thread that drives the GPU.
        cpu = MoELoRAEngine(cpu_layers, threads=threads or max(1, available_cores() - 1), kernel=kernel,
                            experts=cpu_experts, num_experts=E)
        hybrid = cls(cpu, gpu, worker)
        if gpu_prefill_threshold:
            hybrid.enable_gpu_prefill(gpu_prefill_threshold)
        return hybrid

    def graphs_ready(self) -> bool:
        """Whether a step can be captured in a CUDA graph: GPU experts on a path that never waits
        for the device (bf16 grouped matmuls), and host nodes for the CPU experts where some are
        there (enabled here then)."""
        E = self.cpu.slots.shape[0]
        if not self.gpu.graphs:
            return False
        return all(self.gpu.num_resident(L) == E for L in self.gpu.layers) or self.enable_graphs() is None

    def enable_graphs(self) -> str | None:
        """Let steps with CPU experts be captured in CUDA graphs (through host nodes); returns
        None when they can be, else why not. Replay such graphs with ``graph_part.replay``."""
        from .host_nodes import host_nodes_available

        if self.gpu.device.type != "cuda" or not self.gpu.graphs:
            return "CUDA graphs need the GPU experts in bf16 on a CUDA device"
        reason = host_nodes_available()
        if reason is None and self.graph_part is None:
            if host_calls_in_kernel(self.cpu.kernel):
                self.graph_part = KernelHostCalls(self.cpu, self._cpu_ids)
            else:
                self.graph_part = GraphCpuPart(self._run_host_call)
        return reason

    def _cpu_ids(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """The routed ids as the CPU engine's experts (-1: a GPU expert's pair), where ``ids`` are."""
        return self.gpu.elsewhere(layer, ids) if self.gpu.num_resident(layer) else ids

    def _run_host_call(self, call) -> torch.Tensor:
        """A captured layer call's CPU part, on its pinned buffers (the graph worker's thread)."""
        return self.cpu.forward(call.layer, call.x, self._cpu_ids(call.layer, call.ids), call.weights, call.slots)

    def prepare_adapter(self, adapter: ExpertLoRA) -> dict:
        return self.cpu.prepare_adapter(adapter)

    def load_adapter(self, name: str, adapter: ExpertLoRA, prepared: dict | None = None) -> int:
        return self.cpu.load_adapter(name, adapter, prepared)

    def adapters_changed(self) -> None:
        """The CPU kernel's argument lists and the GPU's LoRA stacks for the new set of adapters."""
        self.cpu.adapters_changed()
        self.gpu.adapters_changed()
        if self.prefill is not None:
            self.prefill.adapters_changed()

    def unload_adapter(self, name: str) -> None:
        self.cpu.unload_adapter(name)

    def slot(self, name: str | None) -> int:
        return self.cpu.slot(name)

    def token_slots(self, names: list[str | None]) -> torch.Tensor:
        return self.cpu.token_slots(names)

    def forward(
        self,
        layer: int,
        x: torch.Tensor,  # [T, H], on the GPU backend's device
        topk_ids: torch.Tensor,  # [T, k]
        topk_weights: torch.Tensor,  # [T, k]
        token_slots: torch.Tensor | None = None,  # [T], on the CPU
    ) -> torch.Tensor:  # [T, H] in x's dtype
        E = self.cpu.slots.shape[0]
        on_gpu = self.gpu.num_resident(layer)
        graphs = self.graph_part
        in_graph = graphs is not None and on_gpu < E and (graphs.preparing or torch.cuda.is_current_stream_capturing())

        def gpu_part():
            """The resident experts' part, queued on the current stream."""
            return self.gpu.forward(layer, x, topk_ids, topk_weights, self._on_device(token_slots, x.device))

        if in_graph:  # a step as one CUDA graph (hybrid_graph.py), whatever its size: never GPU prefill
            if graphs.preparing:
                graphs.prepare(layer, x, topk_ids, topk_weights)
            else:
                return graphs.capture(layer, x, topk_ids, topk_weights, token_slots, lambda: gpu_part() if on_gpu else None).to(x.dtype)
        elif on_gpu < E and self.prefill is not None and self.prefill.runs(x):
            return self._on_gpu_only(layer, x, topk_ids, topk_weights, token_slots, on_gpu)
        if on_gpu == 0:
            return self._cpu_part(layer, x, topk_ids, topk_weights, token_slots)().to(x.device, non_blocking=True)
        if on_gpu == E:
            return gpu_part().to(x.dtype)
        cpu_part = self._cpu_part(layer, x, topk_ids, topk_weights, token_slots)
        if self.worker or (self.worker is None and x.shape[0] in WORKER_TOKENS):
            cpu_part = self._worker.submit(cpu_part).result
        y = gpu_part()
        y += cpu_part().to(x.device, non_blocking=True)
        return y.to(x.dtype)

    def _on_gpu_only(self, layer, x, ids, weights, token_slots, on_gpu: int) -> torch.Tensor:
        """GPU prefill: the resident experts' part queued first (it runs while the CPU experts'
        copy lands), then the CPU experts' on the GPU; summed in the same order as above."""
        slots = self._on_device(token_slots, x.device)
        if not on_gpu:
            return self.prefill.forward(layer, x, ids, weights, slots).to(x.dtype)
        y = self.gpu.forward(layer, x, ids, weights, slots)
        y += self.prefill.forward(layer, x, ids, weights, slots)
        return y.to(x.dtype)

    def _on_device(self, token_slots: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The slots on the GPU, copied once per forward: every layer gets the same tensor."""
        if token_slots is None or token_slots.device == device:
            return token_slots
        if self._slots_source is not token_slots:
            self._slots_source, self._slots_device = token_slots, token_slots.to(device, non_blocking=True)
        return self._slots_device

    def _cpu_part(self, layer, x, ids, weights, token_slots):
        """Queue the host copies of the CPU engine's inputs; returns the call that waits for
        them and runs the engine, giving its [T, H] result (in a pinned buffer with a GPU)."""
        x_h, ids_h, w_h = (self._staged(name, t) for name, t in (("x", x), ("ids", ids), ("w", weights)))
        if token_slots is not None:  # on the GPU in a graph engine's warm-up steps (BatchAdapters.set_static)
            token_slots = self._staged("slots", token_slots)
        copied = out = None
        if x.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
            out = self._buffer("y", x.shape, x.dtype)  # pinned, for the copy back

        def run():
            if copied is not None:
                copied.synchronize()  # the host copies above have landed, not the GPU part queued after them
            # the CPU engine's expert indices, mapped here on the host: no launches on the GPU's thread
            ids_cpu = self._cpu_ids(layer, ids_h)
            y = self.cpu.forward(layer, x_h, ids_cpu, w_h, token_slots)
            return y if out is None else out.copy_(y)

        return run

    def _staged(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` copied to a pinned host buffer without blocking (a plain copy on the CPU)."""
        if not t.is_cuda:
            return t
        buf = self._buffer(name, t.shape, t.dtype)
        buf.copy_(t, non_blocking=True)
        return buf

    def _buffer(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A reused host buffer; pinned when a GPU is present. Reuse is safe: each layer call
        waits for its CPU result, and later copies queue behind earlier ones on the stream."""
        numel = torch.Size(shape).numel()
        buf = self._host.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=torch.cuda.is_available())
            self._host[name] = buf
        return buf[:numel].view(shape)

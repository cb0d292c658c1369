"""The hybrid's CPU part inside a CUDA graph: a whole decode step, CPU experts included, replays
as one graph.

While a step is captured, each MoE layer's CPU part becomes, in the stream's order:

    copy x, ids, weights (and the adapter slots) into pinned host buffers
    host node: post ``ready``        -> the worker thread runs the CPU engine on those buffers
    the GPU experts' kernels          (meanwhile)
    host node: wait for ``done``     <- the worker posts it with the result in a pinned buffer
    copy the result to the GPU and add it

Each captured layer call is a HostCall. ``replay(calls, graph)`` launches the graph while a
worker thread serves its calls: it waits for each call's ``ready``, runs it, posts ``done``, in the
order they were captured. A failure in the CPU part still posts ``done`` (the stream never hangs)
and is raised in the caller once the step is over.

The pinned buffers are allocated in ``prepare`` mode, by the eager warm-up steps that come before
a capture (allocating while capturing is not allowed), one set per (layer, batch shape).

``KernelHostCalls`` (where the CPU engine is the compiled kernel; ``host_calls_in_kernel``) has
the same interface with no worker thread, no semaphores and no Python in a replay: the
host node itself runs the compiled CPU kernel on the pinned buffers (engine.KernelHostCall), and
the GPU experts run on a side stream forked in the capture, so they still overlap it:

    fork: the side stream runs the GPU experts' kernels
    map the ids to the CPU engine's experts (on the GPU), copy x, ids, weights, slots to pinned buffers
    host node: the CPU kernel on those buffers, its result into a pinned buffer
    copy the result to the GPU; join the side stream; add
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine import KernelHostCall, MoELoRAEngine
from .host_nodes import Semaphore, launch_host, launch_host_function, set_spin

# How long the worker waits for a call's inputs before it reports the replay as lost.
READY_TIMEOUT_S = 60.0
# How long the worker polls for a call's inputs before it blocks, in us (the stream's wait for the
# result never polls: it would take a core from the CPU experts). On the H200 host, one token,
# polling 300 us took 2-7% off a replayed hybrid layer; polling the result too cost 5-10%
# (benchmarks/gpu_layer.py --parts hybrid, BENCHMARKS.md).
POLL_READY_US = 300


@dataclass
class HostCall:
    layer: int
    x: torch.Tensor  # [T, H] pinned
    ids: torch.Tensor  # [T, k] pinned
    weights: torch.Tensor  # [T, k] pinned
    slots: torch.Tensor | None  # [T] on the host: pinned (staged each replay) or a constant tensor
    out: torch.Tensor  # [T, H] pinned: the CPU part's result
    ready: Semaphore
    done: Semaphore


class GraphCpuPart:
    """Captured CPU parts and the worker thread that runs them when their graph replays."""

    def __init__(self, run: Callable[[HostCall], torch.Tensor]):
        """``run(call)``: the CPU engine on a call's buffers, giving its [T, H] result."""
        self._run = run
        set_spin(POLL_READY_US, 0)
        self._buffers: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.preparing = False  # set around the eager steps before a capture: they allocate the buffers
        self.captured: list[HostCall] = []  # the calls of the capture in progress
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="expertlora-graph-cpu-experts", daemon=True).start()

    def prepare(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Allocate the pinned buffers a capture of this call will use (eager, before capture)."""
        key = (layer, tuple(x.shape), tuple(ids.shape), x.dtype, ids.dtype, weights.dtype)
        if key not in self._buffers:
            def pinned(t):
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)

            T = x.shape[0]
            self._buffers[key] = (pinned(x), pinned(ids), pinned(weights), torch.empty(T, dtype=torch.long, pin_memory=True),
                                  pinned(x))

    def capture(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                token_slots: torch.Tensor | None, gpu_part: Callable[[], torch.Tensor | None]) -> torch.Tensor:
        """Record one layer call in the graph being captured; returns its [T, H] output (the GPU
        part's result, if any, plus the CPU part's)."""
        key = (layer, tuple(x.shape), tuple(ids.shape), x.dtype, ids.dtype, weights.dtype)
        if key not in self._buffers:
            raise RuntimeError(f"layer {layer}: no pinned buffers for {tuple(x.shape)}; run one eager step in prepare mode first")
        x_h, ids_h, w_h, slots_h, out_h = self._buffers[key]
        x_h.copy_(x, non_blocking=True)
        ids_h.copy_(ids, non_blocking=True)
        w_h.copy_(weights, non_blocking=True)
        slots = token_slots
        if token_slots is not None and token_slots.is_cuda:
            slots = slots_h.copy_(token_slots, non_blocking=True)
        call = HostCall(layer, x_h, ids_h, w_h, slots, out_h, Semaphore(), Semaphore())
        stream = torch.cuda.current_stream()
        launch_host(stream, "post", call.ready)
        y = gpu_part()
        launch_host(stream, "wait", call.done)
        cpu = out_h.to(x.device, non_blocking=True)
        self.captured.append(call)
        return cpu if y is None else y + cpu

    def take_captured(self) -> list[HostCall]:
        calls, self.captured = self.captured, []
        return calls

    def replay(self, calls: list[HostCall], graph: torch.cuda.CUDAGraph) -> None:
        """Replay ``graph`` with the worker running ``calls``; returns when the step is done
        (the stream synchronised); raises what the CPU part raised."""
        # synchronize() releases the GIL while it waits: the worker runs Python too
        self.run_replay(calls, graph.replay, torch.cuda.current_stream().synchronize)

    def run_replay(self, calls: list[HostCall], start: Callable[[], None], finish: Callable[[], None]) -> None:
        """``start()`` launches the work that reaches each call's host nodes in order, without
        waiting for it; ``finish()`` waits for it to end."""
        if not calls:
            start()
            finish()
            return
        self._todo.put(calls)
        start()
        finish()
        error = self._results.get()
        if error is not None:
            raise RuntimeError(f"the CPU experts failed in a replayed step: {error}") from error

    def _serve(self, calls: list[HostCall]) -> Exception | None:
        """Each call in order: wait for its inputs, run it, post done; the first failure."""
        error = None
        for call in calls:
            if not call.ready.wait(READY_TIMEOUT_S):
                error = error or TimeoutError(f"layer {call.layer}: its inputs never arrived")
                break  # the graph is not running: posting done now would release a later replay too early
            try:
                if error is None:
                    call.out.copy_(self._run(call))
            except Exception as e:  # reported to the caller; the stream must go on
                error = e
            finally:
                call.done.post()
        return error

    def _work(self) -> None:
        while True:
            self._results.put(self._serve(self._todo.get()))


class KernelHostCalls:
    """Captured CPU parts that the graph's host nodes run themselves (see the module docstring):
    GraphCpuPart's interface, for ``engine``'s compiled kernel. ``cpu_ids(layer, ids)`` maps a
    layer's routed ids to the CPU engine's experts on the GPU (called eagerly in prepare mode
    first, so that what it needs is on the GPU before a capture)."""

    def __init__(self, engine: MoELoRAEngine, cpu_ids: Callable[[int, torch.Tensor], torch.Tensor]):
        self._engine = engine
        self._cpu_ids = cpu_ids
        self._function = KernelHostCall.function()
        self._buffers: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._side: torch.cuda.Stream | None = None  # the GPU experts' stream inside a capture
        self.preparing = False
        self.captured: list = []  # the KernelHostCall records of the capture in progress

    def prepare(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        key = (layer, tuple(x.shape), tuple(ids.shape))
        self._cpu_ids(layer, ids)
        if self._side is None:
            self._side = torch.cuda.Stream(device=x.device)
        if key not in self._buffers:
            def pinned(shape, dtype):
                return torch.empty(shape, dtype=dtype, pin_memory=True)

            T, k = ids.shape
            self._buffers[key] = (pinned(x.shape, self._engine.act_dtype), pinned((T, k), torch.int64), pinned((T, k), torch.float32),
                                  pinned((T,), torch.int64), pinned(x.shape, x.dtype), torch.full((T,), -1, dtype=torch.int64))

    def capture(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                token_slots: torch.Tensor | None, gpu_part: Callable[[], torch.Tensor | None]) -> torch.Tensor:
        key = (layer, tuple(x.shape), tuple(ids.shape))
        if key not in self._buffers:
            raise RuntimeError(f"layer {layer}: no pinned buffers for {tuple(x.shape)}; run one eager step in prepare mode first")
        x_h, ids_h, w_h, slots_h, out_h, no_slots = self._buffers[key]
        stream = torch.cuda.current_stream()
        self._side.wait_stream(stream)  # fork: the GPU experts need none of the host copies below
        with torch.cuda.stream(self._side):
            y = gpu_part()
        # dtypes converted on the GPU: the copies to the host are plain
        x_h.copy_(x.to(x_h.dtype), non_blocking=True)
        ids_h.copy_(self._cpu_ids(layer, ids).long(), non_blocking=True)
        w_h.copy_(weights.float(), non_blocking=True)
        if token_slots is None:
            slots = no_slots
        elif token_slots.is_cuda:
            slots = slots_h.copy_(token_slots.long(), non_blocking=True)
        else:  # a host tensor the replays read as it is then
            slots = token_slots
        call = self._engine.host_call(layer, x_h, ids_h, w_h, slots, out_h)
        launch_host_function(stream, self._function, call.address)
        cpu = out_h.to(x.device, non_blocking=True)
        stream.wait_stream(self._side)  # join
        self.captured.append(call)
        return cpu if y is None else y + cpu

    def take_captured(self) -> list:
        calls, self.captured = self.captured, []
        return calls

    def replay(self, calls: list, graph: torch.cuda.CUDAGraph) -> None:
        """Replay ``graph``; returns when the step is done; raises what the CPU part raised."""
        graph.replay()
        torch.cuda.current_stream().synchronize()
        errors = [e for e in (call.take_error() for call in calls) if e]
        if errors:
            raise RuntimeError(f"the CPU experts failed in a replayed step: {errors[0]}")


def host_calls_in_kernel(kernel: str) -> bool:
    """Whether the host nodes run the CPU kernel themselves (KernelHostCalls) or hand the call to a
    worker thread (GraphCpuPart), for a CPU engine whose ``kernel`` is this: the kernel where it is
    the compiled one (measured faster on the H200 host, BENCHMARKS.md), else the worker, which
    runs any CPU backend. EXPERTLORA_GRAPH_HOST_CALLS=worker|kernel overrides it (A/B runs)."""
    env = os.environ.get("EXPERTLORA_GRAPH_HOST_CALLS", "").strip()
    if env not in ("", "worker", "kernel"):
        raise ValueError(f"EXPERTLORA_GRAPH_HOST_CALLS: expected worker or kernel, found {env[:40]!r}")
    if env == "kernel" and kernel != "compiled":
        raise ValueError(f"EXPERTLORA_GRAPH_HOST_CALLS=kernel needs the compiled CPU kernel (this engine's: {kernel})")
    return env == "kernel" or (not env and kernel == "compiled")

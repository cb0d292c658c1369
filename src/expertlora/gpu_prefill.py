"""GPU prefill for CPU-resident experts: long forwards run each layer's CPU experts on the GPU.

For a forward of at least ``threshold`` tokens (the hybrid executor decides, hybrid.py), a MoE
layer's CPU experts run on the GPU instead of the CPU engine: their storage is copied there from
page-locked host memory (int8 / int4 packed, then dequantized to bf16 on the GPU), the copy of the
next layer overlapping this layer's compute, and the math is the GPU backend's own (gpu.py's
GpuMoELoRA, every adapter's LoRA included). Then the weights are dropped: two layers' buffers,
allocated once and reused.

Per layer call, in this order:
  1. the layer's storage is found in a buffer (copied there while the previous layer ran), or
     copied now (a forward's first layer);
  2. the next layer's copy is queued on the copy stream, into the other buffer, behind an event
     recorded once the last compute that read that buffer was queued;
  3. the compute stream waits for this layer's copy (an event), dequantizes int8 / int4 into the
     workspace, and runs GpuMoELoRA's grouped matmuls on the pairs of the CPU experts.
A buffer keeps its layer's tag: a layer found there again is not copied again (weights never change).

Host storage: the CPU engine's own, moved once into page-locked blocks (cudaHostRegister of
exactly their pages: torch's pinned allocator rounds each allocation up to a power of two), so
host memory holds one copy, which the CPU engine reads and the GPU copies from. Each layer's
storage is one block laid out as gate_up data, gate_up scale, down data, down scale, so a layer
is one copy.

GPU memory: two buffers of the largest layer's CPU expert storage, for int8 / int4 a bf16
workspace of one layer's CPU experts and the dequantization's temporaries (``memory_needed``);
refused at load when it is not free. The LoRA of the CPU experts is stacked on the GPU per layer
on first use, as GpuMoELoRA does for its resident experts, and stays there.

Without a GPU the same code runs on the CPU device (tests): plain copies, no streams or events.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch

from .experts import ExpertWeights
from .gpu import GpuLayer, GpuMoELoRA
from .kernels import amx_from
from .quantize import QuantizedStack
from .slots import AdapterSlots

# The default threshold per method, in tokens per forward (None: off): the smallest token count
# from which GPU prefill beat the CPU path at every larger count measured on the H200 host
# (BENCHMARKS.md, "GPU prefill for CPU-resident experts"; Qwen3-30B-A3B layers, 15 CPU threads),
# per CPU path: the kernel's AMX tiles (there 1.2x / 1.1x / 1.2x faster at these counts, 0.9x /
# 0.8x at half of each; int4's 16 not measured), and the AVX-512 path of CPUs without AMX (that
# Xeon before the kernel had tiles: 1.2x / 1.4x / 1.4x, 0.9x at half). fp32 was not measured.
# The CLI's default; load_model's is off.
DEFAULT_THRESHOLDS: dict[str, dict[str, int | None]] = {
    "amx": {"fp32": None, "bf16": 1024, "int8": 128, "int4": 32},
    "avx512": {"fp32": None, "bf16": 128, "int8": 64, "int4": 32},
}

PAGE = 4096
ALIGN = 256  # bytes: each part of a layer's block starts here (every dtype's alignment, and the GPU's)
DEQUANT_CHUNK_BYTES = 256 * 2**20  # dequantized output per step: bounds the temporaries (int4: 2 x 1/4 of it)


def default_threshold(method: str) -> int | None:
    """The measured default threshold for ``method`` on this CPU's path (None: off by default)."""
    return DEFAULT_THRESHOLDS["amx" if amx_from() else "avx512"].get(method)


def threshold_for(requested: int | None, method: str, device: str, cpu_experts: bool) -> int | None:
    """The threshold a run uses: the one asked for (0: off), else the method's measured default
    where a GPU could take CPU experts' prefill; None: off."""
    if requested is None:
        requested = default_threshold(method) if device != "cpu" and cpu_experts else None
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 0):
        raise ValueError(f"--gpu-prefill-threshold {requested!r}: expected a token count >= 0 (0: off)")
    return requested or None


@dataclass(frozen=True)
class _Part:
    """One tensor of a layer's block: where it starts, what it holds."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    def view(self, block: torch.Tensor) -> torch.Tensor:
        return block[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class _Layout:
    """Where a layer's four storage tensors sit in its block (the same on the host and the GPU)."""

    method: str
    group_sizes: tuple[int, int]
    parts: tuple[_Part, _Part, _Part, _Part]  # gate_up data, gate_up scale, down data, down scale
    nbytes: int

    @classmethod
    def of(cls, w: ExpertWeights) -> _Layout:
        parts, offset = [], 0
        for t in (w.gate_up.data, w.gate_up.scale, w.down.data, w.down.scale):
            parts.append(_Part(offset, t.dtype, tuple(t.shape)))
            offset += -(-t.nbytes // ALIGN) * ALIGN
        return cls(w.method, w.group_sizes, tuple(parts), offset)

    def weights(self, block: torch.Tensor) -> ExpertWeights:
        """The layer's storage as views into ``block``."""
        gu, gu_s, d, d_s = (p.view(block) for p in self.parts)
        return ExpertWeights(QuantizedStack(self.method, gu, gu_s, self.group_sizes[0]),
                             QuantizedStack(self.method, d, d_s, self.group_sizes[1]))


class PinnedHost:
    """Page-locked host blocks (registered with CUDA where ``pin``), unregistered when this
    object is collected; the memory itself lives on as long as any view of it."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._registered: list[torch.Tensor] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)
        self._finalizer.atexit = False  # at exit the process's memory goes anyway; CUDA may be gone first

    def block(self, nbytes: int) -> torch.Tensor:
        """A uint8 block of ``nbytes``, its first byte page-aligned."""
        if not self.pin:
            return torch.empty(nbytes, dtype=torch.uint8)
        size = -(-max(nbytes, 1) // PAGE) * PAGE
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % PAGE
        block = raw[start : start + size]  # whole pages of its own: no page shared with another block
        err = int(torch.cuda.cudart().cudaHostRegister(block.data_ptr(), size, 0))
        if err:
            raise ValueError(f"GPU prefill: could not page-lock {size / 2**30:.2f} GiB of host memory for the "
                             f"CPU experts (cudaHostRegister error {err}); turn GPU prefill off")
        self._registered.append(block)
        return block[:nbytes]


def _unregister(blocks: list[torch.Tensor]) -> None:
    for block in blocks:
        torch.cuda.cudart().cudaHostUnregister(block.data_ptr())
    blocks.clear()


@dataclass
class _Buffer:
    """One layer's worth of GPU memory and the layer it holds (or is receiving)."""

    data: torch.Tensor  # uint8 [max block bytes] on the device
    layer: int | None = None
    ready: torch.cuda.Event | None = None  # the copy into it has landed (copy stream)
    free: torch.cuda.Event | None = None  # the last compute reading it is done (compute stream)
    used: int = 0  # a clock tick: the least recently used buffer is overwritten first


class GpuPrefill:
    """The CPU experts of every MoE layer, run on the GPU for forwards of ``threshold`` tokens
    or more, with GpuMoELoRA's math and the shared adapter slots."""

    def __init__(
        self,
        threshold: int,
        layers: dict[int, ExpertWeights],  # the CPU engine's: each entry is replaced by its page-locked copy
        slots: AdapterSlots,  # the CPU engine's (the hybrid's one set of adapters)
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
    ):
        """Moves each layer's storage into page-locked memory one layer at a time (the old
        storage goes as its copy arrives), then takes the GPU buffers. Raises ValueError when the
        GPU has not that much memory free, before anything is moved."""
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"GPU prefill threshold: expected a token count >= 1, found {threshold!r}")
        self.threshold, self.device, self.dtype = threshold, torch.device(device), dtype
        E = slots.shape[0]
        self._layouts = {L: _Layout.of(w) for L, w in layers.items() if w.num_experts}
        if not self._layouts:
            raise ValueError("GPU prefill: no layer has experts on the CPU")
        method = next(iter(self._layouts.values())).method
        self._quantized = method in ("int8", "int4")
        needed = memory_needed(list(layers.values()), dtype)
        free = _free_bytes(self.device)
        if free is not None and needed > free:
            raise ValueError(f"GPU prefill: needs {needed / 2**30:.2f} GiB of GPU memory (two layers of CPU experts"
                             f"{', a bf16 workspace' if self._quantized else ''}), {free / 2**30:.2f} GiB free; "
                             "put fewer experts on the GPU or turn GPU prefill off")

        cuda = self.device.type == "cuda"
        self._host = PinnedHost(pin=cuda)
        self._blocks: dict[int, torch.Tensor] = {}
        for L, layout in self._layouts.items():
            block = self._host.block(layout.nbytes)
            pinned = layout.weights(block)
            w = layers[L]
            for dst, src in zip((pinned.gate_up.data, pinned.gate_up.scale, pinned.down.data, pinned.down.scale),
                                (w.gate_up.data, w.gate_up.scale, w.down.data, w.down.scale)):
                dst.copy_(src)
            layers[L] = pinned
            self._blocks[L] = block
        order = sorted(self._layouts)
        self._next = dict(zip(order, order[1:]))  # a forward visits layers in id order; the last prefetches nothing

        capacity = max(layout.nbytes for layout in self._layouts.values())
        self._buffers = [_Buffer(torch.empty(capacity, dtype=torch.uint8, device=self.device)) for _ in range(2)]
        if cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            for b in self._buffers:
                b.ready, b.free = torch.cuda.Event(), torch.cuda.Event()
        self._workspace = None
        if self._quantized:  # one layer's CPU experts in bf16: int8 / int4 are dequantized into it
            Emax = max(layers[L].num_experts for L in self._layouts)
            first = layers[order[0]]
            H, I = first.hidden_size, first.intermediate_size
            self._workspace = (torch.empty(Emax, 2 * I, H, dtype=dtype, device=self.device),
                               torch.empty(Emax, H, I, dtype=dtype, device=self.device))

        # The GPU backend runs whatever weights its layer entry names: the entry is pointed at this
        # call's buffer (or workspace) before each call. Its adapters are the hybrid's.
        self._gpu = GpuMoELoRA(self.device, dtype, slots, fused=False)
        self._gpu.graphs = False  # buffers alternate between calls: a captured graph would read the wrong one
        self._templates = {}
        for L in self._layouts:
            held = slots.experts.get(L, torch.arange(E))
            group = torch.full((E + 1,), len(held), dtype=torch.int64)  # the GPU's own experts and id E: skipped
            group[held] = torch.arange(len(held))
            elsewhere = torch.full((E + 1,), -1, dtype=torch.int64)
            others = (group[:E] == len(held)).nonzero().squeeze(1)
            elsewhere[others] = torch.arange(len(others))
            self._templates[L] = GpuLayer(group.to(self.device), elsewhere, held, torch.empty(0), torch.empty(0))
            self._gpu.layers[L] = self._templates[L]
        self._clock = 0
        self.copies = 0  # layers copied so far (benchmarks, tests)

    def runs(self, x: torch.Tensor) -> bool:
        """Whether a forward with these activations runs the CPU experts here (not while a CUDA
        graph is being captured: the copies and their events are not graph work)."""
        return x.shape[0] >= self.threshold and not (x.is_cuda and torch.cuda.is_current_stream_capturing())

    def adapters_changed(self) -> None:
        """Stack every layer's LoRA of the CPU experts on the GPU for the current adapters now
        (between steps), not on the next long forward."""
        self._gpu.adapters_changed()

    def forward(
        self,
        layer: int,
        x: torch.Tensor,  # [T, H] on the device
        topk_ids: torch.Tensor,  # [T, k] model expert ids
        topk_weights: torch.Tensor,  # [T, k]
        token_slots: torch.Tensor | None = None,  # [T] on the device; None: no adapter
    ) -> torch.Tensor:  # [T, H] float32: the CPU experts' share of the layer's output
        buf = self._fetch(layer)
        if layer in self._next:
            self._fetch(self._next[layer])  # into the other buffer: this layer's was used last
        gate_up, down = self._weights(buf, layer)
        self._gpu.layers[layer] = replace(self._templates[layer], gate_up=gate_up, down=down)
        y = self._gpu.forward(layer, x, topk_ids, topk_weights, token_slots)
        if not self._quantized:
            self._released(buf)
        return y

    def _fetch(self, layer: int) -> _Buffer:
        """The buffer that holds (or will hold) ``layer``: found, or the least recently used one
        overwritten by a copy queued behind its last reader."""
        self._clock += 1
        for b in self._buffers:
            if b.layer == layer:
                b.used = self._clock
                return b
        b = min(self._buffers, key=lambda b: b.used)
        block = self._blocks[layer]
        if self.device.type == "cuda":
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(b.free)
                b.data[: block.numel()].copy_(block, non_blocking=True)  # page-locked: a DMA, this thread goes on
                b.ready.record(self._copy_stream)
        else:
            b.data[: block.numel()].copy_(block)
        b.layer, b.used = layer, self._clock
        self.copies += 1
        return b

    def _weights(self, buf: _Buffer, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [Ec, 2I, H], down [Ec, H, I]) in the compute dtype, once the copy has landed."""
        if buf.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(buf.ready)
        w = self._layouts[layer].weights(buf.data)
        if not self._quantized:
            return w.gate_up.data, w.down.data
        out = (dequantize_into(self._workspace[0], w.gate_up), dequantize_into(self._workspace[1], w.down))
        self._released(buf)  # the packed copy is read: the next copy into it may start
        return out

    def _released(self, buf: _Buffer) -> None:
        if buf.free is not None:
            buf.free.record(torch.cuda.current_stream(self.device))


def dequantize_into(out: torch.Tensor, stack: QuantizedStack) -> torch.Tensor:
    """``stack``'s int8 / int4 weights in ``out``'s dtype, written to out[:E] ([E, N, K]), in
    chunks of experts so that the temporaries stay small. The values are quantize.py's
    (QuantizedStack.dequantize), rounded once to out's dtype."""
    E, N, K = stack.num_experts, stack.out_features, stack.in_features
    out = out[:E]
    per = max(1, DEQUANT_CHUNK_BYTES // max(1, N * K * out.element_size()))
    for s in range(0, E, per):
        e = slice(s, min(E, s + per))
        o, data, scale = out[e], stack.data[e], stack.scale[e]
        if stack.method == "int8":
            torch.mul(data, scale, out=o)  # [n, N, K] int8 · [n, N, 1] fp32
            continue
        n, G = data.shape[0], scale.shape[2]
        packed = data.view(n, N, G, stack.group_size // 2)  # the bytes of each group
        pairs = o.view(n, N, G, stack.group_size // 2, 2)  # element 2j: the low nibble, 2j + 1: the high one
        group_scale = scale.unsqueeze(-1)  # [n, N, G, 1]
        torch.mul((packed & 0x0F).view(torch.int8) - 8, group_scale, out=pairs[..., 0])
        torch.mul((packed >> 4).view(torch.int8) - 8, group_scale, out=pairs[..., 1])
    return out


def memory_needed(layers: list[ExpertWeights], dtype: torch.dtype = torch.bfloat16) -> int:
    """GPU bytes GPU prefill takes for these layers' CPU experts: two buffers of the largest
    layer's storage; for int8 / int4 also a ``dtype`` workspace of one layer and the
    dequantization's temporaries. The grouped matmuls' activations come on top (at 2048 tokens
    of a Qwen3-30B-A3B layer, some 0.3 GB)."""
    held = [w for w in layers if w.num_experts]
    if not held:
        return 0
    need = 2 * max(_Layout.of(w).nbytes for w in held)
    if held[0].method in ("int8", "int4"):
        E = max(w.num_experts for w in held)
        H, I = held[0].hidden_size, held[0].intermediate_size
        need += 3 * E * H * I * dtype.itemsize + DEQUANT_CHUNK_BYTES
    return need


def _free_bytes(device: torch.device) -> int | None:
    """GPU memory this process can still take (free, plus what torch's allocator holds unused);
    None on the CPU device."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

"""The CPU MoE-LoRA engine: every MoE layer's expert weights plus the loaded adapters.

    engine = MoELoRAEngine({L: ExpertWeights.from_tensors(gate, up, down, "int8")})
    engine.load_adapter("math", load_adapter("math.safetensors"))
    y = engine.forward(L, x, topk_ids, topk_weights, token_slots)   # [T, H]

token_slots holds each token's adapter slot (``engine.slot("math")``) or -1 for none.
The compiled kernel runs where it builds; the PyTorch path (moe.moe_forward_torch) is the
portable fallback, chosen once at construction. The one choice per call: where the CPU has AMX
but the kernel's AMX tiles are off (EXPERTLORA_AMX=0), large bf16 batches go to the PyTorch
path, whose oneDNN matmuls use AMX (``onednn_from``).
"""

from __future__ import annotations

import os
import weakref

import torch

from .experts import ExpertWeights
from .kernels import (
    METHOD_CODES,
    KernelUnavailable,
    amx_from,
    cpu_kernel,
    has_amx,
    kernel_ops,
    warn_unavailable,
)
from .lora import ExpertLoRA
from .moe import moe_forward_torch
from .slots import NO_ADAPTER, AdapterSlots

KERNELS = ("auto", "compiled", "torch")
# bf16 batches with this many tokens per expert go to PyTorch's oneDNN matmuls where the CPU has
# AMX and the kernel's own AMX tiles are off: measured against the kernel's AVX-512 path
# (BENCHMARKS.md, run A). With the tiles on, the kernel is 5.5x faster than oneDNN at 128 tokens
# per expert (BENCHMARKS.md "The oneDNN rule against the AMX tiles"), so it runs every size.
ONEDNN_TOKENS_PER_EXPERT = 96


class MoELoRAEngine:
    """Runs MoE layers on the CPU with per-token LoRA adapters."""

    def __init__(
        self,
        layers: dict[int, ExpertWeights],
        threads: int | None = None,
        kernel: str = "auto",
        onednn_from: float | None = None,
        experts: dict[int, torch.Tensor] | None = None,
        num_experts: int | None = None,
    ):
        """``kernel``: ``auto`` (compiled where it builds), ``compiled`` or ``torch``.
        ``experts``: per layer, the model's ids of the experts ``layers`` holds, where it holds
        only some (the CPU side of the hybrid, called with ids in that order); ``num_experts``
        is then the model's expert count, which adapters have.
        ``onednn_from``: bf16 batches with at least this many tokens per expert run on
        PyTorch's matmuls, which use AMX through oneDNN; by default 96 where the CPU has
        AMX but the kernel's AMX tiles are off (against the AVX-512 path on the device's
        Xeon: 128 tokens per expert ran 2.4x faster there, 48 ran 1.5x slower), else never."""
        if not layers:
            raise ValueError("the engine needs at least one MoE layer")
        first = next(iter(layers.values()))
        experts = experts or {}
        shape = (num_experts or first.num_experts, first.hidden_size, first.intermediate_size)
        for L, w in layers.items():
            held = len(experts[L]) if L in experts else shape[0]
            if (w.num_experts, w.hidden_size, w.intermediate_size) != (held, *shape[1:]) or w.method != first.method:
                raise ValueError(f"layer {L}: experts differ from the first layer's ({first.method}, E/H/I {shape})")
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
        self.layers = layers
        self.method = first.method
        self.threads = threads or available_cores()
        # Activations and LoRA run in fp32 with fp32 weights, else in bf16 (fp32 accumulation).
        self.act_dtype = torch.float32 if self.method == "fp32" else torch.bfloat16
        self.slots = AdapterSlots(*shape, self.act_dtype, experts)
        self._kernel = None if kernel == "torch" else _compiled(first, required=kernel == "compiled")
        self.amx_from = amx_from()  # the kernel's experts with this many tokens use AMX tiles (0: never)
        if onednn_from is None and self.method == "bf16" and has_amx() and not self.amx_from:
            onednn_from = ONEDNN_TOKENS_PER_EXPERT
        self.onednn_from = onednn_from

    @property
    def kernel(self) -> str:
        """Which path runs: ``compiled`` or ``torch``."""
        return "torch" if self._kernel is None else "compiled"

    def prepare_adapter(self, adapter: ExpertLoRA) -> dict:
        """Every layer's engine form of ``adapter`` (no state changes; any thread)."""
        return self.slots.prepare(adapter)

    def load_adapter(self, name: str, adapter: ExpertLoRA, prepared: dict | None = None) -> int:
        """Load ``adapter`` beside the others; returns its slot for token_slots."""
        return self.slots.load(name, adapter, prepared)

    def adapters_changed(self) -> None:
        for layer in self.layers:  # the compiled kernel's per-slot argument lists
            self.slots.kernel_args(layer)

    def unload_adapter(self, name: str) -> None:
        self.slots.unload(name)

    def slot(self, name: str | None) -> int:
        return self.slots.index(name)

    def token_slots(self, names: list[str | None]) -> torch.Tensor:
        """Per-token slot tensor from per-token adapter names (None for no adapter)."""
        return self.slots.token_slots(names)

    def forward(
        self,
        layer: int,
        x: torch.Tensor,  # [T, H]
        topk_ids: torch.Tensor,  # [T, k]; ids outside [0, E) are skipped
        topk_weights: torch.Tensor,  # [T, k]
        token_slots: torch.Tensor | None = None,  # [T]; None: no token has an adapter
    ) -> torch.Tensor:  # [T, H] in x's dtype
        """One MoE layer: Σ_j w_j · expert_j(x) with each token's own LoRA."""
        weights = self.layers[layer]
        T = x.shape[0]
        if token_slots is None:
            token_slots = torch.full((T,), NO_ADAPTER, dtype=torch.int64)
        self._check(x, topk_ids, topk_weights, token_slots, weights)
        if self._kernel is None or self._onednn(topk_ids, weights.num_experts):
            y = moe_forward_torch(weights, x, topk_ids, topk_weights, token_slots, self.slots.layer(layer))
        else:
            y = self._kernel(
                x.to(self.act_dtype).contiguous(),
                topk_ids.to(torch.int64).contiguous(),
                topk_weights.float().contiguous(),
                token_slots.to(torch.int64).contiguous(),
                weights.gate_up.data, weights.gate_up.scale, weights.down.data, weights.down.scale,
                METHOD_CODES[self.method], *weights.group_sizes,
                *self.slots.kernel_args(layer),
                self.threads,
                self.amx_from,
            )
        return y.to(x.dtype)

    def host_call(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, token_slots: torch.Tensor,
                  out: torch.Tensor) -> KernelHostCall:
        """``layer``'s forward on these host buffers into ``out``, as a record a CUDA host function
        runs (``KernelHostCall.function()``) with no Python: x in the activation dtype, ids int64, weights
        float32, token_slots int64, all contiguous [T, ...], out [T, H]. The kernel path alone
        (never oneDNN's), with the adapters loaded now."""
        if self._kernel is None:
            raise KernelUnavailable("host calls need the compiled CPU kernel")
        weights_of = self.layers[layer]
        T = x.shape[0]
        expected = ((x, self.act_dtype, (T, weights_of.hidden_size)), (ids, torch.int64, (T, ids.shape[1])),
                    (weights, torch.float32, tuple(ids.shape)), (token_slots, torch.int64, (T,)), (out, out.dtype, (T, weights_of.hidden_size)))
        for t, dtype, shape in expected:
            if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"host call buffers: expected contiguous {dtype} {list(shape)} on the CPU, found {t.dtype} {list(t.shape)}")
        return KernelHostCall(
            x, ids, weights, token_slots, out, weights_of.gate_up.data, weights_of.gate_up.scale, weights_of.down.data,
            weights_of.down.scale, METHOD_CODES[self.method], *weights_of.group_sizes, *self.slots.kernel_args(layer),
            threads=self.threads, amx_from=self.amx_from,
        )

    def _onednn(self, topk_ids: torch.Tensor, num_experts: int) -> bool:
        """Large bf16 batches, AMX tiles off: oneDNN's AMX matmuls beat the kernel's AVX-512 dot products."""
        return self.onednn_from is not None and topk_ids.numel() / max(num_experts, 1) >= self.onednn_from

    def _check(self, x, topk_ids, topk_weights, token_slots, weights: ExpertWeights) -> None:
        T = x.shape[0]
        if x.dim() != 2 or x.shape[1] != weights.hidden_size:
            raise ValueError(f"x: expected [T, {weights.hidden_size}], found {list(x.shape)}")
        if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_ids / topk_weights: expected [{T}, k] both, found {list(topk_ids.shape)} / {list(topk_weights.shape)}"
            )
        if token_slots.shape != (T,):
            raise ValueError(f"token_slots: expected [{T}], found {list(token_slots.shape)}")
        if self._kernel is not None and not self.slots.has_empty_slots:
            return  # the kernel checks the slot range itself; unique() costs microseconds per call
        used = [s for s in token_slots.unique().tolist() if s != NO_ADAPTER]
        bad = [s for s in used if not self.slots.is_loaded(s)]
        if bad:
            loaded = ", ".join(f"{n}={self.slots.index(n)}" for n in self.slots.names) or "none"
            raise ValueError(f"token_slots: slot {bad[0]} holds no adapter (loaded: {loaded})")


class KernelHostCall:
    """One layer call of the compiled kernel on fixed host buffers (csrc HostCall), for a CUDA
    host function: ``function()(address)`` runs it, storing any error instead of raising; the
    caller reads it with ``take_error`` once the stream is done. Freed with this object."""

    def __init__(self, x, ids, weights, token_slots, out, w_gu, s_gu, w_d, s_d, method: int, group_gu: int, group_d: int,
                 a_gu, bt_g, bt_u, a_d, bt_d, *, threads: int, amx_from: int):
        self._ops = kernel_ops()  # the record holds the tensors (references counted): they live as long as it does
        self.address = self._ops.host_call_new(x, ids, weights, token_slots, out, w_gu, s_gu, w_d, s_d, method, group_gu, group_d,
                                               a_gu, bt_g, bt_u, a_d, bt_d, threads, amx_from)
        weakref.finalize(self, self._ops.host_call_free, self.address)  # with this object, or at exit

    @staticmethod
    def function() -> int:
        """The host function's address (``void f(void* address)``, cuLaunchHostFunc's kind)."""
        return kernel_ops().host_call_function()

    def run(self) -> None:
        """What the host function does, called from here (tests; no stream)."""
        self._ops.host_call_run(self.address)

    def take_error(self) -> str:
        """The last run's error ("" if none), cleared."""
        return self._ops.host_call_take_error(self.address)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _compiled(weights: ExpertWeights, required: bool):
    H, I = weights.hidden_size, weights.intermediate_size
    if H % 32 or I % 32:  # every real MoE model's are; tiny test models' may not be
        if required:
            raise KernelUnavailable(f"hidden {H} and intermediate {I} must be multiples of 32")
        return None
    try:
        return cpu_kernel()
    except KernelUnavailable as err:
        if required:
            raise
        warn_unavailable(str(err))
        return None

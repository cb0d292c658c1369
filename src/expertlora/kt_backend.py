"""The ``kt`` backend: kt-kernel's SFT MoE (the seed's AMXBF16_SFT / AMXINT4_SFT) behind the
engine's API, for AMX servers and for measuring our cpu backend against it.

kt-kernel (``pip install --no-deps kt-kernel``; it imports ``gguf``) holds one LoRA per layer
with one rank and scaling alpha / r for gate, up and down alike. Any canonical adapter fits
that: each projection is zero-padded to the layer's largest rank and its own scaling is folded
into B (kt's alpha is set equal to its rank, so its scaling is 1). What it cannot do is mix
adapters in one batch: a batch runs one adapter, or none, and switching copies the LoRA in
place (then ``update_lora_weights``, as kt-kernel requires).

Shape legend: E = experts, H = hidden, I = intermediate, r = the layer's kt rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from .engine import available_cores
from .experts import ExpertWeights
from .kt_layout import kt_numa_parts
from .lora import ExpertLoRA, LayerLoRA, ProjLoRA
from .slots import NO_ADAPTER, AdapterSlots

KT_METHODS = ("AMXBF16_SFT", "AMXINT4_SFT")  # the ones kt-kernel loads from tensors
KT_FILE_METHODS = ("AMXINT8_SFT", "AMXINT4_SFT")  # the ones it loads from its converter's files (weight_path)
MAX_TOKENS = 4096  # kt-kernel's chunked_prefill_size: longer batches run in chunks


# kt-kernel 0.7.2's weight buffers (operators/amx/la/amx_buffers.hpp and amx_kernels.hpp) need
# every input size k and output size n of its matmuls in whole steps: n % 32 (N_STEP) and
# k % 32 for BF16 (K_STEP), k % 64 for INT8, k % 128 for INT4 (B_K_STEP = 2 * K_STEP). Its
# intermediate size is per NUMA part. Other shapes crash the process (BF16: a segfault at the
# first forward, e.g. I = 48) or fail inside kt-kernel's constructor, so they are refused first.
KT_SIZE_STEP = {"AMXBF16_SFT": 32, "AMXINT8_SFT": 64, "AMXINT4_SFT": 128}


class KtUnavailable(ValueError):
    pass


def check_kt_shapes(kt_method: str, hidden: int, intermediate: int, weight_path: str | None = None,
                    layers: Iterable[int] = ()) -> None:
    """Refuse (KtUnavailable, one line) the sizes kt-kernel's ``kt_method`` cannot run: the hidden
    size and each NUMA part's intermediate size must be whole multiples of its step."""
    step = KT_SIZE_STEP.get(kt_method)
    if step is None:
        raise KtUnavailable(f"kt backend: unknown method {kt_method}; expected one of {', '.join(KT_SIZE_STEP)}")
    parts = {kt_numa_parts(weight_path, L) for L in layers} if weight_path else {1}
    for p in sorted(parts):
        if hidden % step or intermediate % p or (intermediate // p) % step:
            per_part = f" per NUMA part ({p} parts)" if p > 1 else ""
            raise KtUnavailable(
                f"--backend kt: kt-kernel's {kt_method} runs hidden and intermediate sizes{per_part} that are multiples of {step}, "
                f"not hidden {hidden}, intermediate {intermediate}; use --backend cpu (any size)"
            )


def kt_method(method: str, from_files: bool = False) -> str:
    """Our method name -> kt-kernel's SFT method; what kt cannot load is refused. ``from_files``:
    the experts come from kt-kernel's converted files (--kt-weight-path), which int8 needs."""
    if from_files and method in ("int8", "int4"):
        return {"int8": "AMXINT8_SFT", "int4": "AMXINT4_SFT"}[method]
    kt = {"bf16": "AMXBF16_SFT", "int4": "AMXINT4_SFT"}.get(method)
    if kt is None:
        raise KtUnavailable(
            f"the kt backend runs bf16 (AMXBF16_SFT) or int4 (AMXINT4_SFT), not {method}: kt-kernel's INT8 SFT "
            "reads only its own pre-converted .kt files (--kt-weight-path); use the cpu backend for fp32 and int8"
        )
    return kt


class KtMoEEngine:
    """kt-kernel's SFT forward per MoE layer, with the slots and forward of MoELoRAEngine.

    With ``weight_path`` (a folder kt-kernel's convert_cpu_weights.py wrote), kt-kernel loads its own
    pre-quantized files and ``layers`` only give the sizes (e.g. from ``kt_layout.read_kt_layer``)."""

    def __init__(
        self,
        layers: dict[int, ExpertWeights],
        kt_method: str = "AMXBF16_SFT",
        threads: int | None = None,
        weight_path: str | None = None,
    ):
        try:
            with keeping_denormals():
                from kt_kernel import KTMoEWrapper  # noqa: F401
        except ImportError as e:
            raise KtUnavailable(
                f"--backend kt needs kt-kernel ({e.name} is missing): pip install --no-deps kt-kernel gguf; "
                "or use the cpu backend"
            ) from None
        if weight_path is not None and kt_method not in KT_FILE_METHODS:
            raise KtUnavailable(f"kt backend: weight_path holds converted INT8 / INT4 files, for {' or '.join(KT_FILE_METHODS)}, not {kt_method}")
        if weight_path is None and kt_method not in KT_METHODS:
            raise KtUnavailable(
                f"kt backend: method {kt_method} cannot load from tensors here (expected one of {', '.join(KT_METHODS)}; "
                "INT8 SFT wants kt-kernel's own .kt files); or use the cpu backend"
            )
        first = next(iter(layers.values()))
        # shapes kt-kernel cannot run crash the process: refused here, before it sees them
        check_kt_shapes(kt_method, first.hidden_size, first.intermediate_size, weight_path, layers)
        if weight_path is None and first.method != "bf16":
            raise KtUnavailable(f"kt backend: give it bf16 expert weights (kt-kernel quantizes them itself), not {first.method}")
        self.layers = layers
        self.kt_method = kt_method
        self.weight_path = weight_path
        self.method = first.method
        # kt-kernel on every core runs many times slower than with one core left free.
        self.threads = threads or max(1, available_cores() - 1)
        # Slots for names and numbers; kt-kernel takes the adapters themselves, never their engine form.
        self.slots = AdapterSlots(first.num_experts, first.hidden_size, first.intermediate_size, torch.bfloat16)
        self._wrappers: dict[int, _KtLayer] = {}

    kernel = "kt"

    def prepare_adapter(self, adapter: ExpertLoRA) -> dict:
        return self.slots.prepare(adapter)

    def load_adapter(self, name: str, adapter: ExpertLoRA, prepared: dict | None = None) -> int:
        return self.slots.load(name, adapter, prepared)

    def adapters_changed(self) -> None:
        """Nothing to rebuild: kt-kernel takes an adapter's weights when a batch first uses it."""

    def unload_adapter(self, name: str) -> None:
        slot = self.slots.index(name)
        self.slots.unload(name)
        for wrapper in self._wrappers.values():
            if wrapper.active == slot:
                wrapper.active = None

    def slot(self, name: str | None) -> int:
        return self.slots.index(name)

    def token_slots(self, names: list[str | None]) -> torch.Tensor:
        return self.slots.token_slots(names)

    def forward(self, layer, x, topk_ids, topk_weights, token_slots=None) -> torch.Tensor:
        slot = NO_ADAPTER
        if token_slots is not None and token_slots.numel():
            used = token_slots.unique().tolist()
            if len(used) > 1:
                raise ValueError("the kt backend runs one adapter per batch (kt-kernel holds one LoRA); use the cpu backend for mixed batches")
            slot = used[0]
        adapter = None if slot == NO_ADAPTER else self.slots.adapter(slot)
        wrapper = self._layer(layer, topk_ids.shape[1])
        wrapper.activate(slot, adapter)
        _fit_shared_buffer(x.shape[1], topk_ids.shape[1])
        out = [wrapper.kt.forward(x[i : i + MAX_TOKENS].to(torch.bfloat16).contiguous(),
                                  topk_ids[i : i + MAX_TOKENS].to(torch.int64).contiguous(),
                                  topk_weights[i : i + MAX_TOKENS].float().contiguous(), save_for_backward=False)
               for i in range(0, x.shape[0], MAX_TOKENS)]
        return (torch.cat(out) if out else x.new_zeros(0, x.shape[1])).to(x.dtype)

    def _layer(self, layer: int, k: int) -> _KtLayer:
        """This layer's wrapper, (re)built when an adapter needs a larger rank or k changes."""
        rank = max([1] + [_rank(a.layers.get(layer)) for a in self.slots.adapters()])
        wrapper = self._wrappers.get(layer)
        if wrapper is None or wrapper.rank < rank or wrapper.k != k:
            self._wrappers[layer] = wrapper = _KtLayer(self.layers[layer], layer, rank, k, self.kt_method, self.threads, self.weight_path)
        return wrapper


@contextlib.contextmanager
def keeping_denormals():
    """The calling thread's denormal mode as it was before: importing kt-kernel turns on
    flush-to-zero there, which would change every later float computation of this thread (our
    CPU kernel's and torch's results with it)."""
    tiny = torch.tensor([1e-39])
    flushed = bool((tiny * 1.0).item() == 0.0)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushed)


def _fit_shared_buffer(hidden: int, k: int) -> None:
    """kt-kernel 0.7.2 keeps one input buffer for all its wrappers, grown by token count only:
    drop it when it was made for another shape (another model or top-k in this process)."""
    from kt_kernel.sft.base import KExpertsSFTBuffer

    buf = KExpertsSFTBuffer._shared_buffer
    if buf is not None and (buf.hidden_size, buf.num_experts_per_tok) != (hidden, k):
        KExpertsSFTBuffer._shared_buffer = None


def _rank(lora: LayerLoRA | None) -> int:
    return max((p.spec.rank for p in lora.projections().values()), default=0) if lora else 0


class _KtLayer:
    """One kt-kernel SFT wrapper and the LoRA tensors it points at (changed in place)."""

    def __init__(self, weights: ExpertWeights, layer: int, rank: int, k: int, kt_method: str, threads: int,
                 weight_path: str | None = None):
        from kt_kernel import KTMoEWrapper

        E, H, I = weights.num_experts, weights.hidden_size, weights.intermediate_size
        self.rank, self.k, self.active = rank, k, None
        # Converted files are split in NUMA parts, and kt-kernel wants one thread pool per part.
        parts = kt_numa_parts(weight_path, layer) if weight_path else 1
        self.kt = KTMoEWrapper(
            layer_idx=layer, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
            gpu_experts_mask=None, cpuinfer_threads=max(threads, parts), threadpool_count=parts, weight_path=weight_path or "",
            chunked_prefill_size=MAX_TOKENS, method=kt_method, mode="sft", lora_rank=rank, lora_alpha=float(rank),
            max_cache_depth=1,
        )
        if weight_path:
            self.kt.load_weights(torch.arange(E))
        else:
            gate_up = weights.gate_up.data
            self.kt.load_weights_from_tensors(gate_up[:, :I].contiguous(), gate_up[:, I:].contiguous(), weights.down.data, torch.arange(E))
        shapes = {"gate": ((E, rank, H), (E, I, rank)), "up": ((E, rank, H), (E, I, rank)), "down": ((E, rank, I), (E, H, rank))}
        self.lora = {p: (torch.zeros(a, dtype=torch.bfloat16), torch.zeros(b, dtype=torch.bfloat16)) for p, (a, b) in shapes.items()}
        tensors = [t for p in ("gate", "up", "down") for t in self.lora[p]]
        self.kt.init_lora_weights(*tensors, *[torch.zeros_like(t) for t in tensors])

    def activate(self, slot: int, adapter: ExpertLoRA | None) -> None:
        if slot == self.active:
            return
        lora = adapter.layers.get(self.kt.layer_idx) if adapter else None
        for p, (a, b) in self.lora.items():
            proj: ProjLoRA | None = getattr(lora, p) if lora else None
            a.zero_()
            b.zero_()
            if proj is not None:
                r = proj.spec.rank
                a[:, :r] = proj.a.to(torch.bfloat16)
                b[:, :, :r] = (proj.b.float() * proj.spec.scaling).to(torch.bfloat16)
        self.kt.update_lora_weights()
        self.active = slot

"""Our engine inside a transformers (>= 5) model, through transformers' own extension point.

An experts implementation named ``expertlora`` is registered in
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` and selected on the model, so the
model's own router calls ``MoELoRAEngine.forward`` for every MoE layer. The model is built with
empty (meta) experts: the checkpoint's experts are read once, into engine storage, and the rest
of the checkpoint loads as usual. Non-expert LoRA (attention, shared experts, dense MLP) runs in
TokenLoRALinear, a swap for each targeted linear layer that adds each token's own adapter, so
one batch mixes adapters everywhere: PEFT's mixed batches (``adapter_names``) need every LoRA
layer to see [batch, ...] inputs, which a shared expert (fed [tokens, H]) does not.

Needs the ``hf`` extra (transformers, and accelerate to build the model with empty experts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .engine import MoELoRAEngine
from .errors import AdapterError
from .lora import ExpertLoRA
from .quantize import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES
from .slots import NO_ADAPTER

EXPERTS_IMPLEMENTATION = "expertlora"


class BatchAdapters:
    """Each sequence's adapter slot for the forward in progress; shared by every MoE layer and
    every TokenLoRALinear of the model."""

    def __init__(self):
        self.set(None)

    def set(self, seq_slots: torch.Tensor | None) -> None:
        """``seq_slots`` [B]: each sequence's slot, NO_ADAPTER for none; None: no adapters.
        (A packed batch passes one slot per token: each token is then a sequence of one.)"""
        self.seq_slots = seq_slots
        distinct = [NO_ADAPTER] if seq_slots is None else seq_slots.unique().tolist()
        # The slot every token shares (NO_ADAPTER: none has one), else None: the batch mixes.
        self.shared_slot = distinct[0] if len(distinct) == 1 else None
        self._token_slots: dict[int, torch.Tensor] = {}
        self._static: torch.Tensor | None = None

    def set_static(self, token_slots: torch.Tensor) -> None:
        """A packed step whose experts all run on ``token_slots``' device (a CUDA graph step):
        every layer gets this very tensor, whatever device it asks for, and the batch counts as
        mixed without reading the values, so nothing waits on the device."""
        self.set(None)
        self.seq_slots, self.shared_slot, self._static = token_slots, None, token_slots

    def token_slots(self, num_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Per-token slots for the B * S tokens of the batch in flattened (sequence-major) order,
        on ``device``; None when no sequence has an adapter."""
        if self.shared_slot == NO_ADAPTER:
            return None
        if self._static is not None:
            if num_tokens != self._static.numel():
                raise ValueError(f"{num_tokens} tokens, but the step has {self._static.numel()} slots")
            return self._static
        device = torch.device(device)
        key = (num_tokens, device)
        if key not in self._token_slots:  # once per forward, not once per layer
            B = self.seq_slots.shape[0]
            if num_tokens % B:
                raise ValueError(f"{num_tokens} tokens do not split into {B} sequences")
            self._token_slots[key] = self.seq_slots.repeat_interleave(num_tokens // B).to(device)
        return self._token_slots[key]


class TokenLoRALinear(torch.nn.Module):
    """A linear layer of the model plus per-token LoRA: each token adds its own adapter's
    s·(x·Aᵀ)·Bᵀ; tokens without one get exactly the base layer's output."""

    def __init__(self, base: torch.nn.Linear, batch: BatchAdapters):
        super().__init__()
        self.base, self.batch = base, batch
        self.loras: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A [r, in], s·B [out, r]), fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.loras:
            return y
        shared = self.batch.shared_slot
        if shared is not None:  # decode of one sequence, or one adapter for all: no row gathering
            if shared in self.loras:
                y += _lora_delta(x, *self.loras[shared]).to(y.dtype)
            return y
        # Mixed: each adapter on every row, kept where the row is its own. Its LoRA costs ~1% of
        # the layer per adapter, and nothing waits on the GPU (a decode step can be a CUDA graph).
        slots = self.batch.token_slots(x[..., 0].numel(), x.device)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # [N, in], [N, out]
        for slot, (a, b) in self.loras.items():
            y2 += torch.where((slots == slot)[:, None], _lora_delta(x2, a, b), 0.0).to(y.dtype)
        return y


def _lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x.float() @ a.T) @ b.T


@dataclass
class ExpertsBinding:
    """What one model experts module needs to call the engine: set on the module at build."""

    engine: MoELoRAEngine
    layer: int
    batch: BatchAdapters
    routing_counts: torch.Tensor | None = None  # [E] int64: when set, each routed pair is counted here




def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The registered experts implementation: transformers' signature, our engine."""
    b: ExpertsBinding = self.expertlora
    if b.routing_counts is not None:  # expertlora profile: which experts this layer's tokens chose
        ids = top_k_index.flatten().cpu()
        b.routing_counts += torch.bincount(ids[(ids >= 0) & (ids < b.routing_counts.numel())], minlength=b.routing_counts.numel())
    slots = b.batch.token_slots(hidden_states.shape[0])
    return b.engine.forward(b.layer, hidden_states, top_k_index, top_k_weights, slots)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


@dataclass
class LoadedModel:
    """A transformers model whose MoE layers run on our engine, with its adapters."""

    model: torch.nn.Module  # the transformers model
    engine: MoELoRAEngine
    batch: BatchAdapters
    checkpoint: Checkpoint
    adapters: dict[str, ExpertLoRA] = field(default_factory=dict)

    def use(self, names: list[str | None]) -> None:
        """Select each sequence's adapter (a name, or None) for the next forward / generate."""
        self.batch.set(self.engine.token_slots(names))


def load_model(
    model_dir: str | Path,
    method: str = "bf16",
    dtype: torch.dtype | None = None,
    adapters: dict[str, ExpertLoRA | str | Path] | None = None,
    threads: int | None = None,
    group_size: int | None = None,
    progress: Callable | None = None,
    backend: str = "cpu",
    device: str = "cpu",
    gpu_masks: dict[int, torch.Tensor] | None = None,
    kt_weight_path: str | Path | None = None,
    gpu_prefill_threshold: int | None = None,
) -> LoadedModel:
    """Build the model of ``model_dir`` with its experts in ``method`` on our engine.

    ``dtype`` is that of the non-expert layers: float32 with ``fp32``, else bfloat16 unless
    given. ``adapters``: name -> an ExpertLoRA, or the path of an adapter in any format
    (read with ``formats.load_adapter`` against this model's config.json). ``group_size``
    (int4): by default each projection's own, the largest of 128 / 64 / 32 that divides its
    input size (H for gate_up, I for down), else one group per row; a forced one (32, 64 or 128)
    must divide both. ``progress(iterable, description)`` wraps the per-layer
    loading (a rich bar in the CLI). ``backend``: ``cpu`` (ours) or ``kt`` (kt-kernel's SFT
    MoE: bf16 or int4, one adapter per batch). ``device``: where the non-expert layers run;
    with a GPU, ``gpu_masks`` (layer -> [E] bool) names the experts that live there too (in bf16,
    fp32 for the fp32 method), and the rest run on the CPU engine at the same time (hybrid.py).
    ``kt_weight_path``: with int8 / int4, the experts come from this folder of kt-kernel's
    converted weights (kt_layout.py) instead of the checkpoint; bf16 / fp32 read the checkpoint,
    as the seed does. ``gpu_prefill_threshold`` (with a GPU device; None / 0: off): forwards of at
    least this many tokens run the CPU experts on the GPU too, copied there layer by layer
    (gpu_prefill.py; ``gpu_prefill.default_threshold(method)`` is the measured default).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model_config import check_model_fields
    from .model_weights import load_model_weights

    if backend not in ("cpu", "kt"):
        raise ValueError(f"unknown backend {backend!r}: expected cpu or kt")
    register()
    check_model_fields(model_dir)  # what transformers builds the model from, before it does
    ckpt = Checkpoint(model_dir)
    dtype = dtype or (torch.float32 if method == "fp32" else torch.bfloat16)
    wrap = progress or (lambda items, _description: items)
    if kt_weight_path is not None and method in ("int8", "int4"):
        engine = _kt_files_engine(ckpt, method, backend, threads, group_size, wrap, torch.device(device), Path(kt_weight_path))
    else:
        engine = _engine(ckpt, method, backend, threads, group_size, wrap, torch.device(device), gpu_masks)
    if gpu_prefill_threshold:
        from .hybrid import HybridMoE

        if isinstance(engine, HybridMoE):  # the engines of a CPU device have no GPU to use
            engine.enable_gpu_prefill(gpu_prefill_threshold)

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    load_model_weights(model, ckpt, device, wrap)  # every non-expert tensor; the experts stay meta
    batch = BatchAdapters()
    for L in ckpt.config.moe_layers:
        model.get_submodule(f"model.layers.{L}.mlp.experts").expertlora = ExpertsBinding(engine, L, batch)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    model.eval()

    loaded = LoadedModel(model, engine, batch, ckpt)
    for name, adapter in (adapters or {}).items():
        add_adapter(loaded, name, adapter)
    return loaded


def _engine(ckpt: Checkpoint, method: str, backend: str, threads, group_size, wrap, device: torch.device, gpu_masks):
    layers = ckpt.config.moe_layers
    if backend == "kt":
        from .kt_backend import KtMoEEngine, kt_method

        if device.type != "cpu":
            raise ValueError("--backend kt runs every expert on the CPU: use --backend cpu with --device cuda")
        kt = kt_method(method)  # checked before the weights are read
        return KtMoEEngine({L: ckpt.experts(L, "bf16") for L in wrap(layers, "experts")}, kt, threads=threads)
    group_size = _int4_group(ckpt.config.hidden_size, ckpt.config.intermediate_size, group_size)
    if device.type == "cpu":
        if gpu_masks and any(bool(m.any()) for m in gpu_masks.values()):
            raise ValueError("GPU experts need a GPU device (--device cuda)")
        from .experts import ExpertWeights

        # int4: each projection's own group size unless one is forced (ExpertWeights.group_sizes)
        return MoELoRAEngine({L: ExpertWeights.from_gate_up(*ckpt.expert_tensors(L), method, group_size) for L in wrap(layers, "experts")},
                             threads=threads)
    return _hybrid_engine(ckpt, method, threads, group_size, wrap, device, gpu_masks or {})


def _kt_files_engine(ckpt: Checkpoint, method: str, backend: str, threads, group_size, wrap, device: torch.device, path: Path):
    """The experts from kt-kernel's converted files: unpacked into our storage for the cpu
    backend, loaded by kt-kernel itself for the kt backend."""
    from .kt_layout import kt_layer_sizes, read_kt_layer

    if device.type != "cpu":
        raise ValueError("--kt-weight-path: kt-kernel's converted experts run on the CPU; use --device cpu")
    c = ckpt.config
    E, H, I, layers = c.num_experts, c.hidden_size, c.intermediate_size, c.moe_layers
    # kt's int4 scale is per row (of each NUMA part): one group size for both projections holds it exactly
    group_size = _int4_group(H, I, group_size) or next((g for g in INT4_GROUP_SIZES if H % g == 0 and I % g == 0), DEFAULT_GROUP_SIZE)
    if backend == "kt":
        from .kt_backend import KtMoEEngine, kt_method

        sizes = {L: kt_layer_sizes(method, E, H, I, group_size) for L in layers}
        return KtMoEEngine(sizes, kt_method(method, from_files=True), threads=threads, weight_path=str(path))
    return MoELoRAEngine({L: read_kt_layer(path, L, method, E, H, I, group_size) for L in wrap(layers, "experts")}, threads=threads)


def _hybrid_engine(ckpt: Checkpoint, method: str, threads, group_size: int, wrap, device: torch.device, gpu_masks):
    from .hybrid import HybridMoE

    # each layer read once: the GPU's share is copied there, the rest quantized for the CPU
    layers = ((L, *ckpt.expert_tensors(L)) for L in wrap(ckpt.config.moe_layers, "experts"))
    return HybridMoE.build(layers, gpu_masks, method, group_size, device, threads)


def add_adapter(loaded: LoadedModel, name: str, adapter: ExpertLoRA | str | Path, prepared: object | None = None) -> None:
    """Expert LoRA into an engine slot; non-expert LoRA into TokenLoRALinear swaps, same slot.
    ``adapter``: an ExpertLoRA, or the path of an adapter (any format ``formats.load_adapter``
    reads), checked against the model's config. ``prepared``: the engine's
    ``prepare_adapter(adapter)``, built beforehand (off a step loop)."""
    from .base_modules import check_modules
    from .validate import check_against_base

    if isinstance(adapter, (str, Path)):
        from .formats import load_adapter

        adapter = load_adapter(adapter, loaded.checkpoint.config)
    if not isinstance(adapter, ExpertLoRA):
        raise TypeError(f"adapter {name!r}: expected an ExpertLoRA or the path of an adapter, found {type(adapter).__name__}")
    check_against_base(adapter.info, loaded.checkpoint.config)
    # every non-expert module it targets is a linear layer of this model, of the LoRA's shape
    check_modules(adapter.info, loaded.model, adapter.modules, str(loaded.checkpoint.dir))
    slot = loaded.engine.load_adapter(name, adapter, prepared)
    loaded.adapters[name] = adapter
    for module_name, lora in adapter.modules.items():
        path = _module_path(module_name)
        module = loaded.model.get_submodule(path)
        if not isinstance(module, TokenLoRALinear):
            parent, _, child = path.rpartition(".")
            module = TokenLoRALinear(module, loaded.batch)
            setattr(loaded.model.get_submodule(parent), child, module)
        device = module.base.weight.device
        module.loras[slot] = (lora.a.float().to(device), (lora.b.float() * lora.spec.scaling).to(device))


def remove_adapter(loaded: LoadedModel, name: str) -> None:
    """Unload ``name`` from the engine and from every TokenLoRALinear; others keep their slots."""
    slot = loaded.engine.slot(name)
    loaded.engine.unload_adapter(name)
    for module in loaded.model.modules():
        if isinstance(module, TokenLoRALinear):
            module.loras.pop(slot, None)
    del loaded.adapters[name]


def _int4_group(hidden: int, intermediate: int, forced: int | None = None) -> int | None:
    """int4's group size for the engine: ``forced`` (checked to divide both input sizes, H for
    gate_up and I for down), or None: chosen per projection when quantizing (int4_group_size)."""
    if forced is not None:
        for name, size in (("hidden", hidden), ("intermediate", intermediate)):
            if forced not in INT4_GROUP_SIZES or size % forced:
                raise ValueError(f"--group-size {forced}: expected one of {', '.join(map(str, INT4_GROUP_SIZES))} dividing the {name} size {size}")
    return forced


def _module_path(name: str) -> str:
    """Canonical module names carry the PEFT prefix only when the source did."""
    return name.removeprefix("base_model.model.")

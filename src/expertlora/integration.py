"""Our engine inside a transformers (>= 5) model, through transformers' own extension point.

An experts implementation named ``expertlora`` is registered in
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` and selected on the model, so the
model's own router calls ``MoELoRAEngine.forward`` for every MoE layer. The model is built with
empty (meta) experts: the checkpoint's experts are read once, into engine storage, and the rest
of the checkpoint loads as usual. Non-expert LoRA (attention, shared experts, dense MLP) is
applied by PEFT, whose mixed-batch inference (``adapter_names``) picks each sequence's adapter.

Needs the ``hf`` extra (transformers, peft; peft brings accelerate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .engine import MoELoRAEngine
from .lora import ExpertLoRA
from .quantize import DEFAULT_GROUP_SIZE, INT4_GROUP_SIZES
from .slots import NO_ADAPTER

EXPERTS_IMPLEMENTATION = "expertlora"
PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# Non-expert tensors whose checkpoint name differs from the transformers 5 module, by model type:
# (part of the checkpoint key, part of the parameter name).
KEY_RENAMES = {"mixtral": ((".block_sparse_moe.gate.", ".mlp.gate."),)}


@dataclass
class BatchAdapters:
    """Each sequence's adapter slot for the forward in progress; shared by every MoE layer."""

    seq_slots: torch.Tensor | None = None  # [B], NO_ADAPTER for none

    def token_slots(self, num_tokens: int) -> torch.Tensor | None:
        """Per-token slots for the experts' flattened [B * S, H] input."""
        if self.seq_slots is None or bool((self.seq_slots == NO_ADAPTER).all()):
            return None
        B = self.seq_slots.shape[0]
        if num_tokens % B:
            raise ValueError(f"{num_tokens} tokens do not split into {B} sequences")
        return self.seq_slots.repeat_interleave(num_tokens // B)


@dataclass
class ExpertsBinding:
    """What one model experts module needs to call the engine: set on the module at build."""

    engine: MoELoRAEngine
    layer: int
    batch: BatchAdapters


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The registered experts implementation: transformers' signature, our engine."""
    b: ExpertsBinding = self.expertlora
    slots = b.batch.token_slots(hidden_states.shape[0])
    return b.engine.forward(b.layer, hidden_states, top_k_index, top_k_weights, slots)


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


@dataclass
class LoadedModel:
    """A transformers model whose MoE layers run on our engine, with its adapters."""

    model: torch.nn.Module  # the transformers model, or a PeftModel around it
    engine: MoELoRAEngine
    batch: BatchAdapters
    checkpoint: Checkpoint
    adapters: dict[str, ExpertLoRA] = field(default_factory=dict)
    peft_adapters: set[str] = field(default_factory=set)  # those with non-expert LoRA

    def use(self, names: list[str | None]) -> dict:
        """Select each sequence's adapter for the next forward / generate; returns the extra
        keyword arguments PEFT needs (``adapter_names``), if any.

        One adapter for the whole batch is set on PEFT directly. A mixed batch goes through
        PEFT's ``adapter_names``, which needs every LoRA module to see [batch, ...] inputs:
        LoRA on a shared expert (its input is flattened to tokens) cannot be mixed that way."""
        self.batch.seq_slots = self.engine.token_slots(names)
        if not self.peft_adapters:
            return {}
        peft_names = [n if n in self.peft_adapters else PEFT_BASE for n in names]
        if len(set(peft_names)) > 1:
            self._check_mixable(set(peft_names) - {PEFT_BASE})
        lora_model = self.model.base_model
        if set(peft_names) == {PEFT_BASE}:
            lora_model.disable_adapter_layers()
            return {}
        lora_model.enable_adapter_layers()
        if len(set(peft_names)) > 1:
            return {"adapter_names": peft_names}
        self.model.set_adapter(peft_names[0])
        return {}


    def _check_mixable(self, names: set[str]) -> None:
        moe = self.checkpoint.config.moe_layers
        for name in sorted(names):
            for module in self.adapters[name].modules:
                path = _module_path(module)
                if any(path.startswith(f"model.layers.{L}.mlp.") for L in moe):
                    raise ValueError(
                        f"adapter {name} has LoRA on {path}, which sees the batch flattened to tokens: "
                        "PEFT cannot mix adapters there; run its sequences in a batch of their own"
                    )


def load_model(
    model_dir: str | Path,
    method: str = "bf16",
    dtype: torch.dtype | None = None,
    adapters: dict[str, ExpertLoRA] | None = None,
    threads: int | None = None,
    group_size: int | None = None,
    progress: Callable | None = None,
    backend: str = "cpu",
) -> LoadedModel:
    """Build the model of ``model_dir`` with its experts in ``method`` on our engine.

    ``dtype`` is that of the non-expert layers: float32 with ``fp32``, else bfloat16 unless
    given. ``group_size`` (int4): by default the largest of 128 / 64 / 32 that divides the
    hidden and intermediate sizes. ``progress(iterable, description)`` wraps the per-layer
    loading (a rich bar in the CLI). ``backend``: ``cpu`` (ours) or ``kt`` (kt-kernel's SFT
    MoE: bf16 or int4, one adapter per batch).
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    ckpt = Checkpoint(model_dir)
    dtype = dtype or (torch.float32 if method == "fp32" else torch.bfloat16)
    wrap = progress or (lambda items, _description: items)
    engine = _engine(ckpt, method, backend, threads, group_size, wrap)

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    renames = KEY_RENAMES.get(config.model_type, ())
    for name, _ in wrap(list(model.named_parameters()), "other weights"):
        if ".experts." in name:
            continue
        key = _checkpoint_key(name, renames, ckpt, config)
        set_module_tensor_to_device(model, name, "cpu", value=ckpt.tensor(key).to(dtype))
    model.tie_weights()  # loading replaced the embedding's Parameter: re-tie a tied output layer
    batch = BatchAdapters()
    for L in ckpt.config.moe_layers:
        model.get_submodule(f"model.layers.{L}.mlp.experts").expertlora = ExpertsBinding(engine, L, batch)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    model.eval()

    loaded = LoadedModel(model, engine, batch, ckpt)
    for name, adapter in (adapters or {}).items():
        add_adapter(loaded, name, adapter)
    return loaded


def _engine(ckpt: Checkpoint, method: str, backend: str, threads, group_size, wrap):
    if backend == "kt":
        from .kt_backend import KtMoEEngine, kt_method

        kt = kt_method(method)  # checked before the weights are read
        layers = {L: ckpt.experts(L, "bf16") for L in wrap(ckpt.config.moe_layers, "experts")}
        return KtMoEEngine(layers, kt, threads=threads)
    if backend != "cpu":
        raise ValueError(f"unknown backend {backend!r}: expected cpu or kt")
    group_size = group_size or _int4_group(ckpt.config.hidden_size, ckpt.config.intermediate_size)
    layers = {L: ckpt.experts(L, method, group_size) for L in wrap(ckpt.config.moe_layers, "experts")}
    return MoELoRAEngine(layers, threads=threads)


def add_adapter(loaded: LoadedModel, name: str, adapter: ExpertLoRA) -> None:
    """Expert LoRA into an engine slot; non-expert LoRA into PEFT under the same name."""
    from .validate import check_against_base

    check_against_base(adapter.info, loaded.checkpoint.config)
    loaded.engine.load_adapter(name, adapter)
    loaded.adapters[name] = adapter
    if adapter.modules:
        loaded.model = _add_peft_adapter(loaded.model, name, adapter)
        loaded.peft_adapters.add(name)


def _add_peft_adapter(model, name: str, adapter: ExpertLoRA):
    from peft import LoraConfig, PeftModel, get_peft_model

    mods = adapter.modules
    first = next(iter(mods.values()))
    config = LoraConfig(
        r=first.spec.rank,
        lora_alpha=first.spec.alpha,
        target_modules=[_module_path(m) for m in mods],
        rank_pattern={_module_path(m): lora.spec.rank for m, lora in mods.items()},
        alpha_pattern={_module_path(m): lora.spec.alpha for m, lora in mods.items()},
        use_rslora=adapter.info.use_rslora,
    )
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    inner = model.base_model.model
    dtype = next(p for p in inner.parameters() if p.device.type != "meta").dtype
    with torch.no_grad():
        for module_name, lora in mods.items():
            layer = inner.get_submodule(_module_path(module_name))
            layer.lora_A[name].weight.copy_(lora.a.to(dtype))
            layer.lora_B[name].weight.copy_(lora.b.to(dtype))
            layer.scaling[name] = lora.spec.scaling
    model.eval()
    return model


def _int4_group(hidden: int, intermediate: int) -> int:
    return next((g for g in INT4_GROUP_SIZES if hidden % g == 0 and intermediate % g == 0), DEFAULT_GROUP_SIZE)


def _module_path(name: str) -> str:
    """Canonical module names carry the PEFT prefix only when the source did."""
    return name.removeprefix("base_model.model.")


def _checkpoint_key(name: str, renames, ckpt: Checkpoint, config) -> str:
    if name in ckpt.files:
        return name
    for checkpoint_part, model_part in renames:
        candidate = name.replace(model_part, checkpoint_part)
        if candidate in ckpt.files:
            return candidate
    if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
        return "model.embed_tokens.weight"
    return name  # Checkpoint.tensor names the missing key

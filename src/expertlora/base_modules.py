"""The base model's modules, for checking the non-expert modules an adapter targets.

``inspect --base`` and ``convert --base`` know only the model's config.json: the model is built
on the meta device (no weights allocated) to learn its module names and linear shapes. ``run``
checks against the model it loaded. Either way an adapter module the base does not have (a
Qwen2-MoE ``shared_expert`` LoRA on a Qwen3-MoE base, ``self_attn.bogus_proj``), or one that is not
a linear layer of the shape its LoRA needs, is an AdapterError naming the module.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch

from .errors import AdapterError
from .lora import AdapterInfo, ModuleLoRA
from .model_config import MoEConfig

# Building a skeleton costs time per layer even on meta: no real model has more.
MAX_SKELETON_LAYERS = 1024


def model_skeleton(model_dir: str | Path) -> torch.nn.Module | None:
    """The model of ``model_dir/config.json`` with every tensor on the meta device (cached);
    None when transformers does not know its ``model_type`` (a remote-code model)."""
    return _skeleton(str(Path(model_dir).resolve()))


@functools.lru_cache(maxsize=4)
def _skeleton(model_dir: str) -> torch.nn.Module | None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # AutoConfig says what is wrong with it
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        return None
    try:
        config = AutoConfig.from_pretrained(model_dir)
        layers = getattr(config.get_text_config(), "num_hidden_layers", 0)
        if not isinstance(layers, int) or layers > MAX_SKELETON_LAYERS:
            raise AdapterError(path, "num_hidden_layers", f"at most {MAX_SKELETON_LAYERS}", repr(layers)[:40])
        with init_empty_weights(include_buffers=True):
            return AutoModelForCausalLM.from_config(config)
    except AdapterError:
        raise
    except Exception as e:  # transformers' own refusals come as many types
        raise AdapterError(path, None, "a config transformers can build the model from",
                           f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def check_base_modules(info: AdapterInfo, base: MoEConfig, modules: dict[str, ModuleLoRA] | None = None) -> None:
    """``info``'s non-expert modules against the model of ``base`` (its config.json, built on
    meta); ``modules`` (the LoRA read) adds the shape check. Nothing is built when the adapter
    has no non-expert modules or ``base`` has no path."""
    if not info.modules or base.path is None:
        return
    model = model_skeleton(base.path.parent)
    if model is None:
        warnings.warn(f"{base.path}: model_type {base.model_type!r} is not one transformers builds; the adapter's "
                      f"{len(info.modules)} non-expert modules are not checked against the base", stacklevel=2)
        return
    check_modules(info, model, modules, str(base.path))


def check_modules(info: AdapterInfo, model: torch.nn.Module, modules: dict[str, ModuleLoRA] | None = None,
                  where: str = "the base model") -> None:
    """Every non-expert module of ``info`` must be a linear layer of ``model``; with ``modules``,
    A [r, in] and B [out, r] must fit it."""
    for name in info.modules:
        linear = _linear(model, name.removeprefix("base_model.model."), info, name, where)
        if modules is None or name not in modules:
            continue
        lora, (out_f, in_f) = modules[name], tuple(linear.weight.shape)
        if lora.a.shape[-1] != in_f or lora.b.shape[0] != out_f:
            raise AdapterError(info.path, name, f"LoRA A [r, {in_f}] and B [{out_f}, r] for that linear layer of {where}",
                               f"A {list(lora.a.shape)}, B {list(lora.b.shape)}")


def _linear(model: torch.nn.Module, path: str, info: AdapterInfo, name: str, where: str) -> torch.nn.Linear:
    module, done = model, []
    for part in path.split("."):
        child = module._modules.get(part) if part else None
        if child is None:
            under = ".".join(done) or "the model"
            raise AdapterError(info.path, name, f"a linear module of {where}",
                               f"no module {part!r} in {under} ({type(module).__name__} of {_model_type(model)})")
        module, done = child, done + [part]
    from .integration import TokenLoRALinear

    if isinstance(module, TokenLoRALinear):  # our swap of a linear layer that carries LoRA already
        module = module.base
    if not isinstance(module, torch.nn.Linear):
        raise AdapterError(info.path, name, f"a linear module of {where}", f"a {type(module).__name__}")
    return module


def _model_type(model: torch.nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__

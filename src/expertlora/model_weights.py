"""The checkpoint's non-expert tensors into a transformers model built with empty weights.

Every parameter and every persistent buffer the model defines is read from the checkpoint (a
DeepSeek-V3 router's ``e_score_correction_bias`` is a persistent buffer: it steers routing).
Non-persistent buffers (rotary tables) are derived from the config and kept from construction.
The routed experts (model tensors under ``.experts.``) are the engine's, read by
``Checkpoint.expert_tensors``. Every checkpoint key must land somewhere: in the model, in the
engine, or among the keys transformers itself ignores on load (a one-line notice); anything
else, like a tensor the model needs that the checkpoint lacks or a shape that disagrees, is an
AdapterError naming the key.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch

from .checkpoint import INDEX_NAME, LAYER_PREFIX, Checkpoint
from .errors import AdapterError, shape_str

# Model tensors whose name holds this run on the engine. Shared experts (DeepSeek's
# `shared_experts`, Qwen2-MoE's `shared_expert`) do not match: they are ordinary model layers.
EXPERT_PART = ".experts."
# Non-expert tensors whose checkpoint name differs from the transformers 5 module, by model type:
# (part of the checkpoint key, part of the model's name). Tied weights (lm_head <- embed_tokens)
# follow transformers' own table, ``model.all_tied_weights_keys``.
KEY_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".block_sparse_moe.gate.", ".mlp.gate."),)}
# Patterns transformers adds to a model's `_keys_to_ignore_on_load_unexpected` on load
# (modeling_utils._adjust_missing_and_unexpected_keys): buffer name suffix -> ignored key pattern.
_IGNORED_WHEN_BUFFER = {"rotary_emb.inv_freq": r"rotary_emb\.inv_freq", "position_ids": r"(^|\.)position_ids$"}


def load_model_weights(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    device: torch.device | str = "cpu",
    progress: Callable | None = None,
) -> None:
    """Fill ``model`` (built under ``init_empty_weights(include_buffers=False)``) from ``ckpt``.

    Each non-expert parameter and persistent buffer is read from the checkpoint in the dtype the
    model built it with (transformers keeps some in fp32, such as DeepSeek-V3's router) and placed
    on ``device``; non-persistent buffers move there as built. Tied weights are tied as
    transformers' ``from_pretrained`` ties them. Every name is checked before any tensor is read.
    ``progress(iterable, description)`` wraps the reading.

    Raises AdapterError for a tensor the model needs that the checkpoint lacks, a checkpoint key
    that neither the model nor the engine uses (keys transformers ignores get one warning
    instead), a shape or kind (floating / integer) that disagrees, or routed experts in layers the
    engine does not serve.
    """
    wrap = progress or (lambda items, _description: items)
    tensors, non_persistent = _model_tensors(model)
    _check_expert_layers(model, ckpt)
    renames = KEY_RENAMES.get(ckpt.config.model_type, ())
    keys = {name: _checkpoint_key(name, renames, ckpt) for name in tensors}  # model name -> key or None
    tied = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items() if t in tensors and s in tensors}
    absent = {name for name, key in keys.items() if key is None}
    for name in sorted(absent):
        partner = next((s if name == t else t for t, s in tied.items() if name in (t, s)), None)
        if partner is None or partner in absent:  # tying cannot fill it either
            raise AdapterError(_where(ckpt), name, f"this tensor ({_kind(model, name)} of the model)", "none in the checkpoint")
    _check_unexpected(model, ckpt, set(keys.values()))

    for name, key in wrap([(n, k) for n, k in keys.items() if k is not None], "other weights"):
        _set(model, name, _read(ckpt, key, tensors[name]).to(device))
    if tied:  # transformers' own rule: tie what is absent; tie what is present twice only if equal
        model.tie_weights(missing_keys=set(absent), recompute_mapping=False)
    for name in non_persistent:
        _set(model, name, model.get_buffer(name).to(device))
    left = [name for name in tensors if _current(model, name).is_meta]
    if left:
        raise RuntimeError(f"model tensors left unfilled after loading: {left[:3]}")


def _model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Name -> tensor (meta or built) for the non-expert parameters and persistent buffers, and
    the names of the non-persistent buffers."""
    tensors, non_persistent = {}, []
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for attr, p in module.named_parameters(prefix="", recurse=False, remove_duplicate=False):
            tensors[dot + attr] = p
        for attr, b in module.named_buffers(prefix="", recurse=False, remove_duplicate=False):
            if attr in module._non_persistent_buffers_set:
                non_persistent.append(dot + attr)
            else:
                tensors[dot + attr] = b
    expert = [n for n in tensors if EXPERT_PART in n]
    for n in expert:
        del tensors[n]
    return tensors, [n for n in dict.fromkeys(non_persistent) if EXPERT_PART not in n]


def _checkpoint_key(name: str, renames, ckpt: Checkpoint) -> str | None:
    if name in ckpt.files:
        return name
    for checkpoint_part, model_part in renames:
        candidate = name.replace(model_part, checkpoint_part)
        if candidate != name and candidate in ckpt.files:
            return candidate
    return None


def _check_expert_layers(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """The model's routed-expert modules sit exactly in the layers the engine serves."""
    have = sorted({n.split(EXPERT_PART)[0] for n, _ in model.named_parameters() if EXPERT_PART in n})
    want = sorted(LAYER_PREFIX.format(L=L) + "mlp" for L in ckpt.config.moe_layers)
    if have != want:
        raise AdapterError(ckpt.dir / "config.json", "moe layers", f"routed experts in {want or 'no layer'}",
                           f"the {ckpt.config.model_type} model has them in {have or 'no layer'}")


def _engine_key_pattern(ckpt: Checkpoint) -> re.Pattern:
    """The routed-expert keys ``Checkpoint.expert_tensors`` reads: layer and expert ids as groups."""
    lay = ckpt.layout
    layer = re.escape(LAYER_PREFIX).replace(re.escape("{L}"), r"(\d+)")
    templates = [re.escape(t).replace(re.escape("{e}"), r"(\d+)") for t in (lay.gate, lay.up, lay.down) if t]
    return re.compile(layer + "(?:" + "|".join(templates) + ")")


def _is_engine_key(key: str, pattern: re.Pattern, ckpt: Checkpoint) -> bool:
    m = pattern.fullmatch(key)
    if m is None:
        return False
    ids = [g for g in m.groups() if g is not None]
    canonical = all(str(int(g)) == g for g in ids)  # `experts.03` is not what the engine reads
    layer, experts = int(ids[0]), [int(g) for g in ids[1:]]
    return canonical and layer in ckpt.config.moe_layers and all(e < ckpt.config.num_experts for e in experts)


def _check_unexpected(model: torch.nn.Module, ckpt: Checkpoint, used: set[str | None]) -> None:
    pattern = _engine_key_pattern(ckpt)
    extra = [k for k in ckpt.files if k not in used and not _is_engine_key(k, pattern, ckpt)]
    if not extra:
        return
    ignored_patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    ignored_patterns |= {p for suffix, p in _IGNORED_WHEN_BUFFER.items() if any(n.endswith(suffix) for n in buffers)}
    ignored = re.compile("|".join(f"({p})" for p in ignored_patterns)) if ignored_patterns else None
    refused = [k for k in extra if ignored is None or ignored.search(k) is None]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise AdapterError(ckpt.files[refused[0]], refused[0], f"only tensors the {ckpt.config.model_type} model or its routed experts use",
                           f"a tensor that maps to neither{more}")
    more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
    warnings.warn(f"expertlora: {_where(ckpt)}: not loading {extra[0]}{more}, which transformers also ignores", stacklevel=3)


def _read(ckpt: Checkpoint, key: str, like: torch.Tensor) -> torch.Tensor:
    t = ckpt.tensor(key)
    if tuple(t.shape) != tuple(like.shape):
        raise AdapterError(ckpt.files[key], key, shape_str(like.shape) + " (from config.json)", shape_str(t.shape))
    if t.is_floating_point() != like.is_floating_point():
        raise AdapterError(ckpt.files[key], key, f"a {like.dtype} tensor", str(t.dtype))
    return t.to(like.dtype)


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, value.device, value=value)


def _current(model: torch.nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def _kind(model: torch.nn.Module, name: str) -> str:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    return f"a {'parameter' if attr in module._parameters else 'persistent buffer'} of {type(module).__name__}"


def _where(ckpt: Checkpoint):
    index = ckpt.dir / INDEX_NAME
    return index if index.is_file() else ckpt.dir

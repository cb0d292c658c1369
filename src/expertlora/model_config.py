"""The MoE shape of a Hugging Face checkpoint, read from its config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError
from .jsonfile import Fields, check_int, describe, read_json_object

# config.json key names, first present wins: format knowledge as data.
_NUM_EXPERTS_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")
# Families whose per-expert checkpoints (transformers 4.x) name experts block_sparse_moe.experts.E.w1/w3/w2.
_BLOCK_SPARSE_MOE_TYPES = ("mixtral",)
# Bounds on what a config.json may claim: far above any released model, low enough that a loop
# or an allocation sized by them stays sane (the tensors themselves are checked against them).
MAX_LAYERS = 1 << 12
MAX_EXPERTS = 1 << 14
MAX_HIDDEN = 1 << 17
MAX_INTERMEDIATE = 1 << 18


@dataclass(frozen=True)
class MoEConfig:
    """What an adapter must agree with: expert count, sizes, and which layers are MoE layers."""

    model_type: str
    num_layers: int
    num_experts: int
    hidden_size: int
    intermediate_size: int
    moe_layers: tuple[int, ...]
    path: Path | None = None
    quant_method: str | None = None  # quantization_config.quant_method, when the checkpoint is quantized

    def __post_init__(self):
        where = self.path or "config.json"
        for key, value, hi in (
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_experts", self.num_experts, MAX_EXPERTS),
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            ("moe_intermediate_size", self.intermediate_size, MAX_INTERMEDIATE),
        ):
            check_int(value, 1, hi, lambda: AdapterError(where, key, f"an integer from 1 to {hi}", describe(value)))
        if not isinstance(self.model_type, str):
            raise AdapterError(where, "model_type", "a string", describe(self.model_type))
        layers = self.moe_layers
        if not isinstance(layers, tuple) or list(layers) != sorted(set(layers)) or not all(
            isinstance(L, int) and 0 <= L < self.num_layers for L in layers
        ):
            raise AdapterError(where, "moe_layers", f"distinct increasing layer ids below {self.num_layers}", describe(list(layers)))

    @property
    def expert_naming(self) -> str:
        return "block_sparse_moe" if self.model_type in _BLOCK_SPARSE_MOE_TYPES else "mlp"

    @classmethod
    def from_dict(cls, cfg: dict, path: Path | None = None) -> "MoEConfig":
        """The MoE shape of a config.json's contents, every field checked for type and range."""
        where = path or "config.json"
        top = Fields(cfg, where)
        if top.has("text_config"):  # multimodal configs: the language model's sizes
            cfg = {**top.mapping("text_config"), **cfg}
        f = Fields(cfg, where)
        num_experts = _first(f, _NUM_EXPERTS_KEYS, MAX_EXPERTS, aliases=True)
        if num_experts is None:
            raise AdapterError(where, "num_experts", f"a MoE config with one of {list(_NUM_EXPERTS_KEYS)}", "none")
        intermediate = _first(f, _INTERMEDIATE_KEYS, MAX_INTERMEDIATE)
        if intermediate is None:
            raise AdapterError(where, "moe_intermediate_size", f"an integer from 1 to {MAX_INTERMEDIATE}", "missing")
        n = f.integer("num_hidden_layers", hi=MAX_LAYERS)
        return cls(
            model_type=f.string("model_type", "", max_len=256),
            num_layers=n,
            num_experts=num_experts,
            hidden_size=f.integer("hidden_size", hi=MAX_HIDDEN),
            intermediate_size=intermediate,
            moe_layers=_moe_layers(f, n),
            path=path,
            quant_method=_quant_method(f),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "MoEConfig":
        """Read ``config.json`` of a checkpoint directory (or the file itself)."""
        path = Path(model_dir)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise AdapterError(path, None, "a Hugging Face config.json", "no such file")
        return cls.from_dict(read_json_object(path), path)


def _first(f: Fields, keys: tuple[str, ...], hi: int, aliases: bool = False) -> int | None:
    """The first of ``keys`` set to a non-zero value (0 / null mean "not this one"), checked.
    ``aliases``: the keys name one value (transformers maps them onto each other), so two of
    them present must agree, null and 0 included."""
    present = [k for k in keys if k in f.data]
    if aliases and len(present) > 1:
        first = present[0]
        for key in present[1:]:
            if f.data[key] != f.data[first] or type(f.data[key]) is not type(f.data[first]):
                raise f.error(key, f"the value of {first} ({describe(f.data[first])}), which it names too", f.data[key])
    for key in present:
        value = f.data[key]
        if value is None or (value == 0 and not isinstance(value, bool)):
            continue
        return f.integer(key, hi=hi)
    return None


def _moe_layers(f: Fields, n: int) -> tuple[int, ...]:
    # DeepSeek V2/V3: dense until first_k_dense_replace, then every moe_layer_freq-th layer.
    if "first_k_dense_replace" in f.data:
        first = f.integer("first_k_dense_replace", 0, lo=0, hi=MAX_LAYERS)
        freq = f.integer("moe_layer_freq", 1, hi=MAX_LAYERS)
        return tuple(L for L in range(n) if L >= first and L % freq == 0)
    # Qwen2/Qwen3-MoE: mlp_only_layers are dense; otherwise every decoder_sparse_step-th layer.
    dense = f.data.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(L, int) and not isinstance(L, bool) and 0 <= L < MAX_LAYERS for L in dense):
        raise f.error("mlp_only_layers", f"a list of layer ids below {MAX_LAYERS}", dense)
    step = f.integer("decoder_sparse_step", 1, hi=MAX_LAYERS)
    dense = set(dense)
    return tuple(L for L in range(n) if L not in dense and (L + 1) % step == 0)


def _quant_method(f: Fields) -> str | None:
    if not f.has("quantization_config"):
        return None
    quant = f.mapping("quantization_config")
    method = quant.get("quant_method")
    return method[:64] if isinstance(method, str) and method else "unknown"


# Fields transformers reads to build and run the model beyond its MoE shape. They are checked
# before anything is built, so a bad value is one line naming the key instead of an exception
# (or a silently wrong model) from inside transformers.
_POSITIVE_SIZES = (
    "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "shared_expert_intermediate_size",
    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_shared_experts", "vocab_size",
    "max_position_embeddings",
)
MAX_SIZE = 1 << 30


def check_model_fields(model_dir: str | Path) -> MoEConfig:
    """The checkpoint's MoEConfig, after checking the config.json fields transformers will use to
    build and run the model: sizes, the router's top-k and groups, activation, rotary type,
    sliding window, scaling factors. Needs transformers (the hf extra)."""
    base = MoEConfig.from_model_dir(model_dir)
    path = base.path
    cfg = read_json_object(path)
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], **cfg}
    f = Fields(cfg, path)
    E = base.num_experts
    for key in _POSITIVE_SIZES:
        if f.has(key):
            f.integer(key, hi=MAX_SIZE)
    if "num_experts_per_tok" in cfg:
        f.integer("num_experts_per_tok", hi=E)  # the router's top-k among the E experts
    # Grouped routing (always on in DeepSeek-V3, with topk_method group_limited_greedy in V2): E experts
    # in n_group groups, topk_group of them chosen. V2's greedy routing leaves n_group null.
    if "n_group" in cfg and (cfg["n_group"] is not None or base.model_type == "deepseek_v3"):
        groups = f.integer("n_group", hi=E)
        if E % groups:
            raise f.error("n_group", f"a divisor of the {E} routed experts", groups)
        if "topk_group" in cfg:
            f.integer("topk_group", hi=groups)
    for key, low in (("routed_scaling_factor", None), ("router_jitter_noise", 0.0)):
        value = cfg.get(key)
        if key in cfg and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                           or (low is not None and value < low)):
            raise f.error(key, "a finite number" + (f" >= {low:g}" if low is not None else ""), value)
    if f.has("sliding_window") and (base.model_type == "mixtral" or cfg.get("use_sliding_window") is True):
        f.integer("sliding_window", hi=MAX_SIZE)  # a window the attention uses (Qwen2-MoE's only with use_sliding_window)
    if "hidden_act" in cfg:
        from transformers.activations import ACT2FN

        act = cfg["hidden_act"]
        if not isinstance(act, str) or act not in ACT2FN:
            raise f.error("hidden_act", "an activation transformers knows (silu, gelu, ...)", act)
    for key in ("rope_parameters", "rope_scaling"):
        if f.has(key):
            _check_rope(f, key, f.mapping(key))
    return base


def _check_rope(f: Fields, key: str, rope: dict) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    known = ("default", *ROPE_INIT_FUNCTIONS)
    per_layer_type = rope and all(isinstance(v, dict) for v in rope.values())  # {"full_attention": {...}, ...}
    for params in rope.values() if per_layer_type else (rope,):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in known:
            raise f.error(f"{key}.rope_type", f"one of {', '.join(known)}", kind)

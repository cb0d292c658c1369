"""The MoE shape of a Hugging Face checkpoint, read from its config.json."""

from __future__ import annotations

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

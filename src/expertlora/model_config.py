"""The MoE shape of a Hugging Face checkpoint, read from its config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError

# config.json key names, first present wins: format knowledge as data.
_NUM_EXPERTS_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")
# Families whose per-expert checkpoints (transformers 4.x) name experts block_sparse_moe.experts.E.w1/w3/w2.
_BLOCK_SPARSE_MOE_TYPES = ("mixtral",)


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

    def __post_init__(self):
        if min(self.num_layers, self.num_experts, self.hidden_size, self.intermediate_size) <= 0:
            raise ValueError(f"invalid MoE config: {self}")

    @property
    def expert_naming(self) -> str:
        return "block_sparse_moe" if self.model_type in _BLOCK_SPARSE_MOE_TYPES else "mlp"

    @classmethod
    def from_dict(cls, cfg: dict, path: Path | None = None) -> "MoEConfig":
        where = path or "config"
        cfg = {**cfg.get("text_config", {}), **cfg} if "text_config" in cfg else cfg
        num_experts = next((cfg[k] for k in _NUM_EXPERTS_KEYS if cfg.get(k)), None)
        if not num_experts:
            raise AdapterError(where, "num_experts", f"a MoE config with one of {list(_NUM_EXPERTS_KEYS)}", "none")
        inter = next((cfg[k] for k in _INTERMEDIATE_KEYS if cfg.get(k)), None)
        for key, value in (("hidden_size", cfg.get("hidden_size")), ("num_hidden_layers", cfg.get("num_hidden_layers")), ("moe_intermediate_size", inter)):
            if not isinstance(value, int) or value <= 0:
                raise AdapterError(where, key, "a positive integer", repr(value))
        n = cfg["num_hidden_layers"]
        return cls(
            model_type=str(cfg.get("model_type", "")),
            num_layers=n,
            num_experts=int(num_experts),
            hidden_size=cfg["hidden_size"],
            intermediate_size=int(inter),
            moe_layers=tuple(L for L in range(n) if _is_moe_layer(cfg, L)),
            path=path,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "MoEConfig":
        """Read ``config.json`` of a checkpoint directory (or the file itself)."""
        path = Path(model_dir)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise AdapterError(path, None, "a Hugging Face config.json", "no such file")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(path, None, "valid JSON", f"{e.msg} at line {e.lineno}") from None
        return cls.from_dict(cfg, path)


def _is_moe_layer(cfg: dict, layer: int) -> bool:
    # DeepSeek V2/V3: dense until first_k_dense_replace, then every moe_layer_freq-th layer.
    if "first_k_dense_replace" in cfg:
        freq = cfg.get("moe_layer_freq") or 1
        return layer >= cfg["first_k_dense_replace"] and layer % freq == 0
    # Qwen2/Qwen3-MoE: mlp_only_layers are dense; otherwise every decoder_sparse_step-th layer.
    if layer in (cfg.get("mlp_only_layers") or []):
        return False
    step = cfg.get("decoder_sparse_step") or 1
    return (layer + 1) % step == 0

"""A Hugging Face checkpoint directory: its tensors by name, read lazily, and its routed experts
turned into engine storage one layer at a time.

Shape legend: E = experts, H = hidden, I = expert intermediate size.

Expert layouts (format knowledge as data, detected from the first MoE layer's keys):

    per-expert  model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight   [I, H] [I, H] [H, I]
    mixtral     model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight
    fused       model.layers.{L}.mlp.experts.gate_up_proj [E, 2I, H], .down_proj [E, H, I]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import AdapterError, shape_str
from .experts import ExpertWeights
from .model_config import MoEConfig
from .quantize import DEFAULT_GROUP_SIZE

INDEX_NAME = "model.safetensors.index.json"
LAYER_PREFIX = "model.layers.{L}."


@dataclass(frozen=True)
class ExpertLayout:
    name: str
    gate: str  # key templates after the layer prefix; {e} is the expert
    up: str
    down: str
    fused: bool = False


LAYOUTS = (
    ExpertLayout("per-expert", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight"),
    ExpertLayout("mixtral", "block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight"),
    ExpertLayout("fused", "mlp.experts.gate_up_proj", "", "mlp.experts.down_proj", fused=True),
)


class Checkpoint:
    """The safetensors files of a model directory (single, or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = MoEConfig.from_model_dir(self.dir)
        self._refuse_quantized()
        self.files = self._key_files()
        self.layout = self._detect_layout()

    def keys(self) -> list[str]:
        return list(self.files)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read through mmap from the file that holds it."""
        if key not in self.files:
            raise AdapterError(self.dir, key, "a tensor of this name in the checkpoint", "none")
        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)

    def experts(self, layer: int, method: str, group_size: int = DEFAULT_GROUP_SIZE) -> ExpertWeights:
        """Layer ``layer``'s routed experts in ``method``. Only this layer is read into memory
        at full precision, once, before it is quantized."""
        return ExpertWeights.from_gate_up(*self.expert_tensors(layer), method, group_size)

    def expert_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s routed experts as stored: gate_up [E, 2I, H] and down [E, H, I]."""
        c, lay = self.config, self.layout
        E, H, I = c.num_experts, c.hidden_size, c.intermediate_size
        prefix = LAYER_PREFIX.format(L=layer)
        if lay.fused:
            return self._checked(prefix + lay.gate, (E, 2 * I, H)), self._checked(prefix + lay.down, (E, H, I))
        first = self.tensor(prefix + lay.gate.format(e=0))
        gate_up = torch.empty(E, 2 * I, H, dtype=first.dtype)
        down = torch.empty(E, H, I, dtype=first.dtype)
        for e in range(E):
            gate_up[e, :I] = self._checked(prefix + lay.gate.format(e=e), (I, H))
            gate_up[e, I:] = self._checked(prefix + lay.up.format(e=e), (I, H))
            down[e] = self._checked(prefix + lay.down.format(e=e), (H, I))
        return gate_up, down

    def _checked(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensor(key)
        if tuple(t.shape) != shape:
            raise AdapterError(self.files[key], key, shape_str(shape) + " (from config.json)", shape_str(t.shape))
        return t

    def _refuse_quantized(self) -> None:
        """FP8 / GPTQ / AWQ checkpoints store scales we would ignore: refuse them by name."""
        path = self.dir / "config.json"
        quant = json.loads(path.read_text()).get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise AdapterError(path, "quantization_config", "an unquantized checkpoint (bf16 / fp16 / fp32 weights)",
                               f"{method}; dequantize it to bf16 first")

    def _key_files(self) -> dict[str, Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise AdapterError(index, "weight_map", "a safetensors index with a weight_map", type(e).__name__) from None
            files = {k: self.dir / v for k, v in weight_map.items()}
            missing = sorted({str(p) for p in files.values() if not p.is_file()})
            if missing:
                raise AdapterError(index, "weight_map", "shard files that exist", f"missing {missing[0]}")
            return files
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise AdapterError(self.dir, None, "model.safetensors or sharded safetensors with an index", "no .safetensors files")
        files = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), shard))
        return files

    def _detect_layout(self) -> ExpertLayout:
        if not self.config.moe_layers:
            raise AdapterError(self.dir / "config.json", None, "at least one MoE layer", "none")
        prefix = LAYER_PREFIX.format(L=self.config.moe_layers[0])
        for layout in LAYOUTS:
            if prefix + layout.gate.format(e=0) in self.files:
                return layout
        templates = ", ".join(prefix + lay.gate.format(e=0) for lay in LAYOUTS)
        raise AdapterError(self.dir, "experts", f"expert weights under one of {templates}", "none of them")

"""A Hugging Face checkpoint directory: its tensors by name, read lazily, and its routed experts
turned into engine storage one layer at a time.

Shape legend: E = experts, H = hidden, I = expert intermediate size.

Expert layouts (format knowledge as data, detected from the first MoE layer's keys):

    per-expert  model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight   [I, H] [I, H] [H, I]
    mixtral     model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight
    fused       model.layers.{L}.mlp.experts.gate_up_proj [E, 2I, H], .down_proj [E, H, I]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .errors import AdapterError, shape_str
from .experts import ExpertWeights
from .formats.base import SAFETENSORS_DTYPES, open_safetensors
from .jsonfile import MAX_INDEX_BYTES, Fields, describe, read_json_object
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
    """The safetensors files of a model directory (single, or sharded with an index).

    Opening reads config.json and every shard's header (names, dtypes, shapes), never the
    data; every size used to allocate later has been checked against those headers.
    """

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = MoEConfig.from_model_dir(self.dir)
        self._refuse_quantized()
        self.shapes: dict[str, tuple[str, tuple[int, ...], Path]] = {}  # key -> (dtype, shape, file), from the headers
        self.files = self._key_files()
        self.layout = self._detect_layout()

    def keys(self) -> list[str]:
        return list(self.files)

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read through mmap from the file that holds it."""
        if key not in self.files:
            raise AdapterError(self.dir, key, "a tensor of this name in the checkpoint", "none")
        with open_safetensors(self.files[key]) as f:
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
        # Every expert's tensor is checked in the headers first: the stacks below are sized by
        # config.json, and allocated only once the files are known to hold that much.
        for e in range(E):
            for template, shape in ((lay.gate, (I, H)), (lay.up, (I, H)), (lay.down, (H, I))):
                self._check_header(prefix + template.format(e=e), shape)
        dtype = SAFETENSORS_DTYPES.get(self.shapes[prefix + lay.gate.format(e=0)][0], torch.float32)
        gate_up = torch.empty(E, 2 * I, H, dtype=dtype)
        down = torch.empty(E, H, I, dtype=dtype)
        for e in range(E):
            gate_up[e, :I] = self.tensor(prefix + lay.gate.format(e=e))
            gate_up[e, I:] = self.tensor(prefix + lay.up.format(e=e))
            down[e] = self.tensor(prefix + lay.down.format(e=e))
        return gate_up, down

    def _check_header(self, key: str, shape: tuple[int, ...]) -> None:
        if key not in self.files:
            raise AdapterError(self.dir, key, "a tensor of this name in the checkpoint", "none")
        dtype, found, _ = self.shapes[key]
        if dtype not in SAFETENSORS_DTYPES:  # expert weights are floats; an integer tensor here is not a model's
            raise AdapterError(self.files[key], key, f"a float tensor ({', '.join(SAFETENSORS_DTYPES)})", dtype)
        if found != shape:
            raise AdapterError(self.files[key], key, shape_str(shape) + " (from config.json)", shape_str(found))

    def _checked(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        self._check_header(key, shape)
        return self.tensor(key)

    def _refuse_quantized(self) -> None:
        """FP8 / GPTQ / AWQ checkpoints store scales we would ignore: refuse them by name."""
        if self.config.quant_method:
            raise AdapterError(self.dir / "config.json", "quantization_config", "an unquantized checkpoint (bf16 / fp16 / fp32 weights)",
                               f"{self.config.quant_method}; dequantize it to bf16 first")

    def _key_files(self) -> dict[str, Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map = Fields(read_json_object(index, MAX_INDEX_BYTES), index).mapping("weight_map")
            by_shard: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                if not isinstance(shard, str):
                    raise AdapterError(index, f"weight_map.{key}", "a shard file name (a string)", describe(shard))
                by_shard.setdefault(shard, []).append(key)
            files = {}
            for shard, keys in by_shard.items():
                path = self._shard_path(index, keys[0], shard)
                if not path.is_file():
                    raise AdapterError(index, f"weight_map.{keys[0]}", "shard files that exist", f"missing {path}")
                self._read_shard(path)
                for key in keys:
                    if key not in self.shapes or self.shapes[key][2] != path:
                        raise AdapterError(index, f"weight_map.{key}", f"a tensor that {shard} holds", "not in that file")
                    files[key] = path
            self.shapes = {k: v for k, v in self.shapes.items() if k in files}  # tensors the index does not name are not ours
            return files
        shards = sorted(self.dir.glob("*.safetensors"))
        if not shards:
            raise AdapterError(self.dir, None, "model.safetensors or sharded safetensors with an index", "no .safetensors files")
        for shard in shards:
            self._read_shard(shard)
        return {k: v[2] for k, v in self.shapes.items()}

    def _read_shard(self, path: Path) -> None:
        """Record a shard's tensor names, dtypes and shapes (its header only)."""
        with open_safetensors(path) as f:
            for key in f.keys():
                if key in self.shapes and self.shapes[key][2] != path:
                    raise AdapterError(path, key, "each tensor in one shard", f"also in {self.shapes[key][2].name}")
                sl = f.get_slice(key)
                self.shapes[key] = (sl.get_dtype(), tuple(sl.get_shape()), path)

    def _shard_path(self, index: Path, key: str, shard: str) -> Path:
        """A shard named by the index, inside the model directory (symlinks there are followed,
        as in the Hugging Face cache; a name that climbs out is refused)."""
        name = PurePosixPath(shard)
        if not shard or name.is_absolute() or ".." in name.parts or "\\" in shard or "\0" in shard:
            raise AdapterError(index, f"weight_map.{key}", "a shard file name inside the model directory", repr(shard)[:120])
        return self.dir / name

    def _detect_layout(self) -> ExpertLayout:
        if not self.config.moe_layers:
            raise AdapterError(self.dir / "config.json", None, "at least one MoE layer", "none")
        prefix = LAYER_PREFIX.format(L=self.config.moe_layers[0])
        for layout in LAYOUTS:
            if prefix + layout.gate.format(e=0) in self.files:
                return layout
        templates = ", ".join(prefix + lay.gate.format(e=0) for lay in LAYOUTS)
        raise AdapterError(self.dir, "experts", f"expert weights under one of {templates}", "none of them")

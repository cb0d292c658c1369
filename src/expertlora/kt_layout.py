"""Expert weights that kt-kernel's ``scripts/convert_cpu_weights.py`` already converted (INT8 / INT4),
read back into our storage, so users keep their converted files.

kt-kernel stores each projection of each expert, per NUMA part, as the B operand of its AMX GEMM:

    DIR/_layer_{L}/_numa_{p}/{INT8|INT4}_{gate|up|down}_{e}_{bytes}Byte_{quant|scale}_.kt
    or merged safetensors: blk.{L}.ffn_{gate|up|down}_exps.{e}.numa.{p}.{weight|scale}
        (weight: the quant bytes as int8 [bytes], scale: float32 [rows])

Shape legend: E = experts, H = hidden, I = intermediate, P = NUMA parts, n x k = one part's matrix.
Part p holds gate/up rows [p·I/P, (p+1)·I/P) (n = I/P, k = H) and down columns of the same range
(n = H, k = I/P). One float32 scale per row of the part, symmetric, no zero point:

    INT8: w = scale · q,       q int8, one byte per value
    INT4: w = scale · 16 · q,  q a signed nibble in [-8, 7] (the kernel uses the nibble as q·16)

The bytes (as kt-kernel 0.7.2 writes and reads them; checked against its writer, tests/test_kt_layout.py):
rows go in blocks of N_BLOCK (64 for INT8, 128 for INT4), columns in blocks of K_BLOCK = 3584;
block (nb, kb) starts at nb·k + kb·n_block_size. Inside, strips of 32 rows, each a run of tiles over
k_step columns (64 for INT8, 128 for INT4). A tile is two halves of 16 rows in VNNI order: byte
(col // 4)·64 + row·4 + col % 4. INT4 tiles are 64 bytes wide: column c < 64 in the low nibble of
byte c, column c >= 64 in the high nibble of byte c - 64.

Our storage is exact for all of it except int8 down with P > 1 (kt keeps a scale per row per part,
ours one per row): that projection is dequantized exactly and requantized with ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import AdapterError
from .experts import ExpertWeights
from .quantize import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    QuantizedStack,
    _int8,
    resolve_method,
)

K_BLOCK, N_STEP, TILE_N = 3584, 32, 16


@dataclass(frozen=True)
class _Packing:
    name: str  # kt-kernel's name in the .kt file names
    n_block: int  # rows per block
    k_step: int  # columns per tile
    values_per_byte: int
    scale_factor: float  # w = scale · scale_factor · q


_PACKINGS = {
    "int8": _Packing("INT8", n_block=64, k_step=64, values_per_byte=1, scale_factor=1.0),
    "int4": _Packing("INT4", n_block=128, k_step=128, values_per_byte=2, scale_factor=16.0),
}


def kt_layout(path: str | Path, layer: int) -> str:
    """``"kt"`` for ``_layer_{L}/_numa_*/*.kt`` files, ``"safetensors"`` for merged ``blk.*`` keys."""
    path = Path(path)
    if any((path / f"_layer_{layer}" / "_numa_0").glob("*.kt")):
        return "kt"
    if _safetensors_files(path):
        return "safetensors"
    raise AdapterError(path, None, f"kt-kernel converted weights (_layer_{layer}/_numa_0/*.kt or *.safetensors)", "neither")


def kt_numa_parts(path: str | Path, layer: int) -> int:
    """How many NUMA parts the converter split each layer into (its --threadpool-count)."""
    path = Path(path)
    if kt_layout(path, layer) == "kt":
        return sum(1 for _ in (path / f"_layer_{layer}").glob("_numa_*"))
    keys = _safetensors_keys(path)
    parts = 0
    while f"blk.{layer}.ffn_gate_exps.0.numa.{parts}.weight" in keys:
        parts += 1
    if not parts:
        raise AdapterError(path, f"blk.{layer}.ffn_gate_exps.0.numa.0.weight", "this key", "none")
    return parts


def read_kt_layer(
    path: str | Path,
    layer: int,
    method: str,
    num_experts: int,
    hidden: int,
    intermediate: int,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> ExpertWeights:
    """One layer of kt-kernel's converted experts (``int8`` / ``AMXINT8``, ``int4`` / ``AMXINT4``)
    as ExpertWeights in the same method. ``group_size`` is that of our int4 (kt's scale is per row,
    so any group size dividing I / P holds it exactly)."""
    method = resolve_method(method)
    if method not in _PACKINGS:
        raise ValueError(f"kt-kernel converted weights are int8 or int4, not {method}")
    packing = _PACKINGS[method]
    source = _KtFiles(Path(path), layer, packing) if kt_layout(path, layer) == "kt" else _MergedSafetensors(Path(path), layer)
    parts = kt_numa_parts(path, layer)
    E, H, I = num_experts, hidden, intermediate
    if I % parts or (I // parts) % packing.k_step or H % packing.k_step:
        raise AdapterError(path, None, f"hidden and intermediate / {parts} parts multiples of {packing.k_step}", f"{H} and {I}")
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size}: expected one of {INT4_GROUP_SIZES}")
    n_part = I // parts
    # Filled one expert at a time, so that memory peaks near the final size.
    gate_up = _empty(method, E, 2 * I, H, group_size)
    down = _empty(method, E, H, I, group_size)
    for e in range(E):
        rows = [_unpack(source, p, e, part, n_part, H, packing) for p in ("gate", "up") for part in range(parts)]
        gate_up.data[e], gate_up.scale[e] = _expert_to_ours(torch.cat([q for q, _ in rows]), torch.cat([s for _, s in rows]), method, group_size)
        cols = [_unpack(source, "down", e, part, H, n_part, packing) for part in range(parts)]
        down.data[e], down.scale[e] = _expert_to_ours(torch.cat([q for q, _ in cols], 1), torch.cat([s for _, s in cols], 1), method, group_size)
    return ExpertWeights(gate_up, down)


def _unpack(source, proj: str, expert: int, part: int, n: int, k: int, packing: _Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """kt's packed bytes of one part -> (q [n, k] int8 in natural order, scale [n, 1] with kt's factor folded in)."""
    raw, scale, where = source.read(proj, expert, part)
    if raw.size * packing.values_per_byte != n * k:
        raise AdapterError(where, None, f"{n * k // packing.values_per_byte} quant bytes ({packing.name} [{n}, {k}])", f"{raw.size}")
    if scale.size != n:
        raise AdapterError(where, None, f"{n} float32 scales", f"{scale.size}")
    offset, high = _byte_offsets(n, k, packing)
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).astype(np.int16))[offset]  # [n, k]
    if packing.values_per_byte == 2:
        nibble = torch.where(high, data >> 4, data & 0x0F)
        data = torch.where(nibble >= 8, nibble - 16, nibble)  # signed nibble
    else:
        data = torch.where(data >= 128, data - 256, data)
    return data.to(torch.int8), torch.from_numpy(scale.astype(np.float32)).view(n, 1) * packing.scale_factor


@lru_cache(maxsize=16)
def _byte_offsets(n: int, k: int, packing: _Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """Where value (row, col) of an [n, k] matrix lies in kt's buffer: byte offset [n, k], and
    whether it is the high nibble (int4)."""
    row, col = torch.arange(n).view(n, 1), torch.arange(k).view(1, k)
    n_block_begin = row // packing.n_block * packing.n_block
    n_block_size = (n - n_block_begin).clamp(max=packing.n_block)
    k_block_begin = col // K_BLOCK * K_BLOCK
    k_block_size = (k - k_block_begin).clamp(max=K_BLOCK)
    strip = (row - n_block_begin) // N_STEP * N_STEP
    tile_col = (col - k_block_begin) // packing.k_step * packing.k_step
    values = n_block_begin * k + k_block_begin * n_block_size + strip * k_block_size + tile_col * N_STEP
    r, c = row % N_STEP, col % packing.k_step % 64  # int4: columns 64..127 share bytes with 0..63
    in_tile = (r // TILE_N) * TILE_N * 64 + (c // 4) * TILE_N * 4 + (r % TILE_N) * 4 + c % 4
    return values // packing.values_per_byte + in_tile, (col % packing.k_step >= 64)


def kt_layer_sizes(method: str, num_experts: int, hidden: int, intermediate: int, group_size: int = DEFAULT_GROUP_SIZE) -> ExpertWeights:
    """ExpertWeights with the sizes of a converted layer and no data (meta tensors): the kt backend
    loading the files itself needs only the sizes."""
    method = resolve_method(method)
    E, H, I = num_experts, hidden, intermediate
    return ExpertWeights(_empty(method, E, 2 * I, H, group_size, "meta"), _empty(method, E, H, I, group_size, "meta"))


def _empty(method: str, E: int, N: int, K: int, group_size: int, device: str = "cpu") -> QuantizedStack:
    if method == "int8":
        return QuantizedStack("int8", torch.empty(E, N, K, dtype=torch.int8, device=device), torch.empty(E, N, 1, device=device))
    return QuantizedStack("int4", torch.empty(E, N, K // 2, dtype=torch.uint8, device=device),
                          torch.empty(E, N, K // group_size, device=device), group_size)


def _expert_to_ours(q: torch.Tensor, scale: torch.Tensor, method: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert: q [N, K] int8 with a scale per row per part [N, P] (P equal spans of K) -> our data and scale."""
    K, P = q.shape[1], scale.shape[1]
    if method == "int8":
        if P == 1 or bool((scale == scale[:, :1]).all()):
            return q, scale[:, :1]
        return _int8(q.float() * scale.repeat_interleave(K // P, dim=1))  # ours has one scale per row: requantize
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # our nibble: q + 8, element 2j low, 2j+1 high
    return u[:, 0::2] | (u[:, 1::2] << 4), scale.repeat_interleave(K // P // group_size, dim=1)  # [N, K/2], [N, G]


class _KtFiles:
    """_layer_{L}/_numa_{p}/{INT8|INT4}_{proj}_{e}_{bytes}Byte_{quant|scale}_.kt"""

    def __init__(self, path: Path, layer: int, packing: _Packing):
        self.layer_dir, self.packing = path / f"_layer_{layer}", packing

    def read(self, proj: str, expert: int, part: int) -> tuple[np.ndarray, np.ndarray, Path]:
        folder = self.layer_dir / f"_numa_{part}"
        quant = self._one(folder, f"{self.packing.name}_{proj}_{expert}_*Byte_quant_.kt")
        scale = self._one(folder, f"{self.packing.name}_{proj}_{expert}_*Byte_scale_.kt")
        return np.fromfile(quant, dtype=np.int8), np.fromfile(scale, dtype=np.float32), quant

    @staticmethod
    def _one(folder: Path, pattern: str) -> Path:
        found = sorted(folder.glob(pattern))
        if len(found) != 1:
            raise AdapterError(folder, pattern, "one file", str(len(found)))
        return found[0]


class _MergedSafetensors:
    """blk.{L}.ffn_{proj}_exps.{e}.numa.{p}.{weight|scale} in any *.safetensors under the folder."""

    def __init__(self, path: Path, layer: int):
        from safetensors import safe_open

        self.path, self.layer, self.keys = path, layer, _safetensors_keys(path)
        self.handles = {file: safe_open(file, framework="pt") for file in set(self.keys.values())}

    def read(self, proj: str, expert: int, part: int) -> tuple[np.ndarray, np.ndarray, Path]:
        base = f"blk.{self.layer}.ffn_{proj}_exps.{expert}.numa.{part}"
        tensors = []
        for key in (f"{base}.weight", f"{base}.scale"):
            if key not in self.keys:
                raise AdapterError(self.path, key, "this key", "none")
            tensors.append(self.handles[self.keys[key]].get_tensor(key).contiguous().view(-1).numpy())
        return tensors[0], tensors[1], self.keys[f"{base}.weight"]


def _safetensors_files(path: Path) -> list[Path]:
    # kt-kernel's SafeTensorLoader takes every *.safetensors under the folder, subfolders included.
    return sorted(Path(root) / f for root, _, files in os.walk(path) for f in files if f.endswith(".safetensors"))


def _safetensors_keys(path: Path) -> dict[str, Path]:
    from safetensors import safe_open

    keys = {}
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            keys.update((key, file) for key in f.keys())  # noqa: SIM118 (a safe_open, not a dict)
    return keys

"""Adapter formats: detection, one reader per format, all yielding the canonical form."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from ..lora import ExpertLoRA
from ..model_config import MoEConfig
from .base import AdapterReader, read_header
from .canonical import FORMAT_TAG, KT_FILE_NAME, StackedReader, is_stacked_key
from .peft import WEIGHTS_NAME, open_peft
from .seed_pt import SeedPtReader

FORMATS = ("peft-per-expert", "peft-fused", "kt", "expertlora", "seed-pt")
ORIENTATIONS = ("auto", "new", "old")


def open_adapter(
    path: str | Path,
    base: MoEConfig | None = None,
    orientation: str = "auto",
    lora_alpha: float | None = None,
) -> AdapterReader:
    """Detect the format of ``path`` (a file or a PEFT / KTransformers adapter directory) and open it.

    Every shape is checked on opening; tensors are read per layer. ``base`` (the model's
    MoEConfig) is needed for fused PEFT adapters and checked against the adapter when given.
    ``orientation`` forces the reading of a fused PEFT adapter ("new": peft >= 0.19.1, "old").
    ``lora_alpha`` is used only for a KTransformers file without an adapter_config.json.
    """
    from ..validate import check_against_base

    if orientation not in ORIENTATIONS:
        raise AdapterError(path, "--orientation", f"one of {', '.join(ORIENTATIONS)}", repr(orientation))
    reader = _open(Path(path), base, orientation, lora_alpha)
    if base is not None:
        check_against_base(reader.info, base)
    return reader


def load_adapter(path: str | Path, base: MoEConfig | None = None, orientation: str = "auto", lora_alpha: float | None = None) -> ExpertLoRA:
    """Open and read a whole adapter into memory, in canonical form."""
    return open_adapter(path, base, orientation, lora_alpha).load()


def _open(path: Path, base: MoEConfig | None, orientation: str, lora_alpha: float | None) -> AdapterReader:
    if path.is_dir():
        for name in (KT_FILE_NAME, WEIGHTS_NAME):
            if (path / name).is_file():
                return _open(path / name, base, orientation, lora_alpha)
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(path / "adapter_model.bin", None, "adapter_model.safetensors (pickle files are never loaded; re-save with safe_serialization=True)", "a pickle file")
        raise AdapterError(path, None, f"an adapter directory with {WEIGHTS_NAME} or {KT_FILE_NAME}", "neither")
    if not path.is_file():
        raise AdapterError(path, None, "an adapter file or directory", "no such file")
    if path.suffix in (".pt", ".pth"):
        return SeedPtReader(path)
    if path.suffix == ".bin":
        raise AdapterError(path, None, "safetensors or a seed .pt file (pickle .bin files are never loaded)", "a .bin file")
    meta, header = read_header(path)
    keys = list(header)
    stacked = [k for k in keys if is_stacked_key(k)]
    if meta.get("format") == FORMAT_TAG or (stacked and len(stacked) == len(keys)):
        return StackedReader(path, lora_alpha)
    if stacked:
        raise AdapterError(path, stacked[0], "one adapter layout per file", "stacked and PEFT keys mixed")
    return open_peft(path, base, orientation)

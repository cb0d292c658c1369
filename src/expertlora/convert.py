"""convert and export-peft: stream an adapter layer by layer into a new file, atomically."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.progress import Progress

from .errors import AdapterError
from .export import LAYOUTS, export_peft, replace_path, write_modules_dir
from .formats import open_adapter
from .formats.base import AdapterReader
from .formats.canonical import metadata, write_safetensors
from .formats.seed_pt import write_pt
from .lora import LayerLoRA
from .model_config import MoEConfig

OUTPUT_FORMATS = ("safetensors", "pt")
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def sidecar_path(out: Path) -> Path:
    """Where `convert` puts the non-expert LoRA: a PEFT directory beside the expert file."""
    return out.with_name(out.stem + ".non_expert")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    base: MoEConfig | None = None,
    output_format: str = "safetensors",
    dtype: str = "keep",
    orientation: str = "auto",
    lora_alpha: float | None = None,
    progress: bool = True,
) -> AdapterReader:
    """Convert any readable adapter to the canonical stacked file (or the seed's ``.pt``).

    Non-expert LoRA, if any, goes beside it as a PEFT directory (``sidecar_path(out)``).
    Nothing is left at ``out`` unless the whole conversion succeeds.
    """
    out = Path(out)
    if output_format not in OUTPUT_FORMATS:
        raise AdapterError(out, "--output-format", f"one of {', '.join(OUTPUT_FORMATS)}", repr(output_format))
    if dtype not in DTYPES:
        raise AdapterError(out, "--dtype", f"one of {', '.join(DTYPES)}", repr(dtype))
    reader = open_adapter(src, base, orientation, lora_alpha)
    info = reader.info
    out_dtype = DTYPES[dtype] or info.dtype
    sidecar = sidecar_path(out) if info.modules else None
    with _staged(out) as tmp, _staged(sidecar, is_dir=True) as tmp_sidecar:
        layers = _layers(reader, progress, f"converting {Path(src).name}")
        if output_format == "safetensors":
            write_safetensors(info, layers, tmp, out_dtype, metadata(info, sidecar.name if sidecar else None))
        else:
            write_pt(info, layers, tmp, out_dtype)
        if sidecar:
            write_modules_dir(tmp_sidecar, info, reader.read_modules(), DTYPES[dtype])
    return reader


def export(
    src: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "fused",
    base: MoEConfig | None = None,
    dtype: str = "keep",
    orientation: str = "auto",
    lora_alpha: float | None = None,
    progress: bool = True,
) -> AdapterReader:
    """Write any readable adapter as a PEFT adapter directory (per-expert or fused layout)."""
    out_dir = Path(out_dir)
    if layout not in LAYOUTS:
        raise AdapterError(out_dir, "--layout", f"one of {', '.join(LAYOUTS)}", repr(layout))
    if dtype not in DTYPES:
        raise AdapterError(out_dir, "--dtype", f"one of {', '.join(DTYPES)}", repr(dtype))
    reader = open_adapter(src, base, orientation, lora_alpha)
    with _staged(out_dir, is_dir=True) as tmp:
        layers = _layers(reader, progress, f"exporting {Path(src).name}")
        export_peft(reader.info, layers, reader.read_modules(), tmp, layout, DTYPES[dtype], base)
    return reader


def _layers(reader: AdapterReader, progress: bool, what: str) -> Iterator[LayerLoRA]:
    layer_ids = sorted(reader.info.layers)
    if not progress:
        yield from (reader.read_layer(L) for L in layer_ids)
        return
    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=len(layer_ids))
        for L in layer_ids:
            yield reader.read_layer(L)
            bar.advance(task)


@contextmanager
def _staged(final: Path | None, is_dir: bool = False):
    """A temporary path beside ``final``, moved into place only if the block succeeds.

    On failure nothing is left: not the temporary, not the parent folders made for it.
    """
    if final is None:
        yield None
        return
    if final.exists() and final.is_dir() != is_dir:
        want, found = ("a directory", "a file") if is_dir else ("a file", "a directory")
        raise AdapterError(final, None, f"{want} path for the output", f"an existing {found}")
    made = [p for p in reversed(final.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        replace_path(tmp, final)
    except BaseException:
        _remove(tmp)
        for p in reversed(made):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()

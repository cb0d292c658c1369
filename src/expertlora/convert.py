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
from .formats.canonical import metadata, narrowed, output_error, set_default_mode, tensor_key, write_safetensors
from .formats.seed_pt import write_pt
from .lora import LayerLoRA, ProjLoRA
from .model_config import MoEConfig

OUTPUT_FORMATS = ("safetensors", "pt")
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}
# Output names and the format a reader takes them for (formats.open_adapter decides by suffix).
_PT_SUFFIXES = (".pt", ".pth")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".ckpt")
# What an output folder (export-peft's, convert's non-expert sidecar) may hold to be replaced.
_PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def sidecar_path(out: Path) -> Path:
    """Where `convert` puts the non-expert LoRA: a PEFT directory beside the expert file."""
    return out.with_name(out.stem + ".non_expert")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    base: MoEConfig | None = None,
    output_format: str | None = None,
    dtype: str = "keep",
    orientation: str = "auto",
    lora_alpha: float | None = None,
    progress: bool = True,
) -> AdapterReader:
    """Convert any readable adapter to the canonical stacked file (or the seed's ``.pt``).

    ``output_format``: ``safetensors`` or ``pt``; None: by the name of ``out`` (``.pt`` / ``.pth``:
    the seed layout). Non-expert LoRA, if any, goes beside it as a PEFT directory
    (``sidecar_path(out)``). Nothing is left at ``out`` unless the whole conversion succeeds; an
    output that is, holds or lies inside an input is refused before anything is written.
    """
    out = Path(out)
    output_format = output_format_for(out, output_format)
    if dtype not in DTYPES:
        raise AdapterError(out, "--dtype", f"one of {', '.join(DTYPES)}", repr(dtype))
    reader = open_adapter(src, base, orientation, lora_alpha)
    info = reader.info
    out_dtype = DTYPES[dtype] or info.dtype
    sidecar = sidecar_path(out) if info.modules else None
    check_outputs([out] + ([sidecar] if sidecar else []), _inputs(src, reader), base)
    _check_modules(reader, base)
    with _staged(out) as tmp, _staged(sidecar, is_dir=True) as tmp_sidecar:
        layers = (_narrowed(layer, out_dtype, info.path) for layer in _layers(reader, progress, f"converting {Path(src).name}"))
        if output_format == "safetensors":
            write_safetensors(info, layers, tmp, out_dtype, metadata(info, sidecar.name if sidecar else None))
        else:
            write_pt(info, layers, tmp, out_dtype)
        if sidecar:
            write_modules_dir(tmp_sidecar, info, _check_modules(reader, base, reader.read_modules()), DTYPES[dtype])
    return reader


def output_format_for(out: Path, output_format: str | None) -> str:
    """The output format from ``--output-format`` or, when None, from the output's name (``.pt`` /
    ``.pth``: the seed layout). A pickle's name (``x.bin``) is refused, and so is a safetensors
    file under a ``.pt`` name, which readers would take for the seed layout."""
    suffix = out.suffix.lower()
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise AdapterError(out, "--output-format", f"one of {', '.join(OUTPUT_FORMATS)}", repr(output_format))
    if suffix in _PICKLE_SUFFIXES:
        raise AdapterError(out, "-o", "a .safetensors (or seed .pt) output name; expertlora never writes pickle files", f"a {suffix} name")
    by_name = "pt" if suffix in _PT_SUFFIXES else "safetensors"
    if output_format == "safetensors" and by_name == "pt":
        raise AdapterError(out, "-o", "a name not ending in .pt / .pth for --output-format safetensors (those are read as seed .pt files)", repr(out.name))
    return output_format or by_name


def check_outputs(outputs: list[Path], inputs: list[Path], base: MoEConfig | None = None) -> None:
    """No output may be an input, lie inside an input directory, or hold an input (replacing it
    would delete the input); the base model's directory counts as an input."""
    ins = [(p, _resolved(p)) for p in inputs]
    if base is not None and base.path is not None:
        ins.append((base.path.parent, _resolved(base.path.parent)))
    for out in outputs:
        o = _resolved(out)
        for given, i in ins:
            if o == i:
                raise AdapterError(out, "-o", "an output path that is not an input", f"the input {given}")
            if i in o.parents:
                raise AdapterError(out, "-o", "an output outside the input's directory", f"inside the input {given}")
            if o in i.parents:
                raise AdapterError(out, "-o", "an output that does not hold an input (it would be replaced)", f"it holds the input {given}")


def _inputs(src: str | Path, reader: AdapterReader) -> list[Path]:
    """Every file or directory the reader reads: the adapter, a PEFT directory beside it, its config."""
    src = Path(src)
    found = [src]
    if getattr(reader, "sidecar", None) is not None:
        found.append(Path(reader.sidecar))
    if src.is_file() and (src.parent / "adapter_config.json").is_file():
        found.append(src.parent / "adapter_config.json")
    return found


def _resolved(p: Path) -> Path:
    try:
        return Path(os.path.realpath(p))
    except (OSError, ValueError):
        return Path(os.path.abspath(p))


def _check_modules(reader: AdapterReader, base: MoEConfig | None, modules=None):
    """With a base model, every non-expert module the adapter targets must be one of its linear
    layers (names first; shapes once the modules are read)."""
    if base is not None and reader.info.modules:
        from .base_modules import check_base_modules

        check_base_modules(reader.info, base, modules)
    return modules


def _narrowed(layer: LayerLoRA, dtype: torch.dtype, path: Path) -> LayerLoRA:
    """``layer`` in the output dtype; a value that overflows it is refused, naming the tensor."""
    out = LayerLoRA(layer.layer)
    for proj, lora in layer.projections().items():
        a, b = (narrowed(t, dtype, path, tensor_key(layer.layer, proj, ab)) for ab, t in (("a", lora.a), ("b", lora.b)))
        setattr(out, proj, ProjLoRA(a, b, lora.spec))
    return out


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
    check_outputs([out_dir], _inputs(src, reader), base)
    _check_modules(reader, base)
    with _staged(out_dir, is_dir=True) as tmp:
        layers = _layers(reader, progress, f"exporting {Path(src).name}")
        export_peft(reader.info, layers, _check_modules(reader, base, reader.read_modules()), tmp, layout, DTYPES[dtype], base)
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
    if _exists(final) and final.is_dir() != is_dir:
        want, found = ("a directory", "a file") if is_dir else ("a file", "a directory")
        raise AdapterError(final, None, f"{want} path for the output", f"an existing {found}")
    if is_dir and _exists(final) and final.is_dir() and not final.is_symlink():
        # replacing it deletes what it holds: only a PEFT adapter folder (an earlier output) goes
        other = next((p.name for p in final.iterdir() if p.name not in _PEFT_FILES), None)
        if other is not None:
            raise AdapterError(final, "-o", "a new folder, or a PEFT adapter folder to replace", f"a folder that also holds {other!r}")
    made = [p for p in reversed(final.parents) if not _exists(p)]
    tmp = temporary_beside(final)
    try:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(final, e) from None
        try:
            yield tmp
            set_default_mode(tmp)  # not the 0600 of a private temporary file
            replace_path(tmp, final)
        except OSError as e:
            if e.filename is None or _within(Path(e.filename), tmp) or _within(Path(e.filename), final):
                raise output_error(final, e) from None  # the path the user gave, not the temporary
            raise
    except BaseException:
        _remove(tmp)
        for p in reversed(made):
            try:
                if p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
            except OSError:
                pass
        raise


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:  # a name too long, say: nothing is there
        return False


def _within(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def temporary_beside(final: Path) -> Path:
    """A hidden temporary name in ``final``'s folder, short enough for any file system."""
    return final.with_name(f".{final.name[:100]}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    try:  # cleaning up after a failure must not raise in its place
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass

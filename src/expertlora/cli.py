"""The command line: thin wrappers over the library functions."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import AdapterError

app = typer.Typer(
    name="expertlora",
    help="Mixture-of-Experts models with LoRA on their experts: read, check, convert and export adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

BaseOpt = Annotated[
    Optional[Path],
    typer.Option("--base", "--model", help="Hugging Face checkpoint directory (its config.json) to check the adapter against; needed for fused PEFT adapters without a local base_model_name_or_path."),
]
OrientationOpt = Annotated[
    str,
    typer.Option("--orientation", help="Fused PEFT layout: auto (by peft_version, else shapes), new (peft >= 0.19.1) or old (peft 0.17-0.19.0)."),
]
AlphaOpt = Annotated[
    Optional[float],
    typer.Option("--lora-alpha", "--kt-moe-lora-alpha", help="LoRA alpha for a KTransformers file that has no adapter_config.json beside it."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Output dtype: keep, bf16 or fp32.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]


@contextmanager
def _errors():
    """Bad input: one line on stderr, exit code 2. Other I/O failures: one line, exit code 1."""
    try:
        yield
    except AdapterError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as e:
        err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _base(base: Path | None):
    from .model_config import MoEConfig

    return MoEConfig.from_model_dir(base) if base is not None else None


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="Adapter: a PEFT or KTransformers directory, a .safetensors file or a seed .pt file.")],
    base: BaseOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Check shapes only; skip reading every tensor for NaN / Inf.")] = False,
    orientation: OrientationOpt = "auto",
    lora_alpha: AlphaOpt = None,
    progress: ProgressOpt = True,
):
    """Show what an adapter holds: format, layers, experts, rank / alpha / scaling, non-expert modules."""
    from .convert import _layers
    from .formats import open_adapter
    from .report import describe, print_report

    with _errors():
        reader = open_adapter(path, _base(base), orientation, lora_alpha)
        if not quick:
            for _ in _layers(reader, progress and not as_json, f"checking {path.name}"):
                pass
            reader.read_modules()
        report = describe(reader)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, console)


@app.command()
def convert(
    path: Annotated[Path, typer.Argument(help="Adapter in any readable format.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (.safetensors, or .pt with --output-format pt).")],
    base: BaseOpt = None,
    output_format: Annotated[str, typer.Option("--output-format", help="safetensors (canonical, KTransformers-compatible keys) or pt (the seed layout).")] = "safetensors",
    dtype: DtypeOpt = "keep",
    orientation: OrientationOpt = "auto",
    lora_alpha: AlphaOpt = None,
    progress: ProgressOpt = True,
):
    """Convert an adapter to the canonical stacked file, layer by layer.

    Non-expert LoRA (attention, shared experts, dense MLP) is written beside it as a PEFT
    directory OUTPUT_STEM.non_expert/.
    """
    from .convert import convert as run, sidecar_path

    with _errors():
        reader = run(path, output, base=_base(base), output_format=output_format, dtype=dtype, orientation=orientation, lora_alpha=lora_alpha, progress=progress)
    info = reader.info
    console.print(f"{info.format} -> {output} ({len(info.layers)} layers, {info.num_experts} experts)", highlight=False)
    if info.modules:
        console.print(f"non-expert LoRA ({len(info.modules)} modules) -> {sidecar_path(output)}", highlight=False)


@app.command("export-peft")
def export_peft(
    path: Annotated[Path, typer.Argument(help="Adapter in any readable format.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output PEFT adapter directory.")],
    layout: Annotated[str, typer.Option("--layout", help="fused (transformers 5.x target_parameters) or per-expert (transformers 4.x).")] = "fused",
    base: BaseOpt = None,
    dtype: DtypeOpt = "keep",
    orientation: OrientationOpt = "auto",
    lora_alpha: AlphaOpt = None,
    progress: ProgressOpt = True,
):
    """Write an adapter as a PEFT adapter directory that PEFT, vLLM or SGLang can load."""
    from .convert import export

    with _errors():
        reader = export(path, output, layout=layout, base=_base(base), dtype=dtype, orientation=orientation, lora_alpha=lora_alpha, progress=progress)
    console.print(f"{reader.info.format} -> {output} (PEFT, {layout})", highlight=False)


@app.command()
def demo(
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Keep the generated files here instead of a temporary directory.")] = None,
):
    """Build a tiny random MoE model and PEFT adapter, then inspect, convert, export and check them against PEFT."""
    from .demo import run_demo

    with _errors():
        ok = run_demo(workdir, console)
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app(prog_name="expertlora")


if __name__ == "__main__":
    sys.exit(main())

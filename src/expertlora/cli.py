"""The command line: thin wrappers over the library functions.

Bad input (the library's AdapterError / ValueError, and option values click cannot parse) is one
line on stderr, ``error: ...``, and exit code 2; an operating-system failure (disk full) is one
line and exit code 1; anything else is a bug, reported on one line with exit code 1 (set
EXPERTLORA_TRACEBACK=1 to see its traceback).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # typer >= 0.26 carries its own copy of click: its exceptions are that copy's
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_errors

from .errors import AdapterError

TRACEBACK_ENV = "EXPERTLORA_TRACEBACK"


def _one_line(text: str) -> str:
    """``text`` on one line, whatever it holds: terminal escapes dropped, controls escaped."""
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", str(text)).strip()
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(message: str, code: int):
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


def _model_dir(positional: Path | None, option: Path | None, command: str) -> Path:
    """The model directory, given as MODEL or --model / --model-path (once)."""
    if positional is not None and option is not None and positional != option:
        _fail(f"the model is given twice: MODEL {positional} and --model {option}; give one (see expertlora {command} --help)", 2)
    if positional is None and option is None:
        _fail(f"missing the model directory: expertlora {command} MODEL, or --model / --model-path (see expertlora {command} --help)", 2)
    return positional if positional is not None else option


def _internal(where: str, e: BaseException):
    """Not bad input but a bug: one honest line instead of a traceback (EXPERTLORA_TRACEBACK=1 shows it)."""
    if os.environ.get(TRACEBACK_ENV):
        raise e
    _fail(f"{where}: internal error ({type(e).__name__}: {str(e)[:300]}); this is a bug in expertlora, "
          f"not a problem with the input: please report it (set {TRACEBACK_ENV}=1 for the traceback)", 1)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, ``warning: ...``, without Python's source location."""
    return f"warning: {_one_line(str(message))}\n"


def _os_error(e: OSError) -> str:
    where = e.filename if e.filename is not None else None
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where is not None else reason


class _Group(TyperGroup):
    """Click's own errors (an option value it cannot parse, a missing option) as one line too."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        warnings.formatwarning = _warning_line
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:  # the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            command = e.ctx.command_path if getattr(e, "ctx", None) is not None else "expertlora"
            typer.echo(f"error: {_one_line(e.format_message())} (see {command} --help)", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        except Exception as e:  # the last resort: never a traceback
            try:
                _internal("expertlora", e)
            except typer.Exit as exit_:
                sys.exit(exit_.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="expertlora",
    cls=_Group,
    help="Mixture-of-Experts models with LoRA on their routed experts, never merged: inspect, convert and export "
         "adapters (PEFT, KTransformers, canonical, seed .pt); run, profile or serve a checkpoint on the expertlora engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool):
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from . import __version__

        try:
            number = version("expertlora")
        except PackageNotFoundError:
            number = __version__
        typer.echo(f"expertlora {number}")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    pass


def _finite_alpha(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, found {value}")
    return value


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
    typer.Option("--lora-alpha", "--kt-moe-lora-alpha", callback=_finite_alpha, help="LoRA alpha for a KTransformers file that has no adapter_config.json beside it."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Output dtype: keep, bf16 or fp32.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
GroupSizeOpt = Annotated[Optional[int], typer.Option("--group-size", help="int4 only: force one group size (32, 64 or 128) for every projection; it must divide the hidden and intermediate sizes. Default: per projection, the largest of 128 / 64 / 32 dividing its input size, else one group per row.")]
# The serving engine's limits (run --prompts-file, serve).
MaxNumSeqsOpt = Annotated[int, typer.Option("--max-num-seqs", help="Sequences decoding at once; each holds a KV cache region of --max-model-len tokens.")]
MaxModelLenOpt = Annotated[Optional[int], typer.Option("--max-model-len", help="Prompt plus generated tokens per request (default: the model's context, at most 4096).")]
MaxPrefillTokensOpt = Annotated[int, typer.Option("--max-prefill-tokens", help="Prompt tokens per engine step: longer prompts are prefilled in chunks, so running requests keep decoding.")]
KvCacheMemoryOpt = Annotated[Optional[int], typer.Option("--kv-cache-memory", help="Bytes for the KV cache (default: half the GPU's free memory, or a quarter of the host's available memory up to 8 GiB).")]
MaxLoadedAdaptersOpt = Annotated[int, typer.Option("--max-loaded-adapters", "--max-loras", help="Adapters loaded at once; loading one more evicts the least recently used idle one.")]
GpuPrefillOpt = Annotated[Optional[int], typer.Option("--gpu-prefill-threshold", "--kt-gpu-prefill-token-threshold", help="With --device cuda: a forward of at least this many tokens (a long prompt) runs the CPU experts on the GPU too, their weights copied there layer by layer while the previous layer computes; needs GPU memory for about two layers of experts (a Qwen3-30B-A3B layer: 1.2 GB in bf16), refused at load without it. Default: the method's measured crossover on the H200 host: with AMX bf16 1024, int8 128, int4 32; without AMX bf16 128, int8 64, int4 32; fp32 off. 0: off.")]
ModelArg = Annotated[Optional[Path], typer.Argument(metavar="MODEL", show_default=False, help="Hugging Face checkpoint directory of a MoE model (or --model).")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", "--model-path", help="The model directory, as SGLang names it (or MODEL, as vLLM does).")]
CudaGraphsOpt = Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="With --device cuda and bf16: replay decode steps as CUDA graphs (CPU experts inside them through host nodes).")]


@contextmanager
def _errors(command: str):
    """The body of ``command``: bad input is one line and exit code 2 (AdapterError, and every
    ValueError the library raises for a bad value); an OS failure is one line and exit code 1;
    anything else is reported on one line as a bug (exit code 1), never as a traceback."""
    try:
        yield
    except (typer.Exit, click_errors.ClickException, typer.Abort, KeyboardInterrupt):
        raise
    except ValueError as e:  # AdapterError included
        _fail(str(e), 2)
    except OSError as e:
        _fail(_os_error(e), 1)
    except Exception as e:
        _internal(command, e)


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
    from .base_modules import check_base_modules
    from .convert import _layers
    from .formats import open_adapter
    from .report import describe, print_report

    with _errors("inspect"):
        config = _base(base)
        reader = open_adapter(path, config, orientation, lora_alpha)
        modules = None
        if not quick:
            for _ in _layers(reader, progress and not as_json, f"checking {path.name}"):
                pass
            modules = reader.read_modules()
        if config is not None:  # every non-expert module it targets must be a linear layer of the base
            check_base_modules(reader.info, config, modules)
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
    output_format: Annotated[Optional[str], typer.Option("--output-format", help="safetensors (canonical, KTransformers-compatible keys) or pt (the seed layout). Default: by the output's name (.pt / .pth: pt, else safetensors; .bin is refused).")] = None,
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

    with _errors("convert"):
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

    with _errors("export-peft"):
        reader = export(path, output, layout=layout, base=_base(base), dtype=dtype, orientation=orientation, lora_alpha=lora_alpha, progress=progress)
    console.print(f"{reader.info.format} -> {output} (PEFT, {layout})", highlight=False)


@app.command()
def demo(
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Keep the generated files here instead of a temporary directory.")] = None,
):
    """Build a tiny random MoE model and PEFT adapter, then inspect, convert, export and check them against PEFT."""
    from .demo import run_demo

    with _errors("demo"):
        ok = run_demo(workdir, console)
    raise typer.Exit(0 if ok else 1)


@app.command()
def run(
    model_arg: ModelArg = None,
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "--kt-moe-lora-path", help="[NAME=]PATH of an adapter (any format inspect reads); repeat for several.")] = None,
    use: Annotated[Optional[str], typer.Option("--use", help="The adapter this prompt runs with, by NAME, or none. Default: the first --adapter.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Prompt text (needs a tokenizer in the model directory).")] = None,
    prompt_ids: Annotated[Optional[str], typer.Option("--prompt-ids", help="Prompt as token ids: 1,2,3.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate (at least 1; prompt and new tokens fit in the model's max_position_embeddings).")] = 32,
    method: Annotated[str, typer.Option("--method", "--kt-moe-sft-method", "--kt-method", help="Expert storage: fp32, bf16, int8 or int4 (AMXBF16_SFT / AMXINT8_SFT / AMXINT4_SFT).")] = "bf16",
    dtype: Annotated[str, typer.Option("--dtype", help="Non-expert layers: auto (fp32 with --method fp32, else bf16), bf16 or fp32.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", "--kt-cpuinfer", help="CPU threads for the experts (default: all cores; one fewer with --device cuda).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1] (default 1: all); needs --temperature > 0.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k likeliest tokens (0, the default: all); needs --temperature > 0.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling; needs --temperature > 0.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Generate all --max-new-tokens even past end-of-sequence.")] = False,
    lora_rank: Annotated[Optional[int], typer.Option("--kt-moe-lora-rank", help="Seed compatibility: must equal the adapter's rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--kt-moe-lora-alpha", help="Seed compatibility: must equal the adapter's alpha.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="cpu (ours: any method, mixed adapters per batch) or kt (kt-kernel's SFT MoE, installed separately: bf16 / int4, one adapter per batch).")] = "cpu",
    device: Annotated[str, typer.Option("--device", help="cpu, or cuda: attention and the other non-expert layers on the GPU, with --gpu-experts of each layer's experts there too; the rest run on the CPU at the same time.")] = "cpu",
    gpu_experts: Annotated[Optional[int], typer.Option("--gpu-experts", "--kt-num-gpu-experts", help="Experts per MoE layer kept on the GPU (with --device cuda; default 0).")] = None,
    gpu_ratio: Annotated[Optional[float], typer.Option("--gpu-experts-ratio", help="Share of each layer's experts kept on the GPU, 0 to 1 (instead of --gpu-experts).")] = None,
    kt_weight_path: Annotated[Optional[Path], typer.Option("--kt-weight-path", help="With --method int8 / int4: the experts from this folder of kt-kernel's converted weights (its convert_cpu_weights.py: _layer_L/_numa_N/*.kt or blk.* safetensors) instead of the checkpoint; bf16 / fp32 read --model, as the seed does.")] = None,
    placement: Annotated[str, typer.Option("--placement", help="Which experts go to the GPU: prefix (the first N, as the seed), uniform (spread over the ids), or a routing stats file from expertlora profile (each layer's most used).")] = "prefix",
    group_size: GroupSizeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: token_ids, text, prompt_tokens, tokens_per_s, adapter.")] = False,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file", help="Many requests at once through the serving engine: a JSON Lines file, one request per line ({\"id\", \"prompt_ids\" | \"prompt\" | \"messages\", \"adapter\", \"max_new_tokens\" (or \"max_tokens\"), \"temperature\", \"top_p\", \"top_k\", \"seed\", \"stop\", \"ignore_eos\"}); each result is printed as one JSON line when it finishes.")] = None,
    max_num_seqs: MaxNumSeqsOpt = 64,
    max_model_len: MaxModelLenOpt = None,
    max_prefill_tokens: MaxPrefillTokensOpt = 1024,
    kv_cache_memory: KvCacheMemoryOpt = None,
    max_loaded_adapters: MaxLoadedAdaptersOpt = 16,
    gpu_prefill_threshold: GpuPrefillOpt = None,
    cuda_graphs: CudaGraphsOpt = True,
    progress: ProgressOpt = True,
):
    """Generate from a MoE checkpoint with expert LoRA adapters (experts on the CPU engine, some on the GPU with --device cuda).

    One prompt (--prompt / --prompt-ids), or many at once with --prompts-file: they share the
    serving engine's continuous batches, each with its own adapter and sampling.
    """
    model = _model_dir(model_arg, model, "run")
    from .run import ModelOptions, Sampling, generate, load_setup

    if prompts_file is not None:
        with _errors("run"):
            given = [flag for flag, value, default in (
                ("--prompt", prompt, None), ("--prompt-ids", prompt_ids, None), ("--use", use, None), ("--temperature", temperature, 0.0),
                ("--top-p", top_p, None), ("--top-k", top_k, None), ("--seed", seed, None), ("--ignore-eos", ignore_eos, False), ("--json", as_json, False),
                ("--group-size", group_size, None),
            ) if value != default]
            if given:
                raise AdapterError(prompts_file, None, f"requests and their settings in the file ({given[0]} is per line with --prompts-file)", given[0])
            from .runtime import EngineConfig

            config = _engine_config(
                EngineConfig, model, adapter, method=method, dtype=dtype, device=device, gpu_experts=gpu_experts,
                gpu_experts_ratio=gpu_ratio, placement=placement, threads=threads, backend=backend, kt_weight_path=kt_weight_path,
                max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_prefill_tokens=max_prefill_tokens,
                kv_cache_memory=kv_cache_memory, max_loaded_adapters=max_loaded_adapters, gpu_prefill_threshold=gpu_prefill_threshold,
                cuda_graphs=cuda_graphs,
            )
            try:
                _run_prompts_file(config, prompts_file, max_new_tokens, lora_rank, lora_alpha, progress)
            except ValueError as e:  # AdapterError included: bad input, one line
                err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
        return

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, via PEFT
    out = _stdout_for_results() if backend == "kt" else sys.stdout
    with _errors("run"):  # every option is checked before the model loads
        sampling = Sampling(max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
        options = ModelOptions(
            model, tuple(adapter or ()), method=method, dtype=dtype, threads=threads, backend=backend, device=device,
            gpu_experts=gpu_experts, gpu_ratio=gpu_ratio, placement=placement, kt_weight_path=kt_weight_path,
            group_size=group_size, gpu_prefill_threshold=gpu_prefill_threshold, lora_rank=lora_rank, lora_alpha=lora_alpha,
        )
        setup = load_setup(options, use, prompt, prompt_ids, sampling=sampling, progress=progress)
        result = generate(setup.model, setup.prompt_ids, setup.adapter, sampling, setup.tokenizer, graphs=cuda_graphs)
    if as_json:
        print(json.dumps(result.to_json()), file=out, flush=True)
        return
    shown = Console(file=out)
    shown.print(result.text if result.text is not None else " ".join(map(str, result.token_ids)), markup=False, highlight=False)
    shown.print(
        f"[dim]{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, adapter {result.adapter or 'none'}, "
        f"method {setup.method}, backend {backend}, device {device}[/dim]"
    )
    out.flush()


def _engine_config(cls, model: Path, adapter_options: list[str] | None, **options):
    """An EngineConfig from the command line; a bad value is one line (AdapterError)."""
    from .run import parse_adapter_option

    try:
        adapters = [parse_adapter_option(a) for a in adapter_options or []]
        return cls(model, adapters=adapters, **options)
    except ValueError as e:
        raise AdapterError(model, None, "valid engine options", str(e)) from None


def _run_prompts_file(config, path: Path, max_new_tokens: int, lora_rank, lora_alpha, progress: bool) -> None:
    """run --prompts-file: check every line, load the engine, run them all, one JSON line each."""
    from rich.progress import Progress

    from .run import check_seed_flags, loading_bar
    from .runtime import Engine
    from .runtime.prompts_file import check_jobs, read_jobs, run_jobs

    jobs = read_jobs(path, max_new_tokens)  # every line checked before the model loads
    with Engine(config, progress=loading_bar if progress else None) as engine:
        paths = dict(config.adapters)
        for name, adapter in engine.lm.adapters.items():
            check_seed_flags(paths[name], adapter.info, lora_rank, lora_alpha)
        ids = check_jobs(path, jobs, engine)
        with Progress(console=err_console, transient=True, disable=not progress) as bar:
            task = bar.add_task("requests", total=len(jobs))
            run_jobs(engine, jobs, ids, lambda line: print(json.dumps(line), flush=True), lambda: bar.advance(task))


def _stdout_for_results():
    """kt-kernel's C++ code prints on file descriptor 1: send that to stderr for the rest of the
    process, and return a file on the real stdout, which carries only the result."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(real, "w")


@app.command()
def profile(
    prompts: Annotated[Path, typer.Option("--prompts", help="One prompt per line: text (needs a tokenizer in the model directory) or token ids 1,2,3.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Routing stats JSON to write (for frequency placement of GPU experts).")],
    model_arg: ModelArg = None,
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "--kt-moe-lora-path", help="[NAME=]PATH of an adapter (any format inspect reads); repeat for several.")] = None,
    use: Annotated[Optional[str], typer.Option("--use", help="The adapter the prompts run with, by NAME, or none. Default: the first --adapter.")] = None,
    method: Annotated[str, typer.Option("--method", "--kt-moe-sft-method", "--kt-method", help="Expert storage: fp32, bf16, int8 or int4.")] = "bf16",
    threads: Annotated[Optional[int], typer.Option("--threads", "--kt-cpuinfer", help="CPU threads for the experts (default: all cores).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy tokens generated after each prompt (0: prefill only).")] = 16,
    group_size: GroupSizeOpt = None,
    progress: ProgressOpt = True,
):
    """Record which experts each MoE layer routes to on sample prompts, for GPU expert placement."""
    model = _model_dir(model_arg, model, "profile")
    from rich.progress import track

    from .convert import check_outputs
    from .placement import profile as run_profile, read_prompts
    from .run import ModelOptions, adapter_choice, check_prompts, load_setup, load_tokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, via PEFT
    with _errors("profile"):
        if max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens {max_new_tokens}: expected 0 or more")
        _base(model)  # a bad model directory is named before the prompts are read
        adapter_choice(adapter or [], use)
        ids = read_prompts(prompts, load_tokenizer(model))
        check_prompts(model, ids, max_new_tokens)  # every prompt, before the model loads
        check_outputs([output], [prompts, model / "config.json"])
        # load_setup checks the options and loads the model; it takes one prompt: the first
        options = ModelOptions(model, tuple(adapter or ()), method=method, threads=threads, group_size=group_size)
        setup = load_setup(options, use, prompt=None, prompt_ids=",".join(map(str, ids[0])), progress=progress)
        bar = (lambda items, what: track(items, description=what, transient=True, console=err_console)) if progress else None
        stats = run_profile(setup.model, ids, setup.adapter, max_new_tokens, bar)
        stats.save(output)
    shares = [(c[e] / max(sum(c), 1), L, e) for L, c in stats.counts.items() for e in range(stats.num_experts)]
    (most, Lm, em), (least, Ll, el) = max(shares), min(shares)
    console.print(f"{stats.tokens} tokens, {len(stats.counts)} MoE layers, {stats.num_experts} experts -> {output}", highlight=False)
    console.print(f"most used: layer {Lm} expert {em}, {most:.1%} of its routed pairs; least used: layer {Ll} expert {el}, "
                  f"{least:.1%} (even: {1 / stats.num_experts:.1%})", highlight=False)


@app.command()
def serve(
    model_arg: ModelArg = None,
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "--kt-moe-lora-path", help="[NAME=]PATH of an adapter loaded at start (any format inspect reads); repeat for several.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The `model` value that selects the base (default: the model folder's name); `NAME:ADAPTER` selects an adapter too.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default; 0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one; the URL is printed when ready).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="EXPERTLORA_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 routes (or set EXPERTLORA_API_KEY).")] = None,
    adapter_dir: Annotated[Optional[list[Path]], typer.Option("--adapter-dir", help="A folder runtime loads (/v1/load_lora_adapter) may read from; repeat for several. Without one, runtime loads are allowed only on a loopback-only server.")] = None,
    method: Annotated[str, typer.Option("--method", "--kt-moe-sft-method", "--kt-method", help="Expert storage: fp32, bf16, int8 or int4 (AMXBF16_SFT / AMXINT8_SFT / AMXINT4_SFT).")] = "bf16",
    dtype: Annotated[str, typer.Option("--dtype", help="Non-expert layers: auto (fp32 with --method fp32, else bf16), bf16 or fp32.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", "--kt-cpuinfer", help="CPU threads for the experts (default: all cores; one fewer with --device cuda).")] = None,
    backend: Annotated[str, typer.Option("--backend", help="cpu (ours) or kt (kt-kernel's SFT MoE, installed separately).")] = "cpu",
    device: Annotated[str, typer.Option("--device", help="cpu, or cuda: the non-expert layers and --gpu-experts of each layer's experts on the GPU.")] = "cpu",
    gpu_experts: Annotated[Optional[int], typer.Option("--gpu-experts", "--kt-num-gpu-experts", help="Experts per MoE layer kept on the GPU (with --device cuda).")] = None,
    gpu_ratio: Annotated[Optional[float], typer.Option("--gpu-experts-ratio", help="Share of each layer's experts kept on the GPU, 0 to 1 (instead of --gpu-experts).")] = None,
    placement: Annotated[str, typer.Option("--placement", help="Which experts go to the GPU: prefix, uniform, or a routing stats file from expertlora profile.")] = "prefix",
    kt_weight_path: Annotated[Optional[Path], typer.Option("--kt-weight-path", help="With --method int8 / int4: the experts from kt-kernel's converted weights in this folder.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="int4 only: one group size (32, 64 or 128) for every projection (default: per projection).")] = None,
    gpu_prefill_threshold: GpuPrefillOpt = None,
    cuda_graphs: CudaGraphsOpt = True,
    lora_rank: Annotated[Optional[int], typer.Option("--kt-moe-lora-rank", help="Seed compatibility: must equal the adapters' rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--kt-moe-lora-alpha", help="Seed compatibility: must equal the adapters' alpha.")] = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", help="Sequences decoding at once (each holds a KV cache region of --max-model-len tokens).")] = 64,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", help="Prompt plus generated tokens per request (default: the model's context, at most 4096).")] = None,
    max_prefill_tokens: Annotated[int, typer.Option("--max-prefill-tokens", help="Prompt tokens per engine step; longer prompts are prefilled in chunks.")] = 1024,
    kv_cache_memory: Annotated[Optional[int], typer.Option("--kv-cache-memory", help="Bytes for the KV cache (default: a share of free memory).")] = None,
    max_loaded_adapters: Annotated[int, typer.Option("--max-loaded-adapters", "--max-loras", help="Adapters loaded at once; one more evicts the least recently used idle one.")] = 16,
    max_queued_requests: Annotated[int, typer.Option("--max-queued-requests", help="Requests waiting beyond the running batch; more get 503 with Retry-After.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body accepted (413 beyond).")] = 8 << 20,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", help="Seconds running requests get to finish on SIGINT / SIGTERM before they are aborted.")] = 30.0,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level: critical, error, warning, info, debug.")] = "warning",
    progress: ProgressOpt = True,
):
    """Serve the model over HTTP, OpenAI-compatible: /v1/completions, /v1/chat/completions (the `model` field picks the adapter), /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter, /health, /metrics."""
    model = _model_dir(model_arg, model, "serve")
    from .serve.launch import serve as run_server

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, via PEFT
    code = run_server(
        model=model, adapters=adapter or [], served_model_name=served_model_name, host=host, port=port, api_key=api_key,
        adapter_dirs=adapter_dir or [], lora_rank=lora_rank, lora_alpha=lora_alpha, max_body_bytes=max_body_bytes,
        shutdown_timeout=shutdown_timeout, progress=progress, log_level=log_level, method=method, dtype=dtype, threads=threads,
        backend=backend, device=device, gpu_experts=gpu_experts, gpu_experts_ratio=gpu_ratio, placement=placement,
        kt_weight_path=kt_weight_path, group_size=group_size, gpu_prefill_threshold=gpu_prefill_threshold, cuda_graphs=cuda_graphs,
        max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_prefill_tokens=max_prefill_tokens,
        kv_cache_memory=kv_cache_memory, max_loaded_adapters=max_loaded_adapters, max_queued_requests=max_queued_requests,
    )
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="expertlora")


if __name__ == "__main__":
    sys.exit(main())

"""The command line: thin wrappers over the library functions."""

from __future__ import annotations

import json
import os
import sys
import warnings
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


@app.command()
def run(
    model: Annotated[Path, typer.Option("--model", "--model-path", help="Hugging Face checkpoint directory of a MoE model.")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "--kt-moe-lora-path", help="[NAME=]PATH of an adapter (any format inspect reads); repeat for several.")] = None,
    use: Annotated[Optional[str], typer.Option("--use", help="The adapter this prompt runs with, by NAME, or none. Default: the first --adapter.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Prompt text (needs a tokenizer in the model directory).")] = None,
    prompt_ids: Annotated[Optional[str], typer.Option("--prompt-ids", help="Prompt as token ids: 1,2,3.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 32,
    method: Annotated[str, typer.Option("--method", "--kt-moe-sft-method", "--kt-method", help="Expert storage: fp32, bf16, int8 or int4 (AMXBF16_SFT / AMXINT8_SFT / AMXINT4_SFT).")] = "bf16",
    dtype: Annotated[str, typer.Option("--dtype", help="Non-expert layers: auto (fp32 with --method fp32, else bf16), bf16 or fp32.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", "--kt-cpuinfer", help="CPU threads for the experts (default: all cores; one fewer with --device cuda).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens (0: all).")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Generate all --max-new-tokens even past end-of-sequence.")] = False,
    lora_rank: Annotated[Optional[int], typer.Option("--kt-moe-lora-rank", help="Seed compatibility: must equal the adapter's rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--kt-moe-lora-alpha", help="Seed compatibility: must equal the adapter's alpha.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="cpu (ours: any method, mixed adapters per batch) or kt (kt-kernel's SFT MoE, installed separately: bf16 / int4, one adapter per batch).")] = "cpu",
    device: Annotated[str, typer.Option("--device", help="cpu, or cuda: attention and the other non-expert layers on the GPU, with --gpu-experts of each layer's experts there too; the rest run on the CPU at the same time.")] = "cpu",
    gpu_experts: Annotated[Optional[int], typer.Option("--gpu-experts", "--kt-num-gpu-experts", help="Experts per MoE layer kept on the GPU (with --device cuda; default 0).")] = None,
    gpu_ratio: Annotated[Optional[float], typer.Option("--gpu-experts-ratio", help="Share of each layer's experts kept on the GPU, 0 to 1 (instead of --gpu-experts). At 1, with bf16 and greedy decoding, each decode step replays as one CUDA graph (Qwen2/3-MoE, Mixtral).")] = None,
    kt_weight_path: Annotated[Optional[Path], typer.Option("--kt-weight-path", help="With --method int8 / int4: the experts from this folder of kt-kernel's converted weights (its convert_cpu_weights.py: _layer_L/_numa_N/*.kt or blk.* safetensors) instead of the checkpoint; bf16 / fp32 read --model, as the seed does.")] = None,
    placement: Annotated[str, typer.Option("--placement", help="Which experts go to the GPU: prefix (the first N, as the seed), uniform (spread over the ids), or a routing stats file from expertlora profile (each layer's most used).")] = "prefix",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: token_ids, text, prompt_tokens, tokens_per_s, adapter.")] = False,
    progress: ProgressOpt = True,
):
    """Generate from a MoE checkpoint with expert LoRA adapters (experts on the CPU engine, some on the GPU with --device cuda)."""
    from .run import Sampling, generate, load_setup

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, via PEFT
    out = _stdout_for_results() if backend == "kt" else sys.stdout
    with _errors():
        try:
            sampling = Sampling(max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
            setup = load_setup(model, adapter or [], use, prompt, prompt_ids, method, dtype, threads, lora_rank, lora_alpha, progress, backend,
                               device, gpu_experts, gpu_ratio, placement, kt_weight_path)
            result = generate(setup.model, setup.prompt_ids, setup.adapter, sampling, setup.tokenizer)
        except ValueError as e:  # AdapterError included: bad input, one line
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
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


def _stdout_for_results():
    """kt-kernel's C++ code prints on file descriptor 1: send that to stderr for the rest of the
    process, and return a file on the real stdout, which carries only the result."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(real, "w")


@app.command()
def profile(
    model: Annotated[Path, typer.Option("--model", "--model-path", help="Hugging Face checkpoint directory of a MoE model.")],
    prompts: Annotated[Path, typer.Option("--prompts", help="One prompt per line: text (needs a tokenizer in the model directory) or token ids 1,2,3.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Routing stats JSON to write (for frequency placement of GPU experts).")],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", "--kt-moe-lora-path", help="[NAME=]PATH of an adapter (any format inspect reads); repeat for several.")] = None,
    use: Annotated[Optional[str], typer.Option("--use", help="The adapter the prompts run with, by NAME, or none. Default: the first --adapter.")] = None,
    method: Annotated[str, typer.Option("--method", "--kt-moe-sft-method", "--kt-method", help="Expert storage: fp32, bf16, int8 or int4.")] = "bf16",
    threads: Annotated[Optional[int], typer.Option("--threads", "--kt-cpuinfer", help="CPU threads for the experts (default: all cores).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy tokens generated after each prompt (0: prefill only).")] = 16,
    progress: ProgressOpt = True,
):
    """Record which experts each MoE layer routes to on sample prompts, for GPU expert placement."""
    from rich.progress import track

    from .placement import profile as run_profile, read_prompts
    from .run import load_setup, load_tokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, via PEFT
    with _errors():
        try:
            if max_new_tokens < 0:
                raise ValueError(f"--max-new-tokens {max_new_tokens}: expected 0 or more")
            _base(model)  # a bad model directory is named before the prompts are read
            ids = read_prompts(prompts, load_tokenizer(model))
            # load_setup checks the options and loads the model; it takes one prompt: the first
            setup = load_setup(model, adapter or [], use, prompt=None, prompt_ids=",".join(map(str, ids[0])), method=method,
                               dtype="auto", threads=threads, progress=progress)
            bar = (lambda items, what: track(items, description=what, transient=True, console=err_console)) if progress else None
            stats = run_profile(setup.model, ids, setup.adapter, max_new_tokens, bar)
        except ValueError as e:  # AdapterError included: bad input, one line
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        stats.save(output)
    shares = [(c[e] / max(sum(c), 1), L, e) for L, c in stats.counts.items() for e in range(stats.num_experts)]
    (most, Lm, em), (least, Ll, el) = max(shares), min(shares)
    console.print(f"{stats.tokens} tokens, {len(stats.counts)} MoE layers, {stats.num_experts} experts -> {output}", highlight=False)
    console.print(f"most used: layer {Lm} expert {em}, {most:.1%} of its routed pairs; least used: layer {Ll} expert {el}, "
                  f"{least:.1%} (even: {1 / stats.num_experts:.1%})", highlight=False)


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", "--model-path", help="Hugging Face checkpoint directory of a MoE model.")],
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
    from .serve.launch import serve as run_server

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, via PEFT
    code = run_server(
        model=model, adapters=adapter or [], served_model_name=served_model_name, host=host, port=port, api_key=api_key,
        adapter_dirs=adapter_dir or [], lora_rank=lora_rank, lora_alpha=lora_alpha, max_body_bytes=max_body_bytes,
        shutdown_timeout=shutdown_timeout, progress=progress, log_level=log_level, method=method, dtype=dtype, threads=threads,
        backend=backend, device=device, gpu_experts=gpu_experts, gpu_experts_ratio=gpu_ratio, placement=placement,
        kt_weight_path=kt_weight_path, max_num_seqs=max_num_seqs, max_model_len=max_model_len, max_prefill_tokens=max_prefill_tokens,
        kv_cache_memory=kv_cache_memory, max_loaded_adapters=max_loaded_adapters, max_queued_requests=max_queued_requests,
    )
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="expertlora")


if __name__ == "__main__":
    sys.exit(main())

"""Generate text with a model on our engine: the library side of ``expertlora run``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .decode import graph_ready, greedy_decode
from .integration import LoadedModel


@dataclass(frozen=True)
class Sampling:
    """Per-request generation settings; greedy unless temperature > 0."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected at least 1, found {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("sampling: expected temperature >= 0, 0 < top_p <= 1, top_k >= 0")


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    text: str | None
    prompt_tokens: int
    tokens_per_s: float
    adapter: str | None

    def to_json(self) -> dict:
        return asdict(self)


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, or None when the directory has none."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def generate(lm: LoadedModel, prompt_ids: list[int], adapter: str | None, sampling: Sampling, tokenizer=None) -> Generation:
    """One prompt through the model with ``adapter`` (None: the base model)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=lm.model.device)
    lm.use([adapter])
    kwargs: dict = {}
    if sampling.temperature > 0:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs |= dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    else:
        kwargs |= dict(do_sample=False)
    if sampling.ignore_eos:
        kwargs["min_new_tokens"] = sampling.max_new_tokens
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(lm.model.config, "pad_token_id", None) or 0
    start = time.perf_counter()
    if sampling.temperature == 0 and ids.is_cuda and graph_ready(lm):  # greedy, all on the GPU: steps replayed as a graph
        new = _until_eos(greedy_decode(lm, ids, sampling.max_new_tokens)[0].tolist(), lm, sampling)
    else:
        with torch.no_grad():
            out = lm.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                pad_token_id=pad, **kwargs,
            )
        new = out[0, len(prompt_ids):].tolist()
    seconds = time.perf_counter() - start
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return Generation(new, text, len(prompt_ids), len(new) / seconds if seconds > 0 else float("inf"), adapter)


def _until_eos(tokens: list[int], lm: LoadedModel, sampling: Sampling) -> list[int]:
    """Greedy tokens cut after the first end-of-sequence token, as generate() stops there."""
    eos = lm.model.generation_config.eos_token_id
    eos = set() if sampling.ignore_eos or eos is None else {eos} if isinstance(eos, int) else set(eos)
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


@dataclass
class Setup:
    """What ``expertlora run`` resolved from its options, the model loaded."""

    model: LoadedModel
    method: str
    prompt_ids: list[int]
    adapter: str | None
    tokenizer: object | None


def parse_adapter_option(value: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after the file or directory)."""
    name, sep, path = value.partition("=")
    if not sep:
        name, path = Path(value).stem or Path(value).name, value
    if not name or not path:
        raise ValueError(f"--adapter {value!r}: expected [NAME=]PATH")
    return name, Path(path)


def load_setup(
    model_dir: Path,
    adapter_options: list[str],
    use: str | None,
    prompt: str | None,
    prompt_ids: str | None,
    method: str,
    dtype: str,
    threads: int | None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    progress: bool = True,
    backend: str = "cpu",
    device: str = "cpu",
    gpu_experts: int | None = None,
    gpu_ratio: float | None = None,
    placement: str = "prefix",
    kt_weight_path: Path | None = None,
) -> Setup:
    """Check every option, then load the adapters and the model (with a progress bar)."""
    from .formats import load_adapter
    from .integration import load_model
    from .model_config import MoEConfig
    from .quantize import resolve_method

    method = resolve_method(method)
    if backend == "kt":
        from .kt_backend import kt_method

        kt_method(method, from_files=kt_weight_path is not None)
    if kt_weight_path is not None and not kt_weight_path.is_dir():
        raise ValueError(f"--kt-weight-path {kt_weight_path}: expected a folder of kt-kernel's converted weights")
    dtypes = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(dtypes)}")
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of --prompt and --prompt-ids")
    named = dict(parse_adapter_option(a) for a in adapter_options)
    if len(named) != len(adapter_options):
        raise ValueError("--adapter: two adapters share a name; name them NAME=PATH")
    chosen = next(iter(named), None) if use is None else (None if use.lower() == "none" else use)
    if chosen is not None and chosen not in named:
        raise ValueError(f"--use {use!r}: expected none or one of the --adapter names ({', '.join(named) or 'none given'})")
    tokenizer = load_tokenizer(model_dir)
    ids = _prompt_ids(prompt, prompt_ids, tokenizer, model_dir)
    base = MoEConfig.from_model_dir(model_dir)
    masks = _gpu_masks(base, device, gpu_experts, gpu_ratio, placement)
    adapters = {name: load_adapter(path, base) for name, path in named.items()}
    for name, adapter in adapters.items():
        _check_seed_flags(name, adapter, lora_rank, lora_alpha)
    bar = _rich_progress if progress else None
    lm = load_model(model_dir, method, dtypes[dtype], adapters, threads=threads, progress=bar, backend=backend,
                    device=device, gpu_masks=masks, kt_weight_path=kt_weight_path)
    return Setup(lm, method, ids, chosen, tokenizer)


def _gpu_masks(base, device: str, gpu_experts: int | None, gpu_ratio: float | None, placement: str):
    """Per-layer GPU expert masks from the placement options; None when every expert is on the CPU."""
    from .placement import gpu_expert_count, gpu_masks, parse_placement

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: expected cpu or cuda")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to PyTorch here")
    count = gpu_expert_count(base.num_experts, gpu_experts, gpu_ratio)
    if count == 0:
        return None
    if device == "cpu":
        raise ValueError("--gpu-experts / --gpu-experts-ratio need --device cuda")
    strategy, stats = parse_placement(placement)
    return gpu_masks(base.num_experts, base.moe_layers, count, strategy, stats)


def _prompt_ids(prompt: str | None, prompt_ids: str | None, tokenizer, model_dir: Path) -> list[int]:
    if prompt_ids is not None:
        try:
            ids = [int(t) for t in prompt_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise ValueError(f"--prompt-ids {prompt_ids!r}: expected comma-separated token ids") from None
        if not ids:
            raise ValueError("--prompt-ids: expected at least one token id")
        return ids
    if tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer files; give the prompt as --prompt-ids")
    return tokenizer(prompt)["input_ids"]


def _check_seed_flags(name: str, adapter, rank: int | None, alpha: float | None) -> None:
    """The seed's --kt-moe-lora-rank / -alpha: rank and alpha come from the adapter; a flag
    that disagrees with it is an error, not an override."""
    for flag, value, attr in (("--kt-moe-lora-rank", rank, "rank"), ("--kt-moe-lora-alpha", alpha, "alpha")):
        if value is None:
            continue
        found = {getattr(spec, attr) for projs in adapter.info.layers.values() for spec in projs.values()}
        if found != {value}:
            raise ValueError(f"{flag} {value}: adapter {name} has {attr} {', '.join(map(str, sorted(found)))}")


def _rich_progress(items, description: str):
    from rich.console import Console
    from rich.progress import track

    # on stderr: stdout carries the result (--json)
    return track(items, description=f"loading {description}", transient=True, console=Console(stderr=True))

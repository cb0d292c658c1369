"""Generate text with a model on our engine: the library side of ``expertlora run``."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .decode import graph_ready, greedy_decode
from .integration import LoadedModel


@dataclass(frozen=True)
class Sampling:
    """Per-request generation settings; greedy unless temperature > 0.

    ``top_p`` (None: 1, all), ``top_k`` (None or 0: all) and ``seed`` shape sampling only, so
    with greedy decoding (temperature 0) giving one is an error, not silently ignored.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: expected at least 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: expected a finite number >= 0 (0: greedy)")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"--top-k {self.top_k}: expected an integer >= 0 (0: all tokens)")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"--seed {self.seed}: expected an integer from 0 to 2**64 - 1")
        if self.temperature == 0:
            for flag, value in (("--top-p", self.top_p), ("--top-k", self.top_k), ("--seed", self.seed)):
                if value is not None:
                    raise ValueError(f"{flag} {value}: only sampling uses it; give --temperature > 0 (0, the default, is greedy)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def generate(lm: LoadedModel, prompt_ids: list[int], adapter: str | None, sampling: Sampling, tokenizer=None,
             graphs: bool = True) -> Generation:
    """One prompt through the model with ``adapter`` (None: the base model). ``graphs``: greedy
    decoding on a GPU replays its steps as one CUDA graph where the model allows (decode.py)."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=lm.model.device)
    lm.use([adapter])
    kwargs: dict = {}
    if sampling.temperature > 0:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs |= dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p or 1.0, top_k=sampling.top_k or None)
    else:
        kwargs |= dict(do_sample=False)
    if sampling.ignore_eos:
        kwargs["min_new_tokens"] = sampling.max_new_tokens
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(lm.model.config, "pad_token_id", None) or 0
    start = time.perf_counter()
    if graphs and sampling.temperature == 0 and ids.is_cuda and graph_ready(lm):  # greedy, all on the GPU: steps replayed as a graph
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
    if name.lower() == "none":
        raise ValueError(f"--adapter {value!r}: the name none is reserved (--use none runs without an adapter); name it NAME=PATH")
    return name, Path(path)


def parse_adapter_options(values: list[str]) -> list[tuple[str, Path]]:
    """Every ``--adapter`` option, parsed; two with one name are refused, naming it."""
    named = [parse_adapter_option(v) for v in values]
    seen: set[str] = set()
    for name, _ in named:
        if name in seen:
            raise ValueError(f"--adapter: the name {name!r} is given twice; give each adapter its own (NAME=PATH)")
        seen.add(name)
    return named


@dataclass(frozen=True)
class ModelOptions:
    """The model options of ``expertlora run`` / ``profile``, as their flags give them; every one
    is checked by ``load_setup`` before anything loads (errors name the flag)."""

    model_dir: Path
    adapters: tuple[str, ...] = ()  # --adapter values, [NAME=]PATH
    method: str = "bf16"
    dtype: str = "auto"
    threads: int | None = None
    backend: str = "cpu"
    device: str = "cpu"
    gpu_experts: int | None = None
    gpu_ratio: float | None = None
    placement: str = "prefix"
    kt_weight_path: Path | None = None
    group_size: int | None = None
    gpu_prefill_threshold: int | None = None  # None: the method's measured default on a GPU
    lora_rank: int | None = None  # the seed's --kt-moe-lora-rank / -alpha: checked against the adapters
    lora_alpha: float | None = None


DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_setup(
    options: ModelOptions,
    use: str | None,
    prompt: str | None,
    prompt_ids: str | None,
    *,
    sampling: Sampling | None = None,
    progress: bool = True,
) -> Setup:
    """Check every option, then load the adapters and the model (with a progress bar).

    ``sampling``, when given, is checked against the model too: its prompt and new tokens must
    fit the model's context (max_position_embeddings)."""
    from .formats import load_adapter
    from .integration import _int4_group
    from .model_config import check_model_fields
    from .quantize import resolve_method

    o = options
    method = resolve_method(o.method)
    if o.backend not in ("cpu", "kt"):
        raise ValueError(f"--backend {o.backend!r}: expected cpu or kt")
    if o.backend == "kt":
        from .kt_backend import kt_method

        kt_method(method, from_files=o.kt_weight_path is not None)
    if o.kt_weight_path is not None and not o.kt_weight_path.is_dir():
        raise ValueError(f"--kt-weight-path {o.kt_weight_path}: expected a folder of kt-kernel's converted weights")
    if o.dtype not in DTYPES:
        raise ValueError(f"--dtype {o.dtype!r}: expected one of {', '.join(DTYPES)}")
    _check_threads(o.threads)
    if o.group_size is not None and (method != "int4" or (o.backend == "kt" and o.kt_weight_path is None)):
        raise ValueError(f"--group-size {o.group_size}: only our int4 storage has groups (--method int4, --backend cpu or --kt-weight-path)")
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of --prompt and --prompt-ids")
    named, chosen = adapter_choice(list(o.adapters), use)
    _check_seed_flag_values(named, o.lora_rank, o.lora_alpha)
    base = check_model_fields(o.model_dir)  # what transformers builds the model from, before it does
    if o.group_size is not None:
        _int4_group(base.hidden_size, base.intermediate_size, o.group_size)
    if o.backend == "kt":
        from .kt_backend import check_kt_shapes

        check_kt_shapes(kt_method(method, from_files=o.kt_weight_path is not None), base.hidden_size, base.intermediate_size,
                        o.kt_weight_path, base.moe_layers)
    tokenizer = load_tokenizer(o.model_dir)
    ids = _prompt_ids(prompt, prompt_ids, tokenizer, o.model_dir)
    check_prompts(o.model_dir, [ids], sampling.max_new_tokens if sampling else 0, numbered=False)
    masks = gpu_masks_for(base, o.device, o.gpu_experts, o.gpu_ratio, o.placement)
    adapters = {name: load_adapter(path, base) for name, path in named.items()}
    for name, adapter in adapters.items():
        check_seed_flags(named[name], adapter.info, o.lora_rank, o.lora_alpha)
    lm = load_placed(o.model_dir, method, o.dtype, adapters, masks, threads=o.threads, group_size=o.group_size,
                     backend=o.backend, device=o.device, kt_weight_path=o.kt_weight_path,
                     gpu_prefill_threshold=o.gpu_prefill_threshold, progress=loading_bar if progress else None)
    return Setup(lm, method, ids, chosen, tokenizer)


def load_placed(model_dir: Path, method: str, dtype: str, adapters: dict, masks, *, threads: int | None,
                group_size: int | None, backend: str, device: str, kt_weight_path: Path | None,
                gpu_prefill_threshold: int | None, progress=None) -> LoadedModel:
    """The model loaded with ``adapters`` (name -> ExpertLoRA), its experts placed by ``masks``
    (gpu_masks_for) and GPU prefill at its threshold (gpu_prefill's default where None): the
    loading that ``run`` and the serving engine share."""
    from .gpu_prefill import threshold_for
    from .integration import load_model

    if gpu_prefill_threshold and device == "cpu":
        raise ValueError(f"--gpu-prefill-threshold {gpu_prefill_threshold}: GPU prefill needs --device cuda")
    cpu_experts = masks is None or not all(bool(m.all()) for m in masks.values())
    prefill = threshold_for(gpu_prefill_threshold, method, device, cpu_experts)
    return load_model(model_dir, method, DTYPES[dtype], adapters, threads=threads, group_size=group_size, progress=progress,
                      backend=backend, device=device, gpu_masks=masks, kt_weight_path=kt_weight_path, gpu_prefill_threshold=prefill)


def adapter_choice(adapter_options: list[str], use: str | None) -> tuple[dict[str, Path], str | None]:
    """The ``--adapter`` options by name, and the one ``--use`` picks (None: none)."""
    named = dict(parse_adapter_options(adapter_options))
    chosen = next(iter(named), None) if use is None else (None if use.lower() == "none" else use)
    if chosen is not None and chosen not in named:
        raise ValueError(f"--use {use!r}: expected none or one of the --adapter names ({', '.join(named) or 'none given'})")
    return named, chosen


def check_prompts(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, numbered: bool = True) -> None:
    """Each prompt's ids must be in the model's vocabulary, and the prompt with ``max_new_tokens``
    more must fit its context (max_position_embeddings), as config.json gives them. Errors name
    ``prompt N`` (``numbered``) or ``the prompt``."""
    vocab, context = _model_limits(model_dir)
    for n, ids in enumerate(prompts, 1):
        which = f"prompt {n}" if numbered else "the prompt"
        if not ids:
            raise ValueError(f"{which}: expected at least one token, found none")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{which}: expected token ids in 0..{vocab - 1}, found {bad} (the model's vocab_size is {vocab})")
        if context is not None and len(ids) + max_new_tokens > context:
            room = context - len(ids)
            if room < 1:
                raise ValueError(f"{which}: {len(ids)} tokens: expected fewer than the model's context, max_position_embeddings {context}")
            raise ValueError(f"--max-new-tokens {max_new_tokens}: expected at most {room} (max_position_embeddings {context} "
                             f"minus the {len(ids)} tokens of {which})")


def _model_limits(model_dir: str | Path) -> tuple[int, int | None]:
    """(vocab_size, max_position_embeddings or None) of the model's config, as transformers reads it."""
    from transformers import AutoConfig

    from .errors import AdapterError

    path = Path(model_dir) / "config.json"
    try:
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
    except Exception as e:  # transformers refuses a bad config with many exception types
        raise AdapterError(path, None, "a config transformers can read", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    vocab, context = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
    if not _is_int(vocab) or vocab < 1:
        raise AdapterError(path, "vocab_size", "a positive integer", repr(vocab)[:40])
    if context is not None and (not _is_int(context) or context < 1):
        raise AdapterError(path, "max_position_embeddings", "a positive integer", repr(context)[:40])
    return vocab, context


def _check_threads(threads: int | None) -> None:
    cores = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= max(cores, 1):
        raise ValueError(f"--threads {threads}: expected 1 to {cores} (the CPU cores here)")


def _check_seed_flag_values(named: dict, rank: int | None, alpha: float | None) -> None:
    """The seed's rank / alpha flags state what the adapter holds: they need one, and sane values."""
    for flag, value in (("--kt-moe-lora-rank", rank), ("--kt-moe-lora-alpha", alpha)):
        if value is not None and not named:
            raise ValueError(f"{flag} {value}: it states the adapter's {flag.rsplit('-', 1)[1]}, but no --adapter is given")
    if rank is not None and rank < 1:
        raise ValueError(f"--kt-moe-lora-rank {rank}: expected a rank of at least 1")
    if alpha is not None and not math.isfinite(alpha):
        raise ValueError(f"--kt-moe-lora-alpha {alpha}: expected a finite number")


def gpu_masks_for(base, device: str, gpu_experts: int | None, gpu_ratio: float | None, placement: str):
    """Per-layer GPU expert masks from the placement options; None when every expert is on the CPU."""
    from .placement import gpu_expert_count, gpu_masks, parse_placement

    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", device):
        raise ValueError(f"--device {device!r}: expected cpu or cuda")
    if device != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to PyTorch here")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: expected cuda:0 to cuda:{torch.cuda.device_count() - 1} (the GPUs visible here)")
    strategy, stats = parse_placement(placement)  # checked even when no expert goes to the GPU
    count = gpu_expert_count(base.num_experts, gpu_experts, gpu_ratio)
    if count == 0:
        return None
    if device == "cpu":
        raise ValueError("--gpu-experts / --gpu-experts-ratio need --device cuda")
    return gpu_masks(base.num_experts, base.moe_layers, count, strategy, stats)


def _prompt_ids(prompt: str | None, prompt_ids: str | None, tokenizer, model_dir: Path) -> list[int]:
    if prompt_ids is not None:
        tokens = [t.strip() for t in prompt_ids.split(",")]
        # ASCII digits only (int() would also take "1_0" and other scripts' digits); a minus
        # sign is read, so that a negative id is refused as outside the vocabulary
        if not all(re.fullmatch(r"-?[0-9]{1,18}", t) for t in tokens if t):
            raise ValueError(f"--prompt-ids {prompt_ids[:60]!r}: expected comma-separated token ids")
        ids = [int(t) for t in tokens if t]
        if not ids:
            raise ValueError("--prompt-ids: expected at least one token id")
        return ids
    if tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer files; give the prompt as --prompt-ids")
    return tokenizer(prompt)["input_ids"]


def check_seed_flags(path: Path, info, rank: int | None, alpha: float | None) -> None:
    """The seed's --kt-moe-lora-rank / -alpha: rank and alpha come from the adapter at ``path``
    (``info``: its header, AdapterInfo); a flag that disagrees with it is an error, not an override."""
    from .errors import AdapterError

    for flag, value, attr in (("--kt-moe-lora-rank", rank, "rank"), ("--kt-moe-lora-alpha", alpha, "alpha")):
        if value is None:
            continue
        found = {getattr(spec, attr) for projs in info.layers.values() for spec in projs.values()}
        if found != {value}:
            raise AdapterError(path, None, f"{attr} {value} ({flag} {value})", ", ".join(map(str, sorted(found))))


def loading_bar(items, description: str):
    """``load_model``'s progress: a transient rich bar on stderr (stdout carries results)."""
    from rich.console import Console
    from rich.progress import track

    return track(items, description=f"loading {description}", transient=True, console=Console(stderr=True))

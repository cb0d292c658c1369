"""Expert placement: which experts of each MoE layer live on the GPU (a bool mask per layer).

Strategies: ``prefix`` (experts 0..N-1, the seed's first-N), ``uniform`` (ids spread evenly over
[0, E)) and ``frequency`` (the N experts each layer routes to most, from routing statistics that
``expertlora profile`` records on sample prompts).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import AdapterError

if TYPE_CHECKING:  # annotations only: the CLI and integration can import placement without a cycle
    from .integration import ExpertsBinding, LoadedModel

STRATEGIES = ("prefix", "uniform", "frequency")
STATS_FORMAT = "expertlora-routing/1"
_IDS_LINE = re.compile(r"[\d,\s]*\d[\d,\s]*")  # a prompt line of token ids: 1,2,3


def gpu_expert_count(num_experts: int, gpu_experts: int | None = None, ratio: float | None = None) -> int:
    """Per-layer GPU experts from ``--gpu-experts N`` or ``--gpu-experts-ratio F`` (0: none given)."""
    if gpu_experts is not None and ratio is not None:
        raise ValueError("give --gpu-experts or --gpu-experts-ratio, not both")
    if gpu_experts is not None:
        if not 0 <= gpu_experts <= num_experts:
            raise ValueError(f"--gpu-experts {gpu_experts}: expected 0 to {num_experts} (the experts per layer)")
        return gpu_experts
    if ratio is not None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"--gpu-experts-ratio {ratio}: expected 0 to 1")
        return math.floor(ratio * num_experts + 0.5)  # nearest, halves up (round() would go to even)
    return 0


@dataclass
class RoutingStats:
    """How often each expert was routed to, per MoE layer, over ``tokens`` profiled tokens."""

    model: str  # the model directory profiled
    num_experts: int
    tokens: int
    counts: dict[int, list[int]]  # layer -> [E] routed (token, expert) pairs
    path: str | None = field(default=None, compare=False)  # the file it was loaded from, for errors

    def save(self, path: str | Path) -> None:
        """Write JSON through a temporary file, so a failed write leaves no partial file."""
        path = Path(path)
        data = {"format": STATS_FORMAT, "model": self.model, "num_experts": self.num_experts, "tokens": self.tokens,
                "counts": {str(L): c for L, c in sorted(self.counts.items())}}
        from .formats.canonical import output_error

        tmp = path.with_name(f".{path.name[:100]}.tmp-{os.getpid()}")
        try:
            if path.is_dir():
                raise AdapterError(path, None, "a file path for the routing stats", "an existing directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(path)
        except OSError as e:
            raise output_error(path, e) from None  # the path given, not the temporary
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    @classmethod
    def load(cls, path: str | Path) -> "RoutingStats":
        """Read and check a file written by ``save``; bad content is a one-line AdapterError."""
        path = Path(path)
        if not path.is_file():
            raise AdapterError(path, None, "a routing stats JSON file (made by expertlora profile)", "no such file")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(path, None, "a routing stats JSON file (made by expertlora profile)", f"not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            found = repr(data.get("format")) if isinstance(data, dict) else type(data).__name__
            raise AdapterError(path, "format", repr(STATS_FORMAT), found)
        if not isinstance(data.get("model"), str):
            raise AdapterError(path, "model", "a string", repr(data.get("model")))
        E = _checked_int(path, "num_experts", data.get("num_experts"), minimum=1)
        tokens = _checked_int(path, "tokens", data.get("tokens"))
        raw = data.get("counts")
        if not isinstance(raw, dict) or not raw:
            raise AdapterError(path, "counts", "a map of layer -> per-expert counts", repr(raw)[:60])
        counts = {}
        for key, values in raw.items():
            layer = _checked_int(path, f"counts.{key}", int(key) if key.isdigit() else key)
            if not isinstance(values, list) or len(values) != E:
                found = f"{len(values)} values" if isinstance(values, list) else repr(values)[:60]
                raise AdapterError(path, f"counts.{key}", f"a list of {E} counts (num_experts)", found)
            counts[layer] = [_checked_int(path, f"counts.{key}", v) for v in values]
        return cls(data["model"], E, tokens, counts, str(path))


def _checked_int(path: Path, key: str, value, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AdapterError(path, key, f"an integer >= {minimum}", repr(value)[:60])
    return value


def parse_placement(value: str) -> tuple[str, RoutingStats | None]:
    """A strategy name, or the path of a routing stats file (then ``frequency`` with its stats)."""
    if value == "frequency":
        raise ValueError("placement frequency: pass the routing stats JSON file instead (made by expertlora profile)")
    if value in STRATEGIES:
        return value, None
    if not (Path(value).suffix.lower() == ".json" and Path(value).is_file()):  # a misspelt name is not a path
        raise ValueError(f"placement {value!r}: expected prefix, uniform or a routing stats JSON file (made by expertlora profile): "
                         f"{'no such file' if Path(value).suffix.lower() == '.json' else 'neither a strategy nor a .json file'}")
    return "frequency", RoutingStats.load(value)


def gpu_masks(
    num_experts: int,
    layers: list[int],
    count: int,
    strategy: str = "prefix",
    stats: RoutingStats | None = None,
) -> dict[int, torch.Tensor]:
    """Per layer, a bool [E] mask with exactly ``count`` experts on the GPU (True)."""
    E = num_experts
    if strategy not in STRATEGIES:
        raise ValueError(f"placement {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if not 0 <= count <= E:
        raise ValueError(f"{count} GPU experts: expected 0 to {E} (the experts per layer)")
    if strategy == "frequency":
        if stats is None:
            raise ValueError("placement frequency needs routing stats (made by expertlora profile)")
        where = stats.path or "routing stats"
        if stats.num_experts != E:
            raise AdapterError(where, "num_experts", str(E), str(stats.num_experts))
    masks = {}
    for L in layers:
        if strategy == "prefix":
            ids = list(range(count))
        elif strategy == "uniform":
            ids = [i * E // count for i in range(count)]  # distinct: E / count >= 1
        else:
            if L not in stats.counts:
                raise AdapterError(where, f"counts.{L}", f"routing counts for MoE layer {L}", "none")
            c = stats.counts[L]
            ids = sorted(range(E), key=lambda e: (-c[e], e))[:count]  # most routed; ties: lower id
        mask = torch.zeros(E, dtype=torch.bool)
        mask[ids] = True
        masks[L] = mask
    return masks


class RoutingRecorder:
    """The per-layer [E] int64 tensors the experts forward adds its routed pairs to."""

    def __init__(self, tensors: dict[int, torch.Tensor]):
        self.tensors = tensors

    def counts(self) -> dict[int, list[int]]:
        return {L: t.tolist() for L, t in self.tensors.items()}


def _bindings(loaded: LoadedModel) -> dict[int, ExpertsBinding]:
    return {L: loaded.model.get_submodule(f"model.layers.{L}.mlp.experts").expertlora for L in loaded.checkpoint.config.moe_layers}


@contextmanager
def record_routing(loaded: LoadedModel) -> Iterator[RoutingRecorder]:
    """Count, per MoE layer and expert, the routed (token, expert) pairs of every forward inside."""
    bindings = _bindings(loaded)
    if any(b.routing_counts is not None for b in bindings.values()):
        raise RuntimeError("routing is already being recorded on this model")
    E = loaded.checkpoint.config.num_experts
    for b in bindings.values():
        b.routing_counts = torch.zeros(E, dtype=torch.int64)
    try:
        yield RoutingRecorder({L: b.routing_counts for L, b in bindings.items()})
    finally:
        for b in bindings.values():
            b.routing_counts = None


def read_prompts(path: str | Path, tokenizer=None) -> list[list[int]]:
    """One prompt per line: text (needs ``tokenizer``) or comma-separated token ids; empty lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(path, None, "a prompts file, one prompt per line", "no such file")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if _IDS_LINE.fullmatch(line):
            prompts.append([int(t) for t in re.split(r"[,\s]+", line) if t])
        elif tokenizer is None:
            raise AdapterError(path, f"line {n}", "comma-separated token ids (the model directory has no tokenizer)", repr(line[:40]))
        else:
            prompts.append(tokenizer(line)["input_ids"])
    if not prompts:
        raise AdapterError(path, None, "at least one prompt, one per line", "none")
    return prompts


def profile(
    loaded: LoadedModel,
    prompts: list[list[int]],
    adapter: str | None,
    max_new_tokens: int,
    progress: Callable | None = None,
) -> RoutingStats:
    """Run each prompt (prefill, then greedy ``max_new_tokens``; 0: prefill only) with ``adapter``
    and record which experts every MoE layer routes to. ``progress(iterable, description)``
    wraps the loop over prompts (a rich bar in the CLI)."""
    from .run import Sampling, generate

    vocab = loaded.model.get_input_embeddings().num_embeddings
    for i, ids in enumerate(prompts, 1):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if not ids or bad is not None:
            raise ValueError(f"prompt {i}: expected token ids in 0..{vocab - 1}, found {bad if ids else 'none'}")
    wrap = progress or (lambda items, _description: items)
    tokens = 0
    with record_routing(loaded) as recorder:
        for ids in wrap(prompts, "profiling"):
            if max_new_tokens == 0:
                loaded.use([adapter])
                with torch.no_grad():
                    loaded.model(input_ids=torch.tensor([ids], device=loaded.model.device))
                tokens += len(ids)
            else:
                new = generate(loaded, ids, adapter, Sampling(max_new_tokens)).token_ids
                tokens += len(ids) + max(len(new) - 1, 0)  # the last generated token is never fed back
    return RoutingStats(str(loaded.checkpoint.dir), loaded.checkpoint.config.num_experts, tokens, recorder.counts())

"""The engine's configuration: the model options of ``expertlora run`` plus the serving limits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

METHODS = ("fp32", "bf16", "int8", "int4")
DTYPES = ("auto", "bf16", "fp32")
# Without --max-model-len: the model's context, capped so a per-sequence cache stays modest.
DEFAULT_MAX_MODEL_LEN = 4096
# Without --kv-cache-memory: this share of the GPU's free memory after loading, or of the
# host's available memory on the CPU (capped at CPU_KV_CACHE_CAP bytes).
GPU_KV_CACHE_FRACTION = 0.5
CPU_KV_CACHE_FRACTION = 0.25
CPU_KV_CACHE_CAP = 8 << 30
MAX_NUM_SEQS = 4096  # a bound on anything a flag can size
MAX_TOKENS_BOUND = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine is built from. ``adapters``: name -> path, loaded at start."""

    model: Path
    method: str = "bf16"
    dtype: str = "auto"
    adapters: tuple[tuple[str, Path], ...] = ()
    device: str = "cpu"
    gpu_experts: int | None = None
    gpu_experts_ratio: float | None = None
    placement: str = "prefix"
    threads: int | None = None
    backend: str = "cpu"
    kt_weight_path: Path | None = None
    group_size: int | None = None
    gpu_prefill_threshold: int | None = None  # None: the method's measured default on a GPU; 0: off
    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_prefill_tokens: int = 1024  # prompt tokens per step: longer prompts are prefilled in chunks
    kv_cache_memory: int | None = None  # bytes for the KV cache; default: a share of free memory
    max_loaded_adapters: int = 16
    max_queued_requests: int = 1024
    cuda_graphs: bool = True

    def __post_init__(self):
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "adapters", tuple((str(n), Path(p)) for n, p in (self.adapters.items() if isinstance(self.adapters, dict) else self.adapters)))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, found {self.dtype!r}")
        for name, value, low, high in (
            ("max_num_seqs", self.max_num_seqs, 1, MAX_NUM_SEQS),
            ("max_prefill_tokens", self.max_prefill_tokens, 1, MAX_TOKENS_BOUND),
            ("max_loaded_adapters", self.max_loaded_adapters, 1, 1024),
            ("max_queued_requests", self.max_queued_requests, 1, 1 << 20),
        ):
            check_int(name, value, low, high)
        for name, value in (("max_model_len", self.max_model_len), ("threads", self.threads), ("group_size", self.group_size)):
            if value is not None:
                check_int(name, value, 1, MAX_TOKENS_BOUND)
        if self.gpu_prefill_threshold is not None:
            check_int("gpu_prefill_threshold", self.gpu_prefill_threshold, 0, MAX_TOKENS_BOUND)
        if self.kv_cache_memory is not None:
            check_int("kv_cache_memory", self.kv_cache_memory, 1, 1 << 50)
        if self.gpu_experts_ratio is not None and not (isinstance(self.gpu_experts_ratio, (int, float)) and math.isfinite(self.gpu_experts_ratio) and 0 <= self.gpu_experts_ratio <= 1):
            raise ValueError(f"gpu_experts_ratio: expected a number in [0, 1], found {self.gpu_experts_ratio!r}")
        names = [n for n, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError("adapters: two adapters share a name")
        if len(names) > self.max_loaded_adapters:
            raise ValueError(f"adapters: {len(names)} given, more than max_loaded_adapters ({self.max_loaded_adapters})")


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """``value`` must be an integer (not a bool) in [low, high] (no upper bound where high is None)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name}: expected an integer {bound}, found {value!r}")

"""The serving runtime: the engine, its scheduler, KV cache, packed batches and adapter manager."""

from .config import EngineConfig
from .engine import Engine, EngineStats
from .errors import AdapterBusy, EngineClosed, QueueFull, RequestError, UnknownAdapter
from .request import FINISH_REASONS, RequestHandle, RequestOutput, SamplingParams, TokenLogprob

__all__ = [
    "FINISH_REASONS",
    "AdapterBusy",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineStats",
    "QueueFull",
    "RequestError",
    "RequestHandle",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "UnknownAdapter",
]

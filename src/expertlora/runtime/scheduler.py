"""Admission and continuous batching: which requests run in the next step, and how many tokens.

Every step: each running request that has its prompt cached decodes one token; then prompts
are prefilled, oldest first, within ``max_prefill_tokens`` prompt tokens per step (a longer
prompt is split into chunks over several steps, so running decodes keep stepping). A waiting
request is admitted when a cache slot is free and fewer than ``max_num_seqs`` run; finished
ones leave at once and free their slot for the next step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .kv_cache import KVCache
from .request import Request


@dataclass(frozen=True)
class Schedule:
    decodes: list[Request]
    prefills: list[tuple[Request, int]]  # (request, prompt tokens this step)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    """The waiting queue and the running set (owned by the engine thread)."""

    def __init__(self, cache: KVCache, max_num_seqs: int, max_prefill_tokens: int):
        self.cache, self.max_num_seqs, self.max_prefill_tokens = cache, max_num_seqs, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> Schedule:
        decodes = [r for r in self.running if not r.prefilling]
        budget = self.max_prefill_tokens
        prefills = []
        for r in self.running:  # chunks of prompts already admitted come first
            if r.prefilling and budget:
                n = min(len(r.prompt_ids) - r.num_computed, budget)
                prefills.append((r, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            slot = self.cache.allocate()
            if slot is None:
                break
            r = self.waiting.popleft()
            r.cache_slot = slot
            self.running.append(r)
            n = min(len(r.prompt_ids), budget)
            prefills.append((r, n))
            budget -= n
        return Schedule(decodes, prefills)

    def finish(self, request: Request) -> None:
        """Remove a running or waiting request and free its cache slot."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.cache_slot is not None:
            self.cache.release(request.cache_slot)
            request.cache_slot = None

    def requests(self) -> list[Request]:
        return [*self.running, *self.waiting]

"""One engine step's packed batch: every scheduled token of every request, concatenated.

Rows: first one token per decoding request, then each prefill chunk's prompt tokens. Every row
carries its request's adapter slot (for the routed experts and the non-expert LoRA alike), its
cache slot and its position; ``logits_rows`` are the rows whose next token is sampled (every
decode row, and the last row of a chunk that ends its prompt), then the rows of prompt tokens
whose requests ask for their log-probabilities (``scored``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import AttentionPlan, KVCache, PrefillChunk
from .request import Request


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    adapter_slots: torch.Tensor  # [T] engine adapter slot per token, NO_ADAPTER for none (on the CPU)
    plan: AttentionPlan
    logits_rows: torch.Tensor  # [n + m]
    sampled: tuple[Request, ...]  # the request of each of the first n logits rows, in order
    # then (request, position p, count): count rows, the first predicting prompt token p + 1
    scored: tuple[tuple[Request, int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def build_batch(
    decodes: list[Request],
    prefills: list[tuple[Request, int]],  # (request, prompt tokens this step)
    adapter_slot,  # adapter name | None -> engine slot
    cache: KVCache,
    device: torch.device,
) -> StepBatch:
    ids, positions, slots, adapters, rows, sampled, chunks = [], [], [], [], [], [], []
    score_rows, scored = [], []
    for r in decodes:
        rows.append(len(ids))
        ids.append(r.last_id)
        positions.append(r.num_computed)
        slots.append(r.cache_slot)
        adapters.append(adapter_slot(r.adapter))
        sampled.append(r)
    decode_lengths = [r.num_computed + 1 for r in decodes]
    for r, n in prefills:
        start = r.num_computed
        chunks.append(PrefillChunk(len(ids), r.cache_slot, start, n))
        ids += r.prompt_ids[start : start + n]
        positions += range(start, start + n)
        slots += [r.cache_slot] * n
        adapters += [adapter_slot(r.adapter)] * n
        if r.sampling.prompt_logprobs is not None:  # rows that predict a prompt token (not the first output)
            count = min(start + n, len(r.prompt_ids) - 1) - start
            if count > 0:
                score_rows += range(len(ids) - n, len(ids) - n + count)
                scored.append((r, start, count))
        if start + n == len(r.prompt_ids):
            rows.append(len(ids) - 1)
            sampled.append(r)

    def on_device(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    token_positions = on_device(positions)
    plan = AttentionPlan(
        cache=cache,
        token_slots=on_device(slots),
        token_positions=token_positions,
        decode_slots=on_device([r.cache_slot for r in decodes]),
        decode_lengths=on_device(decode_lengths),
        decode_max_len=max(decode_lengths, default=0),
        prefills=tuple(chunks),
        decode_rows=tuple((r.cache_slot, n) for r, n in zip(decodes, decode_lengths)),
    )
    return StepBatch(
        input_ids=on_device(ids)[None],
        positions=token_positions[None],
        adapter_slots=torch.tensor(adapters, dtype=torch.long),
        plan=plan,
        logits_rows=on_device(rows + score_rows),
        sampled=tuple(sampled),
        scored=tuple(scored),
    )

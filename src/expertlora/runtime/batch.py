"""One engine step's packed batch: every scheduled token of every request, concatenated.

Rows: first one token per decoding request, then each prefill chunk's prompt tokens. Every row
carries its request's adapter slot (for the routed experts and the non-expert LoRA alike), its
cache slot and its position; ``logits_rows`` are the rows whose next token is sampled (every
decode row, and the last row of a chunk that ends its prompt).
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
    logits_rows: torch.Tensor  # [n]
    sampled: tuple[Request, ...]  # the request of each logits row, in order

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
        logits_rows=on_device(rows),
        sampled=tuple(sampled),
    )

"""The KV cache: one preallocated region per sequence slot, and the attention that reads it.

Layout per attention layer: K [slots, kv_heads, max_len, dk], V [slots, kv_heads, max_len, dv]
(DeepSeek's multi-head latent attention has dk != dv, so K and V are kept apart). A request
holds one slot from admission to its end; nothing is shared between slots, so two requests
never read each other's entries, whatever their prompts and adapters.

The model calls ``packed_attention`` (registered with transformers as the ``expertlora``
attention implementation) with the step's packed batch as a keyword argument: it writes the
step's K/V at each token's (slot, position), then attends each sequence to its own slot.
Shape legend: T = tokens in the step, h = query heads, kvh = key/value heads, D = sequences
decoding one token, S = cached length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_IMPLEMENTATION = "expertlora"


@dataclass(frozen=True)
class LayerShape:
    kv_heads: int
    k_dim: int
    v_dim: int


class KVCache:
    """Per-slot K/V regions for every attention layer, and the free list of slots."""

    def __init__(self, shapes: dict[int, LayerShape], num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 pad_slot: bool = False):
        """``pad_slot``: one more region, never handed out, that the padding rows of a CUDA graph
        step (batch sizes rounded up) write to and read from."""
        self.shapes, self.num_slots, self.max_len = shapes, num_slots, max_len
        regions = num_slots + pad_slot
        self.pad_slot = num_slots if pad_slot else None
        self.k = {L: torch.zeros(regions, s.kv_heads, max_len, s.k_dim, dtype=dtype, device=device) for L, s in shapes.items()}
        self.v = {L: torch.zeros(regions, s.kv_heads, max_len, s.v_dim, dtype=dtype, device=device) for L, s in shapes.items()}
        self._free = list(range(num_slots - 1, -1, -1))

    @staticmethod
    def bytes_per_slot(shapes: dict[int, LayerShape], max_len: int, dtype: torch.dtype) -> int:
        per_token = sum(s.kv_heads * (s.k_dim + s.v_dim) for s in shapes.values())
        return per_token * max_len * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)  # stale entries stay: a new owner overwrites before it reads

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k [T, kvh, dk], v [T, kvh, dv] of each token at (its slot, its position)."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens of one sequence in a step: packed rows [offset, offset + length), at
    positions [start, start + length) of its slot."""

    offset: int
    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class AttentionPlan:
    """How one packed step attends: its first D tokens decode one token each, then the chunks."""

    cache: KVCache
    token_slots: torch.Tensor  # [T] each token's cache slot
    token_positions: torch.Tensor  # [T]
    decode_slots: torch.Tensor  # [D]
    decode_lengths: torch.Tensor  # [D] cached length after this step's token
    decode_max_len: int
    prefills: tuple[PrefillChunk, ...]
    decode_rows: tuple[tuple[int, int], ...] = ()  # (slot, cached length) per decode row, for the CPU


class ShapeProbe:
    """Passed instead of a plan: records each layer's K/V shape (no cache needed)."""

    def __init__(self):
        self.shapes: dict[int, LayerShape] = {}


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, expertlora_step=None, **kwargs):
    """transformers' attention signature: query [1, h, T, dk], key [1, kvh, T, dk], value
    [1, kvh, T, dv] (positions already applied) -> ([1, T, h, dv], None)."""
    plan = expertlora_step
    if plan is None:
        raise RuntimeError("the expertlora attention runs inside an engine step only (expertlora_step= missing)")
    _, h, T, _ = query.shape
    kvh, dv = value.shape[1], value.shape[-1]
    layer = module.layer_idx
    if isinstance(plan, ShapeProbe):
        plan.shapes[layer] = LayerShape(kvh, key.shape[-1], dv)
        return query.new_zeros(1, T, h, dv), None
    if kwargs.get("sliding_window") is not None:
        raise ValueError("sliding-window attention is not supported by the engine")
    cache = plan.cache
    cache.write(layer, plan.token_slots, plan.token_positions, key[0].transpose(0, 1), value[0].transpose(0, 1))
    q = query[0]  # [h, T, dk]
    out = query.new_empty(T, h, dv)
    D = plan.decode_slots.numel()
    if D:
        # One token per sequence: its h query heads as g = h / kvh queries on each K/V head
        # (grouped-query attention without repeating K and V).
        g, dk = h // kvh, q.shape[-1]
        qd = q[:, :D].transpose(0, 1).reshape(D, kvh, g, dk)  # [D, kvh, g, dk]
        if not q.is_cuda:  # each sequence attends to a view of its own region, nothing copied
            for i, (slot, length) in enumerate(plan.decode_rows):
                o = _sdpa(qd[i], cache.k[layer][slot, :, :length], cache.v[layer][slot, :, :length], scale=scaling)
                out[i] = o.reshape(h, dv)  # [kvh, g, dv] -> [h, dv]
        else:  # on a GPU (a graph's static shapes; few launches): the regions gathered, the rest masked
            S = plan.decode_max_len
            k = cache.k[layer].index_select(0, plan.decode_slots)[:, :, :S]  # [D, kvh, S, dk]
            v = cache.v[layer].index_select(0, plan.decode_slots)[:, :, :S]
            mask = torch.arange(S, device=q.device)[None, :] < plan.decode_lengths[:, None]  # [D, S]
            out[:D] = _sdpa(qd, k, v, attn_mask=mask[:, None, None], scale=scaling).reshape(D, h, dv)
    for c in plan.prefills:
        end = c.start + c.length
        k = _heads(cache.k[layer][c.slot, :, :end], h)[None]  # [1, h, end, dk]
        v = _heads(cache.v[layer][c.slot, :, :end], h)[None]
        qc = q[None, :, c.offset : c.offset + c.length]  # [1, h, n, dk]
        if c.start == 0:
            o = _sdpa(qc, k, v, is_causal=True, scale=scaling)
        else:  # query i sits at position start + i: it sees keys 0 .. start + i
            rows = torch.arange(c.length, device=q.device)[:, None] + c.start
            o = _sdpa(qc, k, v, attn_mask=torch.arange(end, device=q.device)[None, :] <= rows, scale=scaling)
        out[c.offset : c.offset + c.length] = o[0].transpose(0, 1)
    return out[None], None


def _sdpa(q, k, v, **kwargs):
    if q.is_cuda:  # not cuDNN's attention: it fails on head sizes real checkpoints do not have (tiny test models)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., kvh, S, d] -> [..., heads, S, d]: grouped-query attention's shared K/V repeated."""
    kvh = t.shape[-3]
    return t if kvh == heads else t.repeat_interleave(heads // kvh, dim=-3)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, packed_attention)

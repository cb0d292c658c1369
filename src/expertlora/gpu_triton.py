"""Fused Triton kernels for small batches of the GPU backend (decode): each routed pair's whole
expert MLP with its LoRA in three kernels, where the grouped path launches some thirty PyTorch ops.

    shrink kernel (with a LoRA), one program per (pair p, chunk c of H):
        s_{p,c} = A_gu[e, s][:, c]·x_t[c]
    gate_up kernel, one program per (pair p, block b of I):
        g, u = W_gu[e]·x_t + B_gu[e, s]·Σ_c s_{p,c};  h_p = silu(g) * u
        part_{p,b} = A_d[e, s][:, b]·h_p[b]                      (with a LoRA)
    down kernel, one program per (pair p, block of H):
        out_p = w_p · (W_d[e]·h_p + B_d[e, s]·Σ_b part_{p,b})      (0 where e is not resident)
    y_t = Σ_j out_{t·k + j}   (in PyTorch: a fixed order, no atomics)

Pair p is token t = p // k routed to expert id e; s is the token's adapter slot. Weights and the
stacked LoRA are gpu.py's (GpuLayer, GpuLoRA): [Eg, out, in] row-major, LoRA group e·(S+1) + s + 1,
with zeros at e·(S+1) for "no adapter", so every pair takes the same path. Accumulation, the
shrinks and h are fp32. Each LoRA factor is read once per pair: the shrinks are not recomputed
by every block's program. triton is imported only when this path is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _expert_of(ids_ptr, group_ptr, p, E, Eg):
    """The resident index of pair p's expert (clamped to a real one) and whether it is resident."""
    expert = tl.load(ids_ptr + p)
    expert = tl.where((expert >= 0) & (expert < E), expert, E)
    local = tl.load(group_ptr + expert)
    return tl.minimum(local, Eg - 1), local < Eg


@triton.jit
def _lora_group(slots_ptr, t, e, per_expert):
    """Pair's LoRA group: e·(S+1) + slot + 1 (slot -1, no adapter, is the zero group e·(S+1))."""
    return e.to(tl.int64) * per_expert + tl.load(slots_ptr + t) + 1


@triton.jit
def _summed(ptr, p, count, BLOCK_R: tl.constexpr):
    """Σ_j ptr[p, j, :] over the count partial shrinks of pair p, in a fixed order (the same bits
    every run)."""
    r = tl.arange(0, BLOCK_R)
    s = tl.zeros([BLOCK_R], tl.float32)
    for j in range(0, count):
        s += tl.load(ptr + (p * count + j) * BLOCK_R + r)
    return s


@triton.jit
def _expand(b_ptr, rows, rows_ok, r, R, s):
    """B[rows, :R]·s for a LoRA expand B [out, R] and its shrink s."""
    b = tl.load(b_ptr + rows[:, None] * R + r[None, :], mask=rows_ok[:, None] & (r < R)[None, :], other=0.0)
    return tl.sum(b.to(tl.float32) * s[None, :], axis=1)


@triton.jit
def _shrink_kernel(
    x_ptr, ids_ptr, group_ptr, slots_ptr, a_ptr, s_ptr,
    k, E, Eg, H, R, per_expert,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """s_{p,c} = A_gu[e, s][:, chunk c]·x_t[chunk c], one program per (pair, chunk of H); the
    gate/up programs sum the chunks."""
    p = tl.program_id(0)
    c = tl.program_id(1)
    t = p // k
    e, _ = _expert_of(ids_ptr, group_ptr, p, E, Eg)
    a_l = a_ptr + _lora_group(slots_ptr, t, e, per_expert) * (R * H)
    r = tl.arange(0, BLOCK_R)
    kk = c * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < H
    xv = tl.load(x_ptr + t * H + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    a = tl.load(a_l + r[:, None] * H + kk[None, :], mask=(r < R)[:, None] & k_ok[None, :], other=0.0)
    tl.store(s_ptr + (p * tl.num_programs(1) + c) * BLOCK_R + r, tl.sum(a.to(tl.float32) * xv, axis=1))


@triton.jit
def _gate_up_kernel(
    x_ptr, ids_ptr, group_ptr, slots_ptr, w_ptr, s_ptr, b_ptr, a_down_ptr, h_ptr, part_ptr,
    k, E, Eg, H, I, R, per_expert, chunks,
    HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """h_p[n-block] = silu(g)·u with gate/up = W_gu[e]·x_t + B_gu[e, s]·s_p; with a LoRA also this
    block's share of the down shrink, A_down[e, s][:, n-block]·h_p[n-block] (summed in _down_kernel)."""
    p = tl.program_id(0)
    block = tl.program_id(1)
    t = p // k
    e, _ = _expert_of(ids_ptr, group_ptr, p, E, Eg)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    w_e = w_ptr + e.to(tl.int64) * (2 * I * H)
    g = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < H
        xv = tl.load(x_ptr + t * H + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        tile = n_ok[:, None] & k_ok[None, :]
        g += tl.sum(tl.load(w_e + n[:, None] * H + kk[None, :], mask=tile, other=0.0).to(tl.float32) * xv, axis=1)
        u += tl.sum(tl.load(w_e + (I + n)[:, None] * H + kk[None, :], mask=tile, other=0.0).to(tl.float32) * xv, axis=1)
    if HAS_LORA:
        lora = _lora_group(slots_ptr, t, e, per_expert)
        r = tl.arange(0, BLOCK_R)
        s = _summed(s_ptr, p, chunks, BLOCK_R)
        b_l = b_ptr + lora * (2 * I * R)
        g += _expand(b_l, n, n_ok, r, R, s)
        u += _expand(b_l, I + n, n_ok, r, R, s)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + p * I + n, h, mask=n_ok)
    if HAS_LORA:
        a_d = tl.load(a_down_ptr + lora * (R * I) + r[:, None] * I + n[None, :], mask=(r < R)[:, None] & n_ok[None, :], other=0.0)
        part = tl.sum(a_d.to(tl.float32) * tl.where(n_ok, h, 0.0)[None, :], axis=1)
        tl.store(part_ptr + (p * tl.num_programs(1) + block) * BLOCK_R + r, part)


@triton.jit
def _down_kernel(
    h_ptr, ids_ptr, group_ptr, slots_ptr, weights_ptr, w_ptr, part_ptr, b_ptr, out_ptr,
    k, E, Eg, H, I, R, per_expert, parts,
    HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out_p[n-block] = w_p·(W_d[e]·h_p + B_d[e, s]·Σ parts), 0 where e is not resident."""
    p = tl.program_id(0)
    t = p // k
    e, resident = _expert_of(ids_ptr, group_ptr, p, E, Eg)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    w_e = w_ptr + e.to(tl.int64) * (H * I)
    d = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < I
        hv = tl.load(h_ptr + p * I + kk, mask=k_ok, other=0.0)[None, :]
        d += tl.sum(tl.load(w_e + n[:, None] * I + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * hv, axis=1)
    if HAS_LORA:
        r = tl.arange(0, BLOCK_R)
        d += _expand(b_ptr + _lora_group(slots_ptr, t, e, per_expert) * (H * R), n, n_ok, r, R, _summed(part_ptr, p, parts, BLOCK_R))
    weight = tl.load(weights_ptr + p).to(tl.float32)
    tl.store(out_ptr + p * H + n, tl.where(resident, d * weight, 0.0), mask=n_ok)


def fused_forward(
    group: torch.Tensor,  # [E + 1] expert id -> resident index, Eg for the rest (GpuLayer.group)
    gate_up: torch.Tensor,  # [Eg, 2I, H]
    down: torch.Tensor,  # [Eg, H, I]
    lora,  # GpuLoRA or None
    x: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k]
    topk_weights: torch.Tensor,  # [T, k]
    token_slots: torch.Tensor | None,  # [T]
    block_n: int = 16,  # the fastest at decode on the H200 (gpu_layer.py --parts sweep)
    block_k: int = 256,
    num_warps: int = 8,
    shrink_chunk: int = 256,  # the gate/up shrink runs over chunks of H: many programs, not one per pair
) -> torch.Tensor:  # [T, H] float32
    T, k = topk_ids.shape
    Eg, two_i, H = gate_up.shape
    I, E, P = two_i // 2, group.numel() - 1, T * k
    if P == 0:  # no program to launch
        return torch.zeros(T, H, dtype=torch.float32, device=x.device)
    x = x.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    parts, chunks = triton.cdiv(I, block_n), triton.cdiv(H, shrink_chunk)
    h = torch.empty(P, I, dtype=torch.float32, device=x.device)
    out = torch.empty(P, H, dtype=torch.float32, device=x.device)
    if lora is not None:
        R, per_expert = lora.a_gate_up.shape[1], lora.a_gate_up.shape[0] // Eg
        block_r = max(16, triton.next_power_of_2(R))
        slots = token_slots.contiguous()
        shrink = torch.empty(P, chunks, block_r, dtype=torch.float32, device=x.device)
        part = torch.empty(P, parts, block_r, dtype=torch.float32, device=x.device)
        _shrink_kernel[(P, chunks)](x, ids, group, slots, lora.a_gate_up, shrink, k, E, Eg, H, R, per_expert,
                                    BLOCK_K=shrink_chunk, BLOCK_R=block_r, num_warps=num_warps)
        a_d, b_gu, b_d = lora.a_down, lora.b_gate_up, lora.b_down
    else:  # the LoRA arguments are not read
        R, per_expert, block_r, slots, chunks = 1, 1, 16, ids, 1
        shrink = part = h
        a_d = b_gu = b_d = gate_up
    common = dict(HAS_LORA=lora is not None, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=num_warps)
    _gate_up_kernel[(P, parts)](
        x, ids, group, slots, gate_up, shrink, b_gu, a_d, h, part, k, E, Eg, H, I, R, per_expert, chunks, **common)
    _down_kernel[(P, triton.cdiv(H, block_n))](
        h, ids, group, slots, weights, down, part, b_d, out, k, E, Eg, H, I, R, per_expert, parts, **common)
    return out.view(T, k, H).sum(1)

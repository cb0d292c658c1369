"""Fused Triton kernels for small batches of the GPU backend (decode): each routed pair's whole
expert MLP with its LoRA in two kernels, where the grouped path launches some thirty PyTorch ops.

    gate_up kernel, one program per (pair p, block of I):
        g, u = W_gu[e]·x_t + B_gu[e, s]·(A_gu[e, s]·x_t);  h_p = silu(g) * u
    down kernel, one program per (pair p, block of H):
        out_p = w_p · (W_d[e]·h_p + B_d[e, s]·(A_d[e, s]·h_p))      (0 where e is not resident)
    y_t = Σ_j out_{t·k + j}   (in PyTorch: a fixed order, no atomics)

Pair p is token t = p // k routed to expert id e; s is the token's adapter slot. Weights and the
stacked LoRA are gpu.py's (GpuLayer, GpuLoRA): [Eg, out, in] row-major, LoRA group e·(S+1) + s + 1,
with zeros at e·(S+1) for "no adapter", so every pair takes the same path. Accumulation, the
shrink and h are fp32. Each program recomputes its pair's shrink (r·in multiply-adds, small next
to its block of the base weights). triton is imported only when this path is used.
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
def _gate_up_kernel(
    x_ptr, ids_ptr, group_ptr, slots_ptr, w_ptr, a_ptr, b_ptr, h_ptr,
    k, E, Eg, H, I, R, per_expert,
    HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    p = tl.program_id(0)
    t = p // k
    e, _ = _expert_of(ids_ptr, group_ptr, p, E, Eg)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    w_e = w_ptr + e.to(tl.int64) * (2 * I * H)
    if HAS_LORA:
        lora = e.to(tl.int64) * per_expert + tl.load(slots_ptr + t) + 1
        a_l = a_ptr + lora * (R * H)
    g = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    shrink = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < H
        xv = tl.load(x_ptr + t * H + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        tile = n_ok[:, None] & k_ok[None, :]
        g += tl.sum(tl.load(w_e + n[:, None] * H + kk[None, :], mask=tile, other=0.0).to(tl.float32) * xv, axis=1)
        u += tl.sum(tl.load(w_e + (I + n)[:, None] * H + kk[None, :], mask=tile, other=0.0).to(tl.float32) * xv, axis=1)
        if HAS_LORA:
            a = tl.load(a_l + r[:, None] * H + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            shrink += tl.sum(a.to(tl.float32) * xv, axis=1)
    if HAS_LORA:
        b_l = b_ptr + lora * (2 * I * R)
        tile = n_ok[:, None] & r_ok[None, :]
        g += tl.sum(tl.load(b_l + n[:, None] * R + r[None, :], mask=tile, other=0.0).to(tl.float32) * shrink[None, :], axis=1)
        u += tl.sum(tl.load(b_l + (I + n)[:, None] * R + r[None, :], mask=tile, other=0.0).to(tl.float32) * shrink[None, :], axis=1)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + p * I + n, h, mask=n_ok)


@triton.jit
def _down_kernel(
    h_ptr, ids_ptr, group_ptr, slots_ptr, weights_ptr, w_ptr, a_ptr, b_ptr, out_ptr,
    k, E, Eg, H, I, R, per_expert,
    HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    p = tl.program_id(0)
    t = p // k
    e, resident = _expert_of(ids_ptr, group_ptr, p, E, Eg)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    w_e = w_ptr + e.to(tl.int64) * (H * I)
    if HAS_LORA:
        lora = e.to(tl.int64) * per_expert + tl.load(slots_ptr + t) + 1
        a_l = a_ptr + lora * (R * I)
    d = tl.zeros([BLOCK_N], tl.float32)
    shrink = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < I
        hv = tl.load(h_ptr + p * I + kk, mask=k_ok, other=0.0)[None, :]
        d += tl.sum(tl.load(w_e + n[:, None] * I + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * hv, axis=1)
        if HAS_LORA:
            a = tl.load(a_l + r[:, None] * I + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            shrink += tl.sum(a.to(tl.float32) * hv, axis=1)
    if HAS_LORA:
        b_l = b_ptr + lora * (H * R)
        tile = n_ok[:, None] & r_ok[None, :]
        d += tl.sum(tl.load(b_l + n[:, None] * R + r[None, :], mask=tile, other=0.0).to(tl.float32) * shrink[None, :], axis=1)
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
    block_n: int = 32,
    block_k: int = 128,
    num_warps: int = 4,
) -> torch.Tensor:  # [T, H] float32
    T, k = topk_ids.shape
    Eg, two_i, H = gate_up.shape
    I, E, P = two_i // 2, group.numel() - 1, T * k
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    has_lora = lora is not None
    if has_lora:
        R, per_expert = lora.a_gate_up.shape[1], lora.a_gate_up.shape[0] // Eg
        a_gu, b_gu, a_d, b_d, slots = lora.a_gate_up, lora.b_gate_up, lora.a_down, lora.b_down, token_slots.contiguous()
    else:  # the LoRA arguments are not read
        R, per_expert = 1, 1
        a_gu = b_gu = a_d = b_d = gate_up
        slots = ids
    block_r = max(16, triton.next_power_of_2(R))
    h = torch.empty(P, I, dtype=torch.float32, device=x.device)
    out = torch.empty(P, H, dtype=torch.float32, device=x.device)
    common = dict(HAS_LORA=has_lora, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=num_warps)
    _gate_up_kernel[(P, triton.cdiv(I, block_n))](
        x.contiguous(), ids, group, slots, gate_up, a_gu, b_gu, h, k, E, Eg, H, I, R, per_expert, **common)
    _down_kernel[(P, triton.cdiv(H, block_n))](
        h, ids, group, slots, weights, down, a_d, b_d, out, k, E, Eg, H, I, R, per_expert, **common)
    return out.view(T, k, H).sum(1)

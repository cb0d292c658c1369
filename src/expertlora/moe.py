"""The MoE-LoRA math: the float64 reference (the one definition) and the grouped PyTorch path.

Shape legend: T = tokens, k = experts per token, E = experts, H = hidden, I = intermediate,
r = rank, n = tokens routed to one expert.

For token t routed to experts e_j with weights w_j and adapter a (scaling s):

    g = x·Wg_eᵀ + s·(x·Ag_eᵀ)·Bg_eᵀ
    u = x·Wu_eᵀ + s·(x·Au_eᵀ)·Bu_eᵀ
    h = silu(g) * u
    d = h·Wd_eᵀ + s·(h·Ad_eᵀ)·Bd_eᵀ
    y_t = Σ_j w_j · d_{e_j}

Expert ids outside [0, E) (-1 by convention) are skipped: those experts run elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .experts import ExpertWeights
from .lora import LayerLoRA, ProjLoRA
from .quantize import QuantizedStack
from .slots import NO_ADAPTER, SlotLoRA


def reference_moe(
    x: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k]
    topk_weights: torch.Tensor,  # [T, k]
    gate: torch.Tensor,  # [E, I, H]
    up: torch.Tensor,  # [E, I, H]
    down: torch.Tensor,  # [E, H, I]
    token_loras: list[LayerLoRA | None],  # [T]: each token's adapter for this layer
) -> torch.Tensor:  # [T, H] float64
    """The math above in float64, one routed pair at a time. Slow and plain on purpose."""
    x, gate, up, down = (t.double() for t in (x, gate, up, down))
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        lora = token_loras[t]
        for e, w in zip(topk_ids[t].tolist(), topk_weights[t].double()):
            if not 0 <= e < gate.shape[0]:
                continue
            g = x[t] @ gate[e].T + _lora(lora and lora.gate, e, x[t])  # [I]
            u = x[t] @ up[e].T + _lora(lora and lora.up, e, x[t])  # [I]
            h = F.silu(g) * u  # [I]
            y[t] += w * (h @ down[e].T + _lora(lora and lora.down, e, h))  # [H]
    return y


def _lora(proj: ProjLoRA | None, e: int, x: torch.Tensor) -> torch.Tensor | float:
    if proj is None:
        return 0.0
    return proj.spec.scaling * (x @ proj.a[e].double().T) @ proj.b[e].double().T


def moe_forward_torch(
    weights: ExpertWeights,
    x: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, k]
    topk_weights: torch.Tensor,  # [T, k]
    token_slots: torch.Tensor,  # [T] slot per token, NO_ADAPTER for none
    slots: list[SlotLoRA],  # this layer's LoRA per slot
) -> torch.Tensor:  # [T, H] float32
    """The portable path: group routed pairs by expert, run each expert once on its tokens,
    add each adapter's LoRA on the rows of the tokens that use it."""
    T, k = topk_ids.shape
    E, I = weights.num_experts, weights.intermediate_size
    flat_ids = topk_ids.reshape(-1)
    pairs = ((flat_ids >= 0) & (flat_ids < E)).nonzero().squeeze(1)  # routed pairs kept
    experts = flat_ids[pairs]
    order = torch.argsort(experts, stable=True)
    pairs, experts = pairs[order], experts[order]
    counts = torch.bincount(experts, minlength=E).tolist()
    pair_weights = topk_weights.reshape(-1).float()
    y = torch.zeros(T, x.shape[1], dtype=torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        p = pairs[start : start + n]
        start += n
        tokens = p // k  # [n]
        xs = x[tokens]  # [n, H]
        gu = _expert_linear(weights.gate_up, e, xs)  # [n, 2I]
        tok_slots = token_slots[tokens]
        groups = [(s, (tok_slots == s).nonzero().squeeze(1)) for s in tok_slots.unique().tolist() if s != NO_ADAPTER]
        for s, rows in groups:
            lora = slots[s]
            shrunk = xs[rows].float() @ lora.a_gate_up[e].float().T  # [m, rg + ru]
            rg = lora.gate_rank
            gu[rows, :I] += shrunk[:, :rg] @ lora.bt_gate[e].float()
            gu[rows, I:] += shrunk[:, rg:] @ lora.bt_up[e].float()
        h = F.silu(gu[:, :I]) * gu[:, I:]  # [n, I]
        d = _expert_linear(weights.down, e, h)  # [n, H]
        for s, rows in groups:
            lora = slots[s]
            d[rows] += (h[rows] @ lora.a_down[e].float().T) @ lora.bt_down[e].float()
        y.index_add_(0, tokens, d * pair_weights[p, None])
    return y


def _expert_linear(stack: QuantizedStack, e: int, x: torch.Tensor) -> torch.Tensor:
    """x [n, K] · W_e [N, K]ᵀ in float32, with PyTorch's kernel for the storage method."""
    if stack.method == "fp32":
        return x.float() @ stack.data[e].T
    if stack.method == "bf16":
        return F.linear(x.to(torch.bfloat16), stack.data[e]).float()
    if stack.method == "int8" and stack.in_features % 32 == 0:  # torch 2.13's op is wrong for other K
        scale = stack.scale[e, :, 0].to(torch.bfloat16)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), stack.data[e], scale).float()
    return x.float() @ stack.dequantize(e).T  # int4 (PyTorch's int4 op wants its own packing)

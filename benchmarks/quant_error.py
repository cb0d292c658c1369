"""Accuracy of each storage method: the engine's layer output against the float64 reference on
the unquantized weights, and against the reference on the method's own dequantized weights.

    python benchmarks/quant_error.py

One random layer (E 16, H 2048, I 768, top-4), LoRA r 16 on gate / up / down, 6 tokens.
"""

from __future__ import annotations

import torch

from expertlora import ExpertWeights, MoELoRAEngine
from expertlora.moe import reference_moe
from expertlora.tiny import random_expert_lora

E, H, I, K, T = 16, 2048, 768, 4, 6


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def main():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(E, I, H, generator=g) / H**0.5, torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    adapter = random_expert_lora(E, H, I, [0], {"gate": 16, "up": 16, "down": 16}, alpha=32.0)
    loras = [adapter.layers[0]] * T
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    exact = reference_moe(x, ids, w, gate, up, down, loras)
    print("| method | int4 group | vs unquantized reference | vs own dequantized reference |")
    print("|---|---|---|---|")
    for method, groups in (("fp32", (128,)), ("bf16", (128,)), ("int8", (128,)), ("int4", (32, 64, 128))):
        for group in groups:
            weights = ExpertWeights.from_tensors(gate, up, down, method, group)
            engine = MoELoRAEngine({0: weights})
            engine.load_adapter("a", adapter)
            y = engine.forward(0, x, ids, w, engine.token_slots(["a"] * T))
            own = reference_moe(x, ids, w, *weights.dequantize(), loras)
            print(f"| {method} | {group if method == 'int4' else '-'} | {rel(y, exact):.1e} | {rel(y, own):.1e} |")


if __name__ == "__main__":
    main()

"""The kt backend's own cost: KtMoEEngine.forward against kt-kernel's wrapper called directly.

    python benchmarks/kt_glue.py [--threads 1] [--tokens 1]

Qwen3-30B-A3B layer (H 2048, I 768, E 128, top-8), bf16, LoRA r 16, one layer reused (the glue,
not the memory, is what is measured), fresh routing per call, medians; needs kt-kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from expertlora import ExpertWeights
from expertlora.kt_backend import KtMoEEngine
from expertlora.tiny import random_expert_lora

E, H, I, K = 128, 2048, 768, 8


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = ExpertWeights.from_gate_up(
        torch.randn(E, 2 * I, H, generator=g, dtype=torch.bfloat16) / H**0.5,
        torch.randn(E, H, I, generator=g, dtype=torch.bfloat16) / I**0.5, "bf16",
    )
    engine = KtMoEEngine({0: weights}, threads=args.threads)
    engine.load_adapter("a", random_expert_lora(E, H, I, [0], {"gate": 16, "up": 16, "down": 16}))
    T = args.tokens
    routes = [torch.rand(T, E, generator=g).topk(K, dim=1) for _ in range(args.calls)]
    x, slots = torch.randn(T, H, dtype=torch.bfloat16), engine.token_slots(["a"] * T)
    engine.forward(0, x, routes[0][1], routes[0][0], slots)  # builds the wrapper
    wrapper = engine._wrappers[0].kt

    def median_ms(fn):
        times = []
        for w, ids in routes:
            t0 = time.perf_counter()
            fn(ids, w)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times[10:])

    for _ in range(2):
        ours = median_ms(lambda ids, w: engine.forward(0, x, ids, w, slots))
        direct = median_ms(lambda ids, w: wrapper.forward(x, ids, w, save_for_backward=False))
        print(f"kt backend {ours:.3f} ms, kt-kernel direct {direct:.3f} ms, ratio {ours / direct:.3f}")


if __name__ == "__main__":
    main()

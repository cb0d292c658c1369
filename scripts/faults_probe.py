"""Device probe: page faults and time of the CPU engine's calls at 2048 tokens in a fresh process
(int4 Qwen3-30B-A3B layers, LoRA loaded, six routings per layer count). It found the kernel
workspace's regrowth (BENCHMARKS.md, "The crossover again"). Run with EXPERTLORA_PROFILE=1 for
each call's phases; LAYERS=1,6 picks the layer counts; GLIBC_TUNABLES / EXPERTLORA_AMX for variants.

    PYTHONPATH=src python3 scripts/faults_probe.py
"""
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from moe_layer import routings  # noqa: E402

from expertlora.engine import MoELoRAEngine  # noqa: E402
from expertlora.experts import ExpertWeights  # noqa: E402
from expertlora.tiny import random_expert_lora  # noqa: E402

for f in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag", "/proc/sys/kernel/numa_balancing"):
    try:
        print(f, open(f).read().strip())
    except OSError as e:
        print(f, e)
H, I, E, k, T = 2048, 768, 128, 8, 2048
g = torch.Generator().manual_seed(0)
gu = (torch.randn(8, 2 * I, H, generator=g) / H**0.5).bfloat16().repeat(E // 8, 1, 1)
dn = (torch.randn(8, H, I, generator=g) / I**0.5).bfloat16().repeat(E // 8, 1, 1)
for n in [int(v) for v in os.environ.get("LAYERS", "1,6").split(",")]:
    engine = MoELoRAEngine({L: ExpertWeights.from_gate_up(gu, dn, "int4") for L in range(n)}, threads=max(1, os.cpu_count() - 1))
    engine.load_adapter("a", random_expert_lora(E, H, I, [0], {"gate": 16, "up": 16, "down": 16}, seed=0))
    rts = routings(T, E, k, 10, seed=3)
    x, slots = torch.randn(T, H).bfloat16(), torch.full((T,), -1, dtype=torch.long)
    for i in range(6):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        engine.forward(i % n, x, *rts[i], slots)
        print(f"layers {n} call {i}: {1e3 * (time.perf_counter() - t0):.1f} ms, "
              f"minflt {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}", flush=True)
    del engine

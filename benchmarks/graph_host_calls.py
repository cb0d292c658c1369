"""Who serves a replayed graph's host calls: the replaying thread, or a worker thread. Runs on the CPU.

A Python thread stands in for the CUDA stream of a replayed decode step: per layer call it posts
the call's ``ready``, waits for its ``done``, then sleeps --gap-us (the GPU's work before the next
layer). The CPU part is our engine on a Qwen3-30B-A3B-shaped layer (bf16, LoRA r 16 on every
projection, one token, a fresh routing per call, layers rotating), built and called once on the
main thread, as the serving engine loads and steps on one thread. Each mode runs in a process of
its own, since an OpenMP pool, once made, stays for the life of its thread:

- launcher: the replaying thread serves the calls (``GraphCpuPart(on_launcher=True)``);
- worker: a worker thread serves them, a second OpenMP pool;
- launcher, idle pool: the launcher serves them while another thread that once ran a parallel
  torch op sits idle (its pool counts against libgomp's spin limit all the same).

    python benchmarks/graph_host_calls.py [--threads 2] [--steps 300] [--layers 4] [--gap-us 100]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import threading
import time

import torch

from expertlora.engine import MoELoRAEngine
from expertlora.experts import ExpertWeights
from expertlora.host_nodes import Semaphore, _library
from expertlora.hybrid_graph import GraphCpuPart, HostCall
from expertlora.tiny import random_expert_lora

MODES = ("launcher", "worker", "launcher, idle pool")
H, I, E, K = 2048, 768, 128, 8


def one_mode(mode: str, args) -> dict:
    torch.manual_seed(0)
    n = args.layers
    gate_up = torch.randn(E, 2 * I, H, dtype=torch.bfloat16) / H**0.5
    down = torch.randn(E, H, I, dtype=torch.bfloat16) / I**0.5
    first = ExpertWeights.from_gate_up(gate_up, down, "bf16")
    layers = {L: first if L == 0 else ExpertWeights.from_gate_up(gate_up, down, "bf16") for L in range(n)}
    engine = MoELoRAEngine(layers, threads=args.threads)
    engine.load_adapter("a", random_expert_lora(E, H, I, list(layers), {"gate": 16, "up": 16, "down": 16}, alpha=32.0, seed=1))
    slots = engine.token_slots(["a"])
    x = torch.randn(1, H, dtype=torch.bfloat16)
    routings = [(torch.randperm(E)[:K][None], torch.rand(1, K)) for _ in range(64)]
    engine.forward(0, x, *routings[0], slots)  # the main thread's pool, made here
    if mode == "launcher, idle pool":
        ran = threading.Event()

        def idle():
            torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel region: this thread's pool
            ran.set()
            threading.Event().wait()

        threading.Thread(target=idle, daemon=True).start()
        ran.wait()
    calls = [HostCall(L, x.clone(), *(t.clone() for t in routings[L]), slots, torch.empty(1, H, dtype=torch.bfloat16),
                      Semaphore(), Semaphore()) for L in range(n)]
    part = GraphCpuPart(lambda c: engine.forward(c.layer, c.x, c.ids, c.weights, c.slots), on_launcher=mode != "worker")
    lib = _library()
    host_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    post, wait = (host_fn(ctypes.cast(fn, ctypes.c_void_p).value) for fn in (lib.el_post, lib.el_wait))
    gap = args.gap_us / 1e6

    def stream():
        for c in calls:
            post(c.ready.address)
            wait(c.done.address)
            time.sleep(gap)

    times, cpu = [], []
    for step in range(args.warmup + args.steps):
        for i, c in enumerate(calls):
            ids, weights = routings[(step * n + i) % len(routings)]
            c.ids.copy_(ids)
            c.weights.copy_(weights)
        t = threading.Thread(target=stream)
        start = time.perf_counter()
        part.run_replay(calls, t.start, t.join)
        times.append(time.perf_counter() - start)
    for step in range(args.steps):  # the same calls back to back on the main thread: the CPU part's own time
        start = time.perf_counter()
        for i in range(n):
            engine.forward(i, x, *routings[(step * n + i) % len(routings)], slots)
        cpu.append(time.perf_counter() - start)
    return {"step_ms": 1e3 * statistics.median(times[args.warmup:]), "cpu_ms": 1e3 * statistics.median(cpu)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--gap-us", type=int, default=100)
    p.add_argument("--mode", choices=MODES, help="run one mode here and print its figures as JSON")
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args)))
        return
    print(f"| who serves the host calls | step ms ({args.layers} layer calls, {args.gap_us} us gaps) | "
          f"the same calls back to back on the main thread ms | step - calls - gaps ms |\n|---|---|---|---|")
    for mode in MODES:
        argv = [sys.executable, __file__, "--mode", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "mode"]
        r = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=900).stdout.splitlines()[-1])
        rest = r["step_ms"] - r["cpu_ms"] - args.layers * args.gap_us / 1e3
        print(f"| {mode} | {r['step_ms']:.3f} | {r['cpu_ms']:.3f} | {rest:.3f} |", flush=True)


if __name__ == "__main__":
    main()

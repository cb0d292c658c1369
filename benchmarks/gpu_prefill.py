"""GPU prefill for CPU-resident experts (gpu_prefill.py): per layer against its copy time and
against the CPU path, per method; needs a CUDA GPU.

    python benchmarks/gpu_prefill.py                              # Qwen3-30B-A3B layers, bf16 / int8 / int4
    python benchmarks/gpu_prefill.py --device cpu --shape tiny    # a check of this script without a GPU

Per method: --layers layers of one shape with every expert in CPU memory (the hybrid executor,
0% on the GPU), LoRA r 16 on gate, up and down, every token on the adapter.
- Bandwidth: a 1 GiB page-locked block (registered as the prefill's blocks are) copied to the GPU;
  torch's own pinned allocation beside it. Copy: one layer's block copied alone, and its bytes at
  that bandwidth (the target's denominator).
- Prefill: the layers called in order as one forward would, events recorded on the compute stream
  after each: "per layer" is the median gap after the first layer (copy-bound when the pipeline
  works: each layer's copy overlaps the previous layer's compute); "first" is the first layer's,
  whose copy nothing overlaps; "forward / layer" is a whole pass's wall time over its layers.
- Compute alone: two layers called alternately, both held in the two buffers (no copies).
- CPU path: the same hybrid with GPU prefill off (the CPU engine, --threads), rotating over the
  layers (more bytes than the L3), median per call.
- Crossover: the smallest token count from which GPU prefill per layer beats the CPU path at
  every larger count measured: the default threshold for that method (gpu_prefill.DEFAULT_THRESHOLDS).
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch

from expertlora.engine import MoELoRAEngine, available_cores
from expertlora.experts import ExpertWeights
from expertlora.gpu import GpuMoELoRA
from expertlora.gpu_prefill import PinnedHost, memory_needed
from expertlora.hybrid import HybridMoE
from expertlora.tiny import random_expert_lora
from gpu_layer import sync, wall_ms  # this folder is on sys.path
from moe_layer import ALL, ALPHA, SHAPES, _copy, cpu_name, emit, routings

SMOKE = {"tiny": (64, 32, 8, 2)}
DEVICE = "cuda"


def h2d_bandwidth(nbytes: int) -> tuple[float, float]:
    """(GB/s from a registered page-locked block, GB/s from torch's pinned allocation)."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    host = PinnedHost(pin=DEVICE == "cuda")
    registered = host.block(nbytes)
    registered.fill_(1)
    pinned = torch.ones(nbytes, dtype=torch.uint8, pin_memory=DEVICE == "cuda")
    out = []
    for src in (registered, pinned):
        out.append(nbytes / wall_ms(lambda i: dst.copy_(src, non_blocking=True), 5, 2) / 1e6)
    return out[0], out[1]


def build(method: str, H: int, I: int, E: int, n_layers: int, threads: int) -> tuple[HybridMoE, HybridMoE]:
    """(the hybrid with GPU prefill for every forward, the same engines with it off)."""
    gen = torch.Generator().manual_seed(0)
    # Random experts 0..7, repeated: the timing needs distinct memory per layer, not distinct values.
    block = min(E, 8)
    gate_up = (torch.randn(block, 2 * I, H, generator=gen) / H**0.5).bfloat16().repeat(E // block, 1, 1)
    down = (torch.randn(block, H, I, generator=gen) / I**0.5).bfloat16().repeat(E // block, 1, 1)
    first = ExpertWeights.from_gate_up(gate_up, down, method)
    layers = {0: first} | {L: _copy(first) for L in range(1, n_layers)}
    cpu = MoELoRAEngine(layers, threads=threads)
    gpu = GpuMoELoRA(DEVICE, torch.float32 if method == "fp32" else torch.bfloat16)
    for L in layers:
        gpu.add_layer(L, gate_up, down, torch.zeros(E, dtype=torch.bool))
    adapter = random_expert_lora(E, H, I, [0], ALL, alpha=ALPHA, seed=0)
    adapter.layers.update({L: adapter.layers[0] for L in layers})  # every layer shares layer 0's LoRA
    fast = HybridMoE(cpu, gpu)
    fast.load_adapter("a", adapter)
    fast.enable_gpu_prefill(1)  # moves the CPU engine's storage into page-locked blocks
    return fast, HybridMoE(cpu, gpu)


def prefill_pass_ms(hybrid: HybridMoE, xs, rts, slots, n_layers: int) -> tuple[float, float, float]:
    """One forward over the layers: (first layer ms, median later gap ms, wall ms per layer)."""
    sync()
    t0 = time.perf_counter()
    marks = []
    if DEVICE == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        start.record()
    for L in range(n_layers):
        hybrid.forward(L, xs[L], *rts[L], slots)
        if DEVICE == "cuda":
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
    sync()
    wall = 1e3 * (time.perf_counter() - t0) / n_layers
    if DEVICE != "cuda":
        return wall, wall, wall
    times = [start.elapsed_time(marks[0])] + [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    return times[0], statistics.median(times[1:]), wall


def run_method(method: str, args, h2d_gbs: float) -> dict:
    H, I, E, k = (SHAPES | SMOKE)[args.shape]
    t_build = time.perf_counter()
    fast, slow = build(method, H, I, E, args.layers, args.threads)
    n = args.layers
    layer_bytes = fast.cpu.layers[0].nbytes
    print(f"[{method}] {n} layers built in {time.perf_counter() - t_build:.1f} s; a layer's CPU experts {layer_bytes / 2**20:.0f} MiB; "
          f"GPU memory for prefill {memory_needed(list(fast.cpu.layers.values())) / 2**30:.2f} GiB", flush=True)
    block = fast.prefill._blocks[0]
    dst = torch.empty_like(block, device=DEVICE)
    copy_ms = wall_ms(lambda i: dst.copy_(block, non_blocking=True), 5, 1)
    del dst
    row = dict(method=method, layer_mib=layer_bytes / 2**20, copy_ms=copy_ms, bw_ms=layer_bytes / h2d_gbs / 1e6, by_tokens={})
    for T in sorted(set(args.tokens + args.cross)):
        slots = torch.zeros(T, dtype=torch.long)
        rts_all = routings(T, E, k, n * (args.passes + 1), seed=T)
        rts_dev = [(ids.to(DEVICE), w.to(DEVICE)) for ids, w in rts_all]
        xs = [torch.randn(T, H, dtype=torch.bfloat16, device=DEVICE) for _ in range(n)]
        passes = [prefill_pass_ms(fast, xs, rts_dev[p * n : (p + 1) * n], slots, n) for p in range(args.passes + 1)][1:]
        first, steady, wall = (statistics.median(p[j] for p in passes) for j in range(3))
        r = dict(first=first, steady=steady, wall=wall)
        if T in args.tokens:  # compute alone: the last two layers stay in the two buffers (the last prefetches nothing)
            r["compute"] = wall_ms(lambda i: fast.forward(n - 2 + i % 2, xs[i % 2], *rts_dev[i % len(rts_dev)], slots), 6, 2)
            copies = fast.prefill.copies
            fast.forward(n - 2, xs[0], *rts_dev[0], slots)
            assert fast.prefill.copies == copies, "compute alone copied a layer"
        calls = 3 if T >= 512 else 6
        r["cpu"] = wall_ms(lambda i: slow.forward(i % n, xs[i % n], *rts_dev[i % len(rts_dev)], slots), calls, 1)
        row["by_tokens"][T] = r
        print(f"[{method}] T={T:5d}: prefill per layer {steady:.2f} ms (first {first:.2f}, forward / layer {wall:.2f}), "
              f"x{steady / row['bw_ms']:.2f} of the copy at {h2d_gbs:.1f} GB/s ({row['bw_ms']:.2f} ms; alone {copy_ms:.2f}), "
              f"compute alone {r.get('compute', float('nan')):.2f}; CPU path {r['cpu']:.2f} ms; x{r['cpu'] / steady:.1f}", flush=True)
    wins = [T for T in sorted(row["by_tokens"]) if all(row["by_tokens"][u]["steady"] < row["by_tokens"][u]["cpu"]
                                                       for u in row["by_tokens"] if u >= T)]
    row["crossover"] = wins[0] if wins else None
    print(f"[{method}] GPU prefill beats the CPU path from {row['crossover']} tokens (of those measured)", flush=True)
    del fast, slow
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], header: str) -> str:
    out = [header, "",
           "| method | a layer's CPU experts MiB | copy alone ms | bytes at the H2D bandwidth ms | tokens | prefill per layer ms | "
           "/ copy at bandwidth | first layer ms | forward / layer ms | compute alone ms | CPU path ms | CPU / prefill |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for T, r in sorted(row["by_tokens"].items()):
            out.append(f"| {row['method']} | {row['layer_mib']:.0f} | {row['copy_ms']:.2f} | {row['bw_ms']:.2f} | {T} | {r['steady']:.2f} | "
                       f"{r['steady'] / row['bw_ms']:.2f} | {r['first']:.2f} | {r['wall']:.2f} | "
                       f"{r['compute'] if 'compute' in r else float('nan'):.2f} | {r['cpu']:.2f} | {r['cpu'] / r['steady']:.1f} |")
    out += ["", "| method | GPU prefill beats the CPU path from (tokens) |", "|---|---|"]
    out += [f"| {row['method']} | {row['crossover']} |" for row in rows]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="bf16,int8,int4")
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=6, help="at least 3")
    p.add_argument("--tokens", default="512,2048", help="token counts with the compute-alone column")
    p.add_argument("--cross", default="16,32,64,128,256", help="more token counts, for the crossover")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU engine threads (default: cores - 1)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (with --shape tiny)")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_prefill.py needs a CUDA GPU")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.cross = [int(t) for t in args.cross.split(",") if t]
    args.threads = args.threads or max(1, available_cores() - 1)
    torch.set_num_threads(args.threads)
    registered_gbs, pinned_gbs = h2d_bandwidth(2**30 if DEVICE == "cuda" else 2**24)
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "no GPU (script check)"
    print(f"{card}; {cpu_name()}; torch {torch.__version__}: host-to-device {registered_gbs:.1f} GB/s from a registered block, "
          f"{pinned_gbs:.1f} GB/s from torch's pinned memory", flush=True)
    rows = [run_method(m, args, registered_gbs) for m in args.methods.split(",")]
    header = (f"### {card}, {cpu_name()} ({available_cores()} cores, {args.threads} threads), torch {torch.__version__}, {date.today()}\n\n"
              f"`benchmarks/gpu_prefill.py --shape {args.shape} --layers {args.layers}`: host-to-device {registered_gbs:.1f} GB/s from a "
              f"registered block ({pinned_gbs:.1f} from torch's pinned memory). LoRA r 16 on gate, up and down, every token on it; "
              "every expert in CPU memory.")
    emit(markdown(rows, header), args.out)


if __name__ == "__main__":
    main()

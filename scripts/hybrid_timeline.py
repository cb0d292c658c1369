"""Diagnostic (device): where a one-token hybrid layer call's time goes, per GPU share, replayed
as a CUDA graph and eagerly: the host-side timeline (replay start -> the CPU part's start ->
its end -> the replay's end), beside the CPU part alone (back to back, and after 0.2 ms idle).
The graph's CPU part is timed on the worker thread (EXPERTLORA_GRAPH_HOST_CALLS=worker, set here):
where the host node runs the kernel itself, no Python runs in a replay to time."""
import os, statistics, sys, time
os.environ.setdefault("EXPERTLORA_GRAPH_HOST_CALLS", "worker")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torch
from gpu_layer import random_layer, replayed
from moe_layer import ALL, ALPHA, routings
from expertlora.hybrid import HybridMoE
from expertlora.placement import gpu_masks
from expertlora.tiny import random_expert_lora

H, I, E, k, n = 2048, 768, 128, 8, 2
T, CALLS = 1, 60
tensors = {L: random_layer(E, H, I, L) for L in range(n)}
adapter = random_expert_lora(E, H, I, list(tensors), ALL, alpha=ALPHA, seed=0)
med = lambda v: statistics.median(v) * 1e3  # noqa: E731

for share in (0, 25, 50):
    masks = gpu_masks(E, list(tensors), round(share / 100 * E), "uniform")
    hybrid = HybridMoE.build(((L, *t) for L, t in tensors.items()), masks, "bf16", device="cuda", threads=15)
    hybrid.load_adapter("a", adapter)
    cpu, gpu = hybrid.cpu, hybrid.gpu
    rts = routings(T, E, k, CALLS + 10, seed=1)
    x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda")
    rd = [(a.cuda(), b.cuda()) for a, b in rts]
    slots_gpu = torch.zeros(T, dtype=torch.long, device="cuda")
    slots_cpu = slots_gpu.cpu()
    graph = replayed(hybrid, n, x, rd, slots_gpu)
    marks = []
    saved = cpu.forward

    def timed_forward(*a, **kw):
        t0 = time.perf_counter(); y = saved(*a, **kw); marks.append((t0, time.perf_counter())); return y

    cpu.forward = timed_forward
    for mode, fn in (("graph", graph), ("eager", lambda i: hybrid.forward(i % n, x, *rd[i], slots_cpu))):
        rows = []
        for i in range(CALLS + 10):
            torch.cuda.synchronize()
            marks.clear()
            t0 = time.perf_counter(); fn(i); torch.cuda.synchronize(); t3 = time.perf_counter()
            if i >= 10 and marks:
                t1, t2 = marks[0]
                rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
        if not rows:  # run with EXPERTLORA_GRAPH_HOST_CALLS=kernel: no Python call to time inside a replay
            print(f"{share:3d}% {mode}: the CPU part ran no Python to time", flush=True)
            continue
        cols = list(zip(*rows))
        print(f"{share:3d}% {mode}: call {med(cols[3]):.3f} ms = to the CPU part {med(cols[0]):.3f} + CPU part {med(cols[1]):.3f} "
              f"+ after it {med(cols[2]):.3f}", flush=True)
    cpu.forward = saved
    xh = x.cpu()
    mapped = [(gpu.elsewhere(0, a) if share else a, b) for a, b in rts]
    for idle in (0.0, 0.0002, 0.002):
        ts = []
        for i in range(CALLS + 10):
            if idle:
                time.sleep(idle)
            t0 = time.perf_counter(); cpu.forward(i % n, xh, *mapped[i], slots_cpu); t1 = time.perf_counter()
            if i >= 10:
                ts.append(t1 - t0)
        print(f"{share:3d}% CPU part alone after {idle * 1e3:.1f} ms idle: {med(ts):.3f} ms", flush=True)
    ts = []
    for i in range(CALLS):
        t0 = time.perf_counter(); gpu.elsewhere(0, rts[i][0]); ts.append(time.perf_counter() - t0)
    print(f"{share:3d}% elsewhere() on the host: {med(ts) * 1e3:.1f} us", flush=True)
    del hybrid, cpu, gpu
    torch.cuda.empty_cache()

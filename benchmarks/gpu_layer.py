"""One MoE layer with expert LoRA on the GPU, and the hybrid CPU/GPU layer; needs a CUDA GPU.

    python benchmarks/gpu_layer.py                           # GPU layer, every shape; hybrid layer
    python benchmarks/gpu_layer.py --parts gpu --shapes qwen3-30b-a3b --tokens 1

Part ``gpu``: our GPU backend (gpu.py) with every expert resident, bf16, LoRA r 16 on gate, up
and down: with one adapter, without adapters, with four adapters mixed (its default path: the
fused Triton kernels up to FUSED_MAX_TOKENS tokens, the grouped matmuls beyond; at small batches
the grouped path too, graph-replayed and op by op); a plain PyTorch loop
over the experts (one matmul per projection and expert, LoRA included); transformers 5's
``grouped_mm`` experts without LoRA; and transformers + PEFT ``target_parameters`` LoRA. Each
call takes the next of two layers (more than the GPU's L2 cache) and a fresh routing; wall time
per call after synchronising, medians. Effective bandwidth = bytes of the distinct experts the
routing touched / time, beside the device-to-device copy bandwidth measured in the same process
(bytes read + written).

Part ``hybrid``: the Qwen3-30B-A3B layer with 0 / 25 / 50 / 100% of each layer's experts on the
GPU (the rest on the CPU engine), beside the CPU part alone (the CPU engine on its pairs, host
tensors) and the GPU part alone. Overlap = hybrid / max(CPU part, GPU part). The CPU side rotates
over more weight than the L3 holds.

Part ``sweep``: the fused kernels' block sizes beside the grouped path, GPU time alone.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from datetime import date

import torch

from expertlora.engine import available_cores
from expertlora.gpu import FUSED_MAX_TOKENS, GRAPH_MAX_TOKENS, GpuMoELoRA
from expertlora.host_nodes import set_spin
from expertlora.hybrid import HybridMoE
from expertlora.placement import gpu_masks
from expertlora.slots import AdapterSlots
from expertlora.tiny import random_expert_lora
from moe_layer import ALL, ALPHA, SHAPES, cpu_name, emit, peft_layer, routings  # this folder is on sys.path

SHARES = (0, 25, 50, 100)
SMOKE = {"tiny": (64, 32, 8, 2)}  # --device cpu --shapes tiny: a quick check of this script without a GPU
DEVICE = "cuda"


def sync():
    if torch.cuda.is_initialized():  # whatever ran on the GPU has finished
        torch.cuda.synchronize()


def wall_ms(fn, calls: int, warmup: int) -> float:
    """Median wall time of fn(i), synchronised, in ms."""
    for i in range(warmup):
        fn(i)
    sync()
    times = []
    for i in range(warmup, warmup + calls):
        t0 = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_bandwidth() -> tuple[float, float]:
    """(device-to-device copy GB/s counting read + write, pinned host-to-device GB/s)."""
    src = torch.empty(2**30 if DEVICE == "cuda" else 2**26, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    d2d = wall_ms(lambda i: dst.copy_(src), 10, 3)
    host = torch.empty(src.numel() // 4, dtype=torch.uint8, pin_memory=DEVICE == "cuda")
    h2d = wall_ms(lambda i: dst[: host.numel()].copy_(host, non_blocking=True), 10, 3)
    return 2 * src.numel() / d2d / 1e6, host.numel() / h2d / 1e6


def random_layer(E: int, H: int, I: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.bfloat16) / H**0.5
    down = torch.randn(E, H, I, generator=gen, dtype=torch.bfloat16) / I**0.5
    return gate_up, down


def loop_forward(gate_up, down, lora, x, ids, w):
    """The plain PyTorch per-expert loop: for each expert with tokens, its three projections and
    its LoRA as separate matmuls (one adapter on every token)."""
    I = down.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, j = (ids == e).nonzero(as_tuple=True)
        xs = x[tok]
        gu = xs @ gate_up[e].T
        g = gu[:, :I] + lora.scaling * (xs @ lora.a_gate[e].T) @ lora.b_gate[e].T
        u = gu[:, I:] + lora.scaling * (xs @ lora.a_up[e].T) @ lora.b_up[e].T
        h = torch.nn.functional.silu(g) * u
        d = h @ down[e].T + lora.scaling * (h @ lora.a_down[e].T) @ lora.b_down[e].T
        y.index_add_(0, tok, (d * w[tok, j, None]).float())
    return y


class LoopLoRA:
    def __init__(self, adapter, layer: int):
        lay = adapter.layers[layer]
        self.scaling = lay.gate.spec.scaling
        for name, proj in (("gate", lay.gate), ("up", lay.up), ("down", lay.down)):
            setattr(self, f"a_{name}", proj.a.to(DEVICE, torch.bfloat16))
            setattr(self, f"b_{name}", proj.b.to(DEVICE, torch.bfloat16))


def all_resident(layers: dict, adapters: list, fused: bool | None = None) -> GpuMoELoRA:
    """Our GPU backend, bf16, with every expert of ``layers`` (L -> (gate_up, down)) resident and
    ``adapters`` loaded in slots a0, a1, ..."""
    E, two_i, H = next(iter(layers.values()))[0].shape
    slots = AdapterSlots(E, H, two_i // 2, torch.bfloat16)
    for i, adapter in enumerate(adapters):
        slots.load(f"a{i}", adapter)
    engine = GpuMoELoRA(DEVICE, torch.bfloat16, slots, fused=fused)
    for L, (gate_up, down) in layers.items():
        engine.add_layer(L, gate_up, down, torch.ones(E, dtype=torch.bool))
    return engine


def gpu_part(args, copy_gbs: float) -> list[dict]:
    rows = []
    for name in args.shapes.split(","):
        H, I, E, k = (SHAPES | SMOKE)[name]
        layers = {L: random_layer(E, H, I, L) for L in range(2)}
        adapters = [random_expert_lora(E, H, I, list(layers), ALL, alpha=ALPHA, seed=s) for s in range(4)]
        bare, ours = all_resident(layers, []), all_resident(layers, adapters)
        loop_weights = {L: ours.layers[L] for L in layers}
        loop_lora = {L: LoopLoRA(adapters[0], L) for L in layers}
        expert_bytes = 3 * H * I * 2
        tokens = [int(t) for t in args.tokens.split(",")]
        for T in tokens:
            calls = args.calls
            rts = [(ids.to(DEVICE), w.to(DEVICE)) for ids, w in routings(T, E, k, calls + args.warmup, seed=T)]
            xs = [torch.randn(T, H, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
            one, mixed = torch.zeros(T, dtype=torch.long, device=DEVICE), torch.arange(T, device=DEVICE) % 4

            def run(engine, token_slots):
                return lambda i: engine.forward(i % 2, xs[i % 2], *rts[i], token_slots)

            row = dict(shape=name, tokens=T)
            row["lora_ms"] = wall_ms(run(ours, one), calls, args.warmup)
            row["base_ms"] = wall_ms(run(bare, None), calls, args.warmup)
            row["mixed_ms"] = wall_ms(run(ours, mixed), calls, args.warmup)
            row["grouped_ms"] = row["grouped_base_ms"] = row["eager_ms"] = float("nan")
            if T <= FUSED_MAX_TOKENS and ours.fused:  # the grouped matmuls in the fused kernels' place
                ours.fused = bare.fused = False
                row["grouped_ms"] = wall_ms(run(ours, one), calls, args.warmup)
                row["grouped_base_ms"] = wall_ms(run(bare, None), calls, args.warmup)
                ours.fused = bare.fused = True
            if T <= GRAPH_MAX_TOKENS and ours.graphs:  # the grouped path launched op by op
                fused, ours.graphs, ours.fused = ours.fused, False, False
                row["eager_ms"] = wall_ms(run(ours, one), calls, args.warmup)
                ours.graphs, ours.fused = True, fused
            row["loop_ms"] = wall_ms(
                lambda i: loop_forward(loop_weights[i % 2].gate_up, loop_weights[i % 2].down, loop_lora[i % 2], xs[i % 2], *rts[i % len(rts)]),
                min(calls, 10), 2,
            )
            touched = statistics.mean(int(ids.unique().numel()) for ids, _ in rts)
            row["gbs"] = touched * expert_bytes / row["lora_ms"] / 1e6
            row["copy_pct"] = 100 * row["gbs"] / copy_gbs
            rows.append(row)
        del bare, ours, loop_weights, loop_lora, layers
        empty_cache()
        peers = transformers_ms(H, I, E, k, tokens, args)
        for row in (r for r in rows if r["shape"] == name):
            row["hf_ms"], row["peft_ms"] = peers[row["tokens"]]
            print(_gpu_line(row), flush=True)
    return rows


def fused_sweep(args) -> None:
    """gpu_triton's kernels over block sizes and warps beside the grouped path, GPU time per call:
    ten calls (two layers alternating) captured in one CUDA graph and replayed, so launches and
    Python do not count. Chooses the fused path's defaults and the batch size where it stops paying."""
    from expertlora.gpu_triton import fused_forward

    for name in args.shapes.split(","):
        H, I, E, k = (SHAPES | SMOKE)[name]
        layers = {L: random_layer(E, H, I, L) for L in range(2)}
        ours = all_resident(layers, [random_expert_lora(E, H, I, list(layers), ALL, alpha=ALPHA, seed=0)], fused=False)
        loras = [ours._stacked(L, ours.layers[L]) for L in layers]
        for T in (1, 2, 4, 8, 16):
            ids, w = routings(T, E, k, 1, seed=T)[0]
            ids, w = ids.to(DEVICE), w.to(DEVICE)
            x = torch.randn(T, H, dtype=torch.bfloat16, device=DEVICE)
            slot = torch.zeros(T, dtype=torch.long, device=DEVICE)

            def fused(blocks, lora=True):
                def call(i):
                    g = ours.layers[i % 2]
                    return fused_forward(g.group, g.gate_up, g.down, loras[i % 2] if lora else None, x, ids, w,
                                         slot if lora else None, *blocks)
                return call

            results = []
            for blocks in ((n, kb, wp) for n in (8, 16, 32, 64) for kb in (64, 128, 256) for wp in (4, 8)):
                try:
                    results.append((graph_us(fused(blocks)), blocks))
                except Exception as e:  # noqa: BLE001 - a configuration Triton rejects is skipped
                    print(f"{blocks}: {type(e).__name__}: {e}"[:200], flush=True)
            results.sort()
            best = results[0][1]
            grouped = graph_us(lambda i: ours._forward(i % 2, x, ids, w, slot))
            grouped_base = graph_us(lambda i: ours._forward(i % 2, x, ids, w, None))
            print(f"sweep {name} T={T}: grouped + LoRA {grouped:.1f} us (no LoRA {grouped_base:.1f}); fused + LoRA "
                  + ", ".join(f"{n}x{kb} w{wp} {us:.1f}" for us, (n, kb, wp) in results[:5])
                  + f" (no LoRA {graph_us(fused(best, lora=False)):.1f}); worst {results[-1][0]:.1f} us", flush=True)
        del ours, loras, layers
        empty_cache()


def graph_us(fn, calls: int = 10) -> float:
    """GPU time per call of fn(i), i = 0 .. calls - 1, captured in one CUDA graph, in us."""
    if DEVICE != "cuda":
        return 1e3 * wall_ms(fn, calls, 1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (3 * calls)


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def transformers_ms(H: int, I: int, E: int, k: int, tokens: list[int], args) -> dict[int, tuple[float, float]]:
    """Per token count: transformers 5's grouped_mm experts without LoRA, and the PEFT LoRA
    layer, on the GPU."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    layer = peft_layer(H, I, E, torch.bfloat16).to(DEVICE)
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)
    config._experts_implementation = "grouped_mm"
    plain = Qwen3MoeExperts(config).to(DEVICE, torch.bfloat16)
    out = {}
    for T in tokens:
        rts = [(ids.to(DEVICE), w.to(DEVICE, torch.bfloat16)) for ids, w in routings(T, E, k, 12, seed=T)]
        x = torch.randn(T, H, dtype=torch.bfloat16, device=DEVICE)
        with torch.no_grad():
            peft = wall_ms(lambda i: layer.experts(x, *rts[i % 12]), min(args.calls, 10), 2)
            try:
                hf = wall_ms(lambda i: plain(x, *rts[i % 12]), min(args.calls, 10), 2)
            except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
                print(f"transformers grouped_mm did not run: {type(e).__name__}: {e}", flush=True)
                hf = float("nan")
        out[T] = (hf, peft)
    del layer, plain
    empty_cache()
    return out


def hybrid_part(args) -> list[dict]:
    H, I, E, k = (SHAPES | SMOKE)[args.hybrid_shape]
    layer_bytes = 3 * E * H * I * 2
    n_layers = min(64, max(2, math.ceil(4 * args.cache_mb * 2**20 / layer_bytes)))  # 64: the tiny shape's check on the CPU
    tensors = {L: random_layer(E, H, I, L) for L in range(n_layers)}
    adapter = random_expert_lora(E, H, I, list(tensors), ALL, alpha=ALPHA, seed=0)
    rows = []
    threads = args.threads or max(1, available_cores() - 1)
    for share in SHARES:
        count = round(share / 100 * E)
        masks = gpu_masks(E, list(tensors), count, "uniform")
        hybrid = HybridMoE.build(((L, *t) for L, t in tensors.items()), masks, "bf16", device=DEVICE, threads=threads)
        cpu, gpu = hybrid.cpu, hybrid.gpu
        threaded = HybridMoE(cpu, gpu, worker=True)  # the same engines, the CPU part on a worker thread
        inline = HybridMoE(cpu, gpu, worker=False)  # ... and on the calling thread
        hybrid.load_adapter("a", adapter)
        for T in [int(t) for t in args.tokens.split(",")]:
            calls = args.calls if T < 512 else max(4, args.calls // 4)
            rts = routings(T, E, k, 8 * (calls + args.warmup), seed=T)  # a fresh routing per call of each of the 8 variants
            x = torch.randn(T, H, dtype=torch.bfloat16)
            x_gpu = x.to(DEVICE)
            gpu_rts = [(ids.to(DEVICE), w.to(DEVICE)) for ids, w in rts]
            cpu_rts = [(gpu.elsewhere(0, ids), w) for ids, w in rts]  # uniform masks are alike per layer
            slots_cpu = torch.zeros(T, dtype=torch.long)
            slots_gpu = slots_cpu.to(DEVICE)
            L = lambda i: i % n_layers  # noqa: E731
            graph = replayed(hybrid, n_layers, x_gpu, gpu_rts, slots_gpu)
            times = {
                **{f"graph {spin}": polling(graph, spin) for spin in GRAPH_SPINS},
                "hybrid": lambda i: hybrid.forward(L(i), x_gpu, *gpu_rts[i], slots_cpu),
                "threaded": lambda i: threaded.forward(L(i), x_gpu, *gpu_rts[i], slots_cpu),
                "inline": lambda i: inline.forward(L(i), x_gpu, *gpu_rts[i], slots_cpu),
                "cpu": lambda i: cpu.forward(L(i), x, *cpu_rts[i], slots_cpu) if count < E else None,
                "gpu": lambda i: gpu.forward(L(i), x_gpu, *gpu_rts[i], slots_gpu) if count else None,
            }
            row = dict(share=share, tokens=T)
            for j, (what, fn) in enumerate(times.items()):
                row[what] = wall_ms(lambda i, fn=fn, j=j: fn(j * (calls + args.warmup) + i), calls, args.warmup)
            row["overlap"] = row["hybrid"] / max(row["cpu"], row["gpu"])
            row["graph"] = min(row[f"graph {spin}"] for spin in GRAPH_SPINS)
            row["graph_overlap"] = row["graph"] / max(row["cpu"], row["gpu"])
            if args.profile and share == 50 and T == 1:
                profile_calls(lambda i: hybrid.forward(L(i), x_gpu, *gpu_rts[i], slots_cpu), calls)
            rows.append(row)
            print(f"hybrid {share:3d}% T={T:4d}: hybrid {row['hybrid']:.3f} ms (worker thread {row['threaded']:.3f}, inline {row['inline']:.3f}), "
                  f"CPU part {row['cpu']:.3f}, GPU part {row['gpu']:.3f}, "
                  f"hybrid / max {row['overlap']:.2f}; as one CUDA graph "
                  + ", ".join(f"{row[f'graph {spin}']:.3f} ms (poll {spin[0]} / {spin[1]} us)" for spin in GRAPH_SPINS)
                  + f", best / max {row['graph_overlap']:.2f}", flush=True)
        del cpu, gpu, hybrid, threaded, inline
        empty_cache()
    return rows


# How long the host nodes' waits poll before blocking (host_nodes.set_spin), in us: the worker's
# wait for a layer's inputs, the stream's wait for its result.
GRAPH_SPINS = ((0, 0), (300, 0), (300, 5000))


def polling(call, spin: tuple[int, int]):
    def polled(i):
        set_spin(*spin)
        return call(i)

    return polled


def replayed(hybrid: HybridMoE, n_layers: int, x, routings: list, slots):
    """fn(i): the hybrid layer call of layer i % n_layers with routing i, replayed from a CUDA graph
    captured per layer (the CPU part through host nodes, hybrid_graph.py), the routing copied into
    the graph's input buffers first; None where the hybrid cannot be captured."""
    if not (x.is_cuda and hybrid.graphs_ready()):
        return lambda i: None
    part = hybrid.graph_part  # None: every expert on the GPU, nothing for the host
    ids, weights = (t.clone() for t in routings[0])
    graphs = []
    for L in range(n_layers):
        if part is not None:
            part.preparing = True  # the pinned buffers, allocated by an eager call
        hybrid.forward(L, x, ids, weights, slots)  # and the GPU's LoRA stacks, built on first use
        if part is not None:
            part.preparing = False
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hybrid.forward(L, x, ids, weights, slots)
        graphs.append((graph, part.take_captured() if part is not None else []))

    def call(i):
        ids.copy_(routings[i][0])
        weights.copy_(routings[i][1])
        graph, calls = graphs[i % n_layers]
        if part is None:
            graph.replay()
        else:
            part.replay(calls, graph)

    return call


def profile_calls(fn, calls: int) -> None:
    """Where a hybrid decode call's time goes: torch.profiler's table, host and device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(calls):
            fn(i)
        sync()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)


def _gpu_line(r: dict) -> str:
    return (f"{r['shape']:17s} T={r['tokens']:4d}  LoRA {r['lora_ms']:.3f} ms  base {r['base_ms']:.3f}  x{r['lora_ms'] / r['base_ms']:.2f}  "
            f"mixed4 x{r['mixed_ms'] / r['lora_ms']:.2f}  grouped {r['grouped_ms']:.3f} (no LoRA {r['grouped_base_ms']:.3f})  "
            f"eager {r['eager_ms']:.3f}  loop {r['loop_ms']:.2f}  "
            f"transformers {r['hf_ms']:.3f}  PEFT {r['peft_ms']:.2f} ({r['peft_ms'] / r['lora_ms']:.0f}x)  "
            f"{r['gbs']:.0f} GB/s ({r['copy_pct']:.0f}% of copy)")


def markdown(gpu_rows: list[dict], hybrid_rows: list[dict], header: str) -> str:
    out = [header, ""]
    if gpu_rows:
        out += ["| shape | tokens | ours + LoRA ms | ours no LoRA ms | LoRA / no LoRA | 4 adapters mixed / 1 | "
                "grouped matmuls + LoRA ms | grouped no LoRA ms | grouped + LoRA, no CUDA graph ms | "
                "GB/s (% of copy) | PyTorch per-expert loop + LoRA ms | transformers grouped_mm, no LoRA ms | PEFT ms | PEFT / ours |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['shape']} | {r['tokens']} | {r['lora_ms']:.3f} | {r['base_ms']:.3f} | {r['lora_ms'] / r['base_ms']:.2f} | "
                f"{r['mixed_ms'] / r['lora_ms']:.2f} | {r['grouped_ms']:.3f} | {r['grouped_base_ms']:.3f} | {r['eager_ms']:.3f} | "
                f"{r['gbs']:.0f} ({r['copy_pct']:.0f}%) | {r['loop_ms']:.2f} | "
                f"{r['hf_ms']:.3f} | {r['peft_ms']:.2f} | {r['peft_ms'] / r['lora_ms']:.0f}x |" for r in gpu_rows]
        out.append("")
    if hybrid_rows:
        out += ["| GPU share | tokens | hybrid ms | CPU part on the worker thread ms | CPU part on the calling thread ms | CPU part alone ms | GPU part alone ms | hybrid / max(parts) | "
                + " | ".join(f"as one CUDA graph, waits polling {r} / {d} us ms" for r, d in GRAPH_SPINS) + " | best graph / max(parts) |",
                "|---|---|---|---|---|---|---|---|" + "---|" * (len(GRAPH_SPINS) + 1)]
        out += [f"| {r['share']}% | {r['tokens']} | {r['hybrid']:.3f} | {r['threaded']:.3f} | {r['inline']:.3f} | {r['cpu']:.3f} | {r['gpu']:.3f} | {r['overlap']:.2f} | "
                + " | ".join(f"{r[f'graph {spin}']:.3f}" for spin in GRAPH_SPINS) + f" | {r['graph_overlap']:.2f} |" for r in hybrid_rows]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="gpu,hybrid", help="gpu, hybrid, sweep (the fused kernels' block sizes)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default="1,4,16,32,512")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU engine threads in the hybrid part (default: cores - 1)")
    p.add_argument("--cache-mb", type=int, default=300, help="the CPU's L3 in MiB (the hybrid part's rotation covers 4x)")
    p.add_argument("--hybrid-shape", default="qwen3-30b-a3b")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table for the hybrid layer at 50%% and 1 token")
    p.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (with --shapes tiny --hybrid-shape tiny)")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_layer.py needs a CUDA GPU")
    torch.set_num_threads(args.threads or max(1, available_cores() - 1))
    copy_gbs, h2d_gbs = copy_bandwidth()
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "no GPU (script check)"
    print(f"{card}; {cpu_name()}; torch {torch.__version__}: copy {copy_gbs:.0f} GB/s, pinned host-to-device {h2d_gbs:.1f} GB/s", flush=True)
    parts = args.parts.split(",")
    if "sweep" in parts:
        fused_sweep(args)
    gpu_rows = gpu_part(args, copy_gbs) if "gpu" in parts else []
    hybrid_rows = hybrid_part(args) if "hybrid" in parts else []
    header = (f"### {card}, {cpu_name()} ({available_cores()} cores), torch {torch.__version__}, {date.today()}\n\n"
              f"Measured in the same run: device-to-device copy {copy_gbs:.0f} GB/s (read + write), pinned host-to-device "
              f"{h2d_gbs:.1f} GB/s. bf16, LoRA r 16 on gate, up and down.")
    emit(markdown(gpu_rows, hybrid_rows, header), args.out)


if __name__ == "__main__":
    main()

"""One MoE layer with expert LoRA on the CPU: our engine beside its peers and the machine's ceilings.

    python benchmarks/moe_layer.py                      # every shape, method and token count
    python benchmarks/moe_layer.py --shapes qwen3-30b-a3b --methods bf16 --tokens 1

Method: each timed call picks the next of several layers' weights (more bytes in all than
--cache-mb, the CPU's L3, times four) and a fresh random routing, so decode figures are
not served from cache; medians after warm-up. Peers run in the same process: the engine
without adapters, with four adapters mixed in one batch, our PyTorch path (the portable
fallback: one matmul per expert), transformers 5 + peft ``target_parameters`` on the same
layer, and, where installed, kt-kernel's AMXBF16_SFT forward (bf16 rows: the same weights,
LoRA and rotation, one thread fewer by default, measured after ours since its threads poll), and
its AMXINT4_SFT beside our int4 (fed our int4 weights dequantized to bf16, which it quantizes
again in its own layout). The engine's variants take turns call by call: with LoRA at its default
AMX threshold, without LoRA, four adapters mixed, and (where the CPU has AMX) AVX-512 only, AMX
for every expert with a token, and bf16 A tiles loaded from a copy of the task's rows rather
than straight from the weights (EXPERTLORA_AMX_COPY); for bf16 batches that the engine sends to
oneDNN (``engine.ONEDNN_TOKENS_PER_EXPERT`` tokens per expert and more), the compiled kernel
instead. The read and copy bandwidth of this
machine are measured first.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from datetime import date
from math import nan

import torch

from expertlora.engine import MoELoRAEngine
from expertlora.experts import ExpertWeights
from expertlora.kernels import amx_from, has_amx
from expertlora.tiny import random_expert_lora

# name: (H, I, E, top-k, transformers family of the PEFT peer)
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}
RANK, ALPHA = 16, 32.0
KT_METHODS = {"bf16": "AMXBF16_SFT", "int4": "AMXINT4_SFT"}  # kt-kernel's peer of our method
ALL = {"gate": RANK, "up": RANK, "down": RANK}


def median_ms(fn, calls: int, warmup: int) -> float:
    """Median wall time of fn(i) over calls i = warmup .. warmup + calls - 1, in ms."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(warmup, warmup + calls):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ms(fns: dict, calls: int, warmup: int) -> dict:
    """Median ms of each fn(i), the variants taking turns call by call so that drift (clock,
    neighbours) falls on all of them alike. Each call gets its own index i (its own layer of the
    rotation and its own routing), so no variant runs on weights the previous one just read."""
    times = {name: [] for name in fns}
    for n in range(warmup + calls):
        for j, (name, fn) in enumerate(fns.items()):
            t0 = time.perf_counter()
            fn(n * len(fns) + j)
            if n >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bandwidth(cache_mb: int) -> tuple[float, float]:
    """(read, copy) GB/s over buffers 8x the L3; copy counts bytes read plus written. Read is
    the best of a whole-buffer sum and row sums (one reduction alone may not saturate memory)."""
    n = max(cache_mb * 8, 1024) * 2**20 // 4
    src, dst = torch.rand(n), torch.empty(n)
    read = min(median_ms(lambda i: src.sum(), 5, 2), median_ms(lambda i: src.view(256, -1).sum(1), 5, 2))
    copy = median_ms(lambda i: dst.copy_(src), 5, 2)
    return src.nbytes / read / 1e6, 2 * src.nbytes / copy / 1e6


def routings(T: int, E: int, k: int, count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        scores = torch.rand(T, E, generator=gen)
        w, ids = scores.topk(k, dim=1)
        out.append((ids, (w / w.sum(1, keepdim=True)).float()))
    return out


def active_bytes(ids: torch.Tensor, weights: ExpertWeights) -> int:
    return int(ids.unique().numel()) * weights.expert_nbytes()


def peft_layer(H: int, I: int, E: int, dtype: torch.dtype):
    """transformers 5's experts module with a PEFT target_parameters LoRA on gate_up and down."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Qwen3MoeExperts(config)

    layer = Layer()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    layer = inject_adapter_in_model(lora, layer)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return layer.to(dtype).eval()


def run_shape(name: str, methods: list[str], tokens: list[int], args, read_gbs: float) -> list[dict]:
    H, I, E, k = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    t_start = time.perf_counter()
    rows = []
    adapters = [random_expert_lora(E, H, I, [0], ALL, alpha=ALPHA, seed=s) for s in range(4)]
    for method in methods:
        bytes_per_layer = 3 * E * H * I * {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}[method]
        n_layers = max(2, math.ceil(4 * args.cache_mb * 2**20 / bytes_per_layer))
        print(f"[{name} {method}] building {n_layers} layers ({n_layers * bytes_per_layer / 2**30:.1f} GiB)", flush=True)
        gate_up = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.bfloat16) / H**0.5
        down = torch.randn(E, H, I, generator=gen, dtype=torch.bfloat16) / I**0.5
        first = ExpertWeights.from_gate_up(gate_up, down, method)
        del gate_up, down
        # The rotation needs distinct memory, not distinct values: copies are quick to make.
        layers = {0: first} | {L: _copy(first) for L in range(1, n_layers)}
        # every layer of the rotation shares the adapters' layer-0 LoRA
        shared = [random_expert_lora(E, H, I, list(layers), ALL, alpha=ALPHA, seed=s) for s in range(4)]
        for a, src in zip(shared, adapters):
            a.layers.update({L: src.layers[0] for L in layers})
        bare = MoELoRAEngine(layers, threads=args.threads)
        engine = MoELoRAEngine(layers, threads=args.threads)
        avx = MoELoRAEngine(layers, threads=args.threads)  # AVX-512 only
        every = MoELoRAEngine(layers, threads=args.threads)  # AMX for every expert with a token
        # the compiled kernel at every size: bf16 batches of ONEDNN_TOKENS_PER_EXPERT and more go to oneDNN otherwise
        kernel_only = MoELoRAEngine(layers, threads=args.threads, onednn_from=math.inf)
        avx.amx_from, every.amx_from = 0, 1
        amx_variants = has_amx() and engine.amx_from > 0 and method != "fp32"
        for e in (avx, every, kernel_only) if amx_variants else ():
            for i, a in enumerate(shared):
                e.load_adapter(f"a{i}", a)
        fallback = MoELoRAEngine(layers, threads=args.threads, kernel="torch")
        for i, a in enumerate(shared):
            engine.load_adapter(f"a{i}", a)
            fallback.load_adapter(f"a{i}", a)
        dtype = torch.float32 if method == "fp32" else torch.bfloat16
        plans = {}
        for T in tokens:
            calls = args.calls if T < 512 else max(3, args.calls // 4)
            rts = routings(T, E, k, 7 * (calls + max(args.warmup, n_layers)), seed=T)  # 7 variants at most
            xs = [torch.randn(T, H, dtype=dtype) for _ in range(4)]
            one = torch.zeros(T, dtype=torch.long)
            mixed = torch.arange(T, dtype=torch.long) % 4

            def call(eng, slots, env=None):
                def fn(i):
                    ids, w = rts[i]
                    if env:
                        os.environ.update(env)
                    eng.forward(i % n_layers, xs[i % 4], ids, w, slots)
                    for key in env or ():
                        del os.environ[key]
                return fn

            # warm-up covers every layer of the rotation once
            plans[T] = (calls, rts, xs)
            variants = {"lora": call(engine, one), "base": call(bare, None), "mixed": call(engine, mixed)}
            if amx_variants:
                variants |= {"avx": call(avx, one), "every": call(every, one)}
                if method == "bf16":
                    variants["copy"] = call(engine, one, {"EXPERTLORA_AMX_COPY": "1"})
                    if engine.onednn_from is not None and T * k / E >= engine.onednn_from:
                        variants["kernel"] = call(kernel_only, one)
            ms = interleaved_ms(variants, calls, max(args.warmup, n_layers))
            lora_ms, base_ms, mixed_ms = ms["lora"], ms["base"], ms["mixed"]
            slow_calls = max(2, calls // 4) if T >= 32 or name == "mixtral-8x7b" else calls
            torch_ms = median_ms(call(fallback, one), slow_calls, 1) if args.torch_path else float("nan")
            moved = statistics.mean(active_bytes(ids, layers[0]) for ids, _ in rts)
            pairs = T * k
            rows.append(dict(
                shape=name, method=method, tokens=T, lora_ms=lora_ms, base_ms=base_ms, mixed_ms=mixed_ms,
                torch_ms=torch_ms, kt_ms=float("nan"), avx_ms=ms.get("avx", nan), every_ms=ms.get("every", nan),
                copy_ms=ms.get("copy", nan), kernel_ms=ms.get("kernel", nan), gbs=moved / lora_ms / 1e6, read_pct=100 * moved / lora_ms / 1e6 / read_gbs,
                gflops=2 * pairs * 3 * H * I / lora_ms / 1e6,
            ))
            print(_line(rows[-1]), flush=True)
        del bare, engine, fallback, avx, every, kernel_only
        # kt-kernel afterwards, alone: its worker threads poll, and would slow ours if interleaved.
        kt_method = KT_METHODS.get(method)
        kts = kt_wrappers(layers, adapters[0].layers[0], k, args.kt_threads, max(tokens), kt_method) if args.kt and kt_method else None
        for row in (r for r in rows if kts and r["shape"] == name and r["method"] == method):
            calls, rts, xs = plans[row["tokens"]]

            def kt_call(i):
                ids, w = rts[i]
                kts[i % n_layers].forward(xs[i % 4], ids, w, save_for_backward=False)

            row["kt_ms"] = median_ms(kt_call, calls, max(args.warmup, n_layers))
            print(f"[{name} {method}] kt-kernel {kt_method} + LoRA T={row['tokens']}: {row['kt_ms']:.2f} ms", flush=True)
        del layers, shared, kts
    if args.peft:
        for T in tokens:
            for dtype in (torch.bfloat16,):
                layer = peft_layer(H, I, E, dtype)
                rts = routings(T, E, k, 3, seed=T)
                x = torch.randn(T, H, dtype=dtype)
                with torch.no_grad():
                    peft_ms = median_ms(lambda i: layer.experts(x, rts[i % 3][0], rts[i % 3][1].to(dtype)), 2, 1)
                for row in rows:
                    if row["tokens"] == T:
                        row["peft_ms"] = peft_ms
                print(f"[{name}] PEFT bf16 T={T}: {peft_ms:.1f} ms", flush=True)
                del layer
    print(f"[{name}] done in {time.perf_counter() - t_start:.0f} s", flush=True)
    return rows


def kt_wrappers(layers: dict, lora, k: int, threads: int | None, max_tokens: int, method: str = "AMXBF16_SFT"):
    """kt-kernel's ``method`` (AMXBF16_SFT or AMXINT4_SFT) on the same weights and LoRA (the first
    adapter), one wrapper per layer of the rotation, chunked_prefill_size the largest batch (one
    chunk); quantized weights go in dequantized to bf16 (kt-kernel quantizes them again). None
    where kt-kernel is not installed."""
    try:
        from kt_kernel import KTMoEWrapper
        from kt_kernel.sft.base import KExpertsSFTBuffer
    except ImportError:
        return None
    # kt-kernel 0.7.2 shares one input buffer among all wrappers, sized by token count only:
    # a second shape in the same process would reuse the first one's (wrong top-k width).
    KExpertsSFTBuffer._shared_buffer = None
    out = []
    for L, w in layers.items():
        E, H, I = w.num_experts, w.hidden_size, w.intermediate_size
        kt = KTMoEWrapper(
            layer_idx=L, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
            gpu_experts_mask=None, cpuinfer_threads=threads, threadpool_count=1, weight_path="",
            chunked_prefill_size=max_tokens, method=method, mode="sft", lora_rank=RANK, lora_alpha=ALPHA,
            max_cache_depth=1,
        )
        bf16 = w.method == "bf16"
        gate_up = w.gate_up.data if bf16 else w.gate_up.dequantize().to(torch.bfloat16)
        down = w.down.data if bf16 else w.down.dequantize().to(torch.bfloat16)
        kt.load_weights_from_tensors(gate_up[:, :I].contiguous(), gate_up[:, I:].contiguous(), down, torch.arange(E))
        del gate_up, down
        ab = [t.to(torch.bfloat16).contiguous() for p in (lora.gate, lora.up, lora.down) for t in (p.a, p.b)]
        kt.init_lora_weights(*ab, *[torch.zeros_like(t) for t in ab])
        out.append(kt)
    return out


def _copy(w: ExpertWeights) -> ExpertWeights:
    def stack(q):
        return type(q)(q.method, q.data.clone(), q.scale.clone(), q.group_size)

    return ExpertWeights(stack(w.gate_up), stack(w.down))


def _line(r: dict) -> str:
    return (
        f"{r['shape']:17s} {r['method']:5s} T={r['tokens']:4d}  LoRA {r['lora_ms']:8.2f} ms  base {r['base_ms']:8.2f} ms  "
        f"x{r['lora_ms'] / r['base_ms']:.2f}  mixed4 x{r['mixed_ms'] / r['lora_ms']:.2f}  torch-path {r['torch_ms']:8.2f} ms  "
        f"kt {r['kt_ms']:8.2f} ms  AVX-512 only {r['avx_ms']:8.2f} ms  AMX every expert {r['every_ms']:8.2f} ms  "
        f"bf16 rows copied {r['copy_ms']:8.2f} ms  kernel, not oneDNN {r['kernel_ms']:8.2f} ms  "
        f"{r['gbs']:6.1f} GB/s ({r['read_pct']:.0f}% read)  {r['gflops']:7.1f} GFLOP/s"
    )


def markdown(rows: list[dict], header: str) -> str:
    out = [header, "", "| shape | method | tokens | ours + LoRA ms | ours no LoRA ms | LoRA / no LoRA | 4 adapters mixed / 1 | GB/s (% of read) | GFLOP/s | PyTorch path ms | PEFT bf16 ms | PEFT / ours | kt-kernel + LoRA ms | ours / kt | AVX-512 only ms | AMX every expert ms | bf16 rows copied ms | our kernel where oneDNN runs ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peft = r.get("peft_ms", float("nan"))
        out.append(
            f"| {r['shape']} | {r['method']} | {r['tokens']} | {r['lora_ms']:.2f} | {r['base_ms']:.2f} | {r['lora_ms'] / r['base_ms']:.2f} | "
            f"{r['mixed_ms'] / r['lora_ms']:.2f} | {r['gbs']:.1f} ({r['read_pct']:.0f}%) | {r['gflops']:.0f} | {r['torch_ms']:.1f} | "
            f"{peft:.0f} | {peft / r['lora_ms']:.0f}x | {r['kt_ms']:.2f} | {r['lora_ms'] / r['kt_ms']:.2f} | "
            f"{r['avx_ms']:.2f} | {r['every_ms']:.2f} | {r['copy_ms']:.2f} | {r['kernel_ms']:.2f} |"
        )
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--methods", default="fp32,bf16,int8,int4")
    p.add_argument("--tokens", default="1,32,512")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    p.add_argument("--calls", type=int, default=20, help="timed calls per figure (a quarter at 512 tokens)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cache-mb", type=int, default=300, help="the CPU's L3 in MiB (the rotation covers 4x)")
    p.add_argument("--no-peft", dest="peft", action="store_false")
    p.add_argument("--no-torch-path", dest="torch_path", action="store_false")
    p.add_argument("--no-kt", dest="kt", action="store_false", help="skip kt-kernel (AMXBF16_SFT on bf16 rows, AMXINT4_SFT on int4, where installed)")
    p.add_argument("--kt-threads", type=int, default=None, help="kt-kernel's threads (default: ours minus one: it runs far slower on every core)")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count())
    args.kt_threads = args.kt_threads or max(1, (args.threads or os.cpu_count()) - 1)
    read_gbs, copy_gbs = bandwidth(args.cache_mb)
    cpu = cpu_name()
    print(f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}: read {read_gbs:.1f} GB/s, copy {copy_gbs:.1f} GB/s", flush=True)
    rows = []
    for name in args.shapes.split(","):
        rows += run_shape(name, args.methods.split(","), [int(t) for t in args.tokens.split(",")], args, read_gbs)
    header = (
        f"### {cpu}, {os.cpu_count()} cores, threads {args.threads or os.cpu_count()}, torch {torch.__version__}, {date.today()}\n\n"
        f"Measured here in the same run: read {read_gbs:.1f} GB/s, copy {copy_gbs:.1f} GB/s (read + write). "
        f"Rotation over more than 4 x {args.cache_mb} MiB of expert weights. LoRA r {RANK} on gate, up and down. "
        f"AMX: {'yes, experts with >= ' + str(amx_from()) + ' tokens on tiles' if amx_from() else 'no'}."
    )
    emit(markdown(rows, header), args.out)


def emit(table: str, out: str | None) -> None:
    """Print a result table, and append it to ``out`` (--out) when given."""
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(table + "\n")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()

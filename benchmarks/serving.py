"""Serving under load: the engine's continuous batches of mixed adapters, beside its peers.

    python benchmarks/serving.py                                 # 4 layers of Qwen3-30B-A3B, CPU
    python benchmarks/serving.py --model small --quick           # a minute or two on a 2-core box
    python benchmarks/serving.py --device cuda --gpu-experts-ratio 1    # or 0.5, or 0
    python benchmarks/serving.py --http                          # the same through `expertlora serve`
    python benchmarks/serving.py --rss                           # RSS across 1,000 short requests

Workload (seeded, the same in every run): prompt lengths log-uniform in --prompt-lens (random
token ids; short prompts are the common case), outputs uniform in --output-lens with
ignore_eos, each request's adapter drawn from no adapter + 4 adapters. Level c: a closed loop of
c clients (each sends its next request when its last one ends) over the first R(c) requests,
R(c) = max(--min-requests, --rounds x c). Arrivals: the first --arrival-requests requests sent
at Poisson times (rate --rate, default 0.8x the request rate measured at --compare-at), then
all at once (a burst). Times are taken by the client as each token reaches it: time to first
token from sending, inter-token latency between consecutive tokens of a request; output
tokens/s = tokens received / (last token - first send).

The model: 4 decoder layers of Qwen3-30B-A3B (e2e.py's), or --model small (H 256, 32 experts,
top-4) for a quick CPU run; random weights, bf16. The adapters: five PEFT LoRAs (r 16 on every
MoE layer's experts plus q_proj / o_proj, e2e.py's), made once in --workdir and reused.

Peers, in the same run: (a) the first --alone-requests requests one at a time through `run`'s
path (run.load_setup + run.generate); (b) transformers' own continuous batching
(init_continuous_batching) on the plain transformers model of the same checkpoint, no LoRA, the
same closed loop at --compare-at; (c) at --compare-at, the level's requests with no adapter,
all on one adapter, and spread over five adapters. Where every expert is on the CPU, each MoE
call's distinct routed experts are counted (from the router's choice) to give the bound:
expert bytes touched per step / the read bandwidth measured here. The runs compared at
--compare-at take --repeat turns each, in turn, and the best is kept (a shared box's neighbours
fall on all of them alike).

--http: `expertlora serve` started on 127.0.0.1 and a free port with the same engine options (a
subprocess; ready on GET /health; SIGINT at the end), the same requests sent with httpx as
streamed POST /v1/completions (prompt as token ids, max_tokens, ignore_eos, return_token_ids);
the HTTP layer's cost is 1 - HTTP / in-process tokens/s at --compare-at. --rss: RSS (psutil) of
this process, and with --http of the server, after request 100 and 1,000 of 1,000 short requests.
Memory: the engine's KV cache budget is exactly max(levels) sequences of the longest request;
its peak use is sampled from engine.stats() during every run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from e2e import ALPHA, RANK, config as qwen3_config  # this folder is on sys.path when a benchmark runs as a script
from moe_layer import bandwidth, cpu_name, emit

NUM_ADAPTERS = 5
MIX = (None, "lora1", "lora2", "lora3", "lora4")  # the workload's mix: no adapter + 4 adapters
JSON_LINES: list[str] = []  # --json: the file each row is appended to
SMALL = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=512, num_experts=32, num_experts_per_tok=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@dataclass(frozen=True)
class Req:
    prompt: list[int]
    max_tokens: int
    adapter: str | None


@dataclass
class Trace:
    sent: float
    times: list[float] = field(default_factory=list)  # arrival of each output token
    error: str | None = None


def workload(n: int, vocab: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], seed: int, mix=MIX) -> list[Req]:
    """n seeded requests: prompt lengths log-uniform in prompt_lens, outputs uniform in output_lens."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(prompt_lens[0]), math.log(prompt_lens[1] + 1)
    out = []
    for _ in range(n):
        length = min(prompt_lens[1], int(math.exp(lo + (hi - lo) * torch.rand((), generator=g).item())))
        prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
        tokens = int(torch.randint(output_lens[0], output_lens[1] + 1, (), generator=g))
        out.append(Req(prompt, tokens, mix[int(torch.randint(0, len(mix), (), generator=g))]))
    return out


def with_adapters(reqs: list[Req], adapters) -> list[Req]:
    """The same requests, request i on adapters[i % len(adapters)]."""
    return [Req(r.prompt, r.max_tokens, adapters[i % len(adapters)]) for i, r in enumerate(reqs)]


def poisson(n: int, rate: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(rate, generator=g)
    return (torch.cumsum(gaps, 0) - gaps[0]).tolist()  # the first request at 0


# -- the client --------------------------------------------------------------------------------


async def drive(send, reqs: list[Req], concurrency: int | None = None, arrivals: list[float] | None = None,
                on_done=None) -> tuple[list[Trace], float]:
    """Send every request through ``send`` (an async generator of new-token counts): a closed
    loop of ``concurrency`` clients, or each at its ``arrivals`` offset. Returns (traces, start)."""
    traces: list[Trace | None] = [None] * len(reqs)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        trace = traces[i] = Trace(time.perf_counter())
        try:
            async for n in send(reqs[i]):
                trace.times += [time.perf_counter()] * n
            if len(trace.times) != reqs[i].max_tokens:
                trace.error = f"{len(trace.times)} tokens, asked for {reqs[i].max_tokens}"
        except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
            trace.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if on_done is not None:
            on_done(i)

    if arrivals is None:
        order = iter(range(len(reqs)))

        async def client():
            for i in order:  # one shared iterator: each client takes the next request
                await one(i)

        await asyncio.gather(*(client() for _ in range(min(concurrency, len(reqs)))))
    else:
        async def at(i: int, offset: float):
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            await one(i)

        await asyncio.gather(*(at(i, o) for i, o in enumerate(arrivals)))
    return traces, t0


def engine_sender(engine):
    from expertlora.runtime import SamplingParams

    async def send(r: Req):
        handle = engine.add_request(r.prompt, r.adapter, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
        async for out in handle.stream():
            yield len(out.new_token_ids)
            if out.finished and out.finish_reason != "length":
                raise RuntimeError(f"finish reason {out.finish_reason}: {out.error}")

    return send


def http_sender(client, base_name: str):
    """POST /v1/completions, streamed: prompt as token ids, ignore_eos, token ids returned."""

    async def send(r: Req):
        body = {"model": r.adapter or base_name, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
        counted, usage = 0, None
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    ids = choice.get("token_ids")
                    # without token ids (a server that does not return them): one token a chunk
                    n = len(ids) if ids is not None else int(bool(choice.get("text")) or choice.get("finish_reason") is None)
                    counted += n
                    if n:
                        yield n
        if usage is not None and usage.get("completion_tokens") != counted:
            raise RuntimeError(f"counted {counted} tokens, usage says {usage.get('completion_tokens')}")

    return send


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear between ranks); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    x = (len(s) - 1) * q / 100
    lo = math.floor(x)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (x - lo)


def summarize(run: str, concurrency, traces: list[Trace], t0: float, latency: bool = True, **extra) -> dict:
    """One row: output tokens/s over the run, TTFT and ITL percentiles (ms) where ``latency``."""
    done = [t for t in traces if t.times]
    tokens = sum(len(t.times) for t in traces)
    end = max((t.times[-1] for t in done), default=t0)
    ttft = [t.times[0] - t.sent for t in done] if latency else []
    itl = [b - a for t in done for a, b in zip(t.times, t.times[1:])] if latency else []
    errors = [t.error for t in traces if t.error]
    row = dict(run=run, concurrency=concurrency, requests=len(traces), tokens=tokens, seconds=end - t0,
               tok_s=tokens / (end - t0) if end > t0 else 0.0, req_s=len(done) / (end - t0) if end > t0 else 0.0,
               ttft_p50=1e3 * pct(ttft, 50), ttft_p99=1e3 * pct(ttft, 99), itl_p50=1e3 * pct(itl, 50),
               itl_p99=1e3 * pct(itl, 99), errors=len(errors), first_error=errors[0] if errors else None, **extra)
    print(_brief(row), flush=True)
    if JSON_LINES:  # each row as it comes: a run cut short by a time limit keeps what it measured
        with open(JSON_LINES[0], "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    return row


def _brief(row: dict) -> str:
    s = f"{row['run']:<44} c={row['concurrency']!s:<5} n={row['requests']:<4} {row['tok_s']:9.1f} tok/s"
    if not math.isnan(row["ttft_p50"]):
        s += f"  TTFT {row['ttft_p50']:8.1f} / {row['ttft_p99']:8.1f} ms  ITL {row['itl_p50']:7.2f} / {row['itl_p99']:7.2f} ms"
    return s + (f"  ERRORS {row['errors']}: {row['first_error']}" if row["errors"] else "")


# -- the engine in process ---------------------------------------------------------------------


class ExpertCounter:
    """Every call of the CPU engine (``MoELoRAEngine.forward``: a HybridMoE's CPU side, or the
    engine itself), from whichever thread makes it (an eager step, or a replayed CUDA graph's
    worker): ``calls`` holds (start, end, tokens, distinct experts of its routing)."""

    def __init__(self, lm):
        moe = lm.engine
        self.cpu = getattr(moe, "cpu", moe)
        self.calls: list[tuple[float, float, int, int]] = []
        self.layers = list(self.cpu.layers)
        self.expert_bytes = next(iter(self.cpu.layers.values())).expert_nbytes()
        inner = self.cpu.forward

        def counted(layer, x, ids, weights, slots=None):
            t0 = time.perf_counter()
            y = inner(layer, x, ids, weights, slots)
            distinct = int(ids[(ids >= 0) & (ids < self.cpu.slots.shape[0])].unique().numel())
            self.calls.append((t0, time.perf_counter(), ids.shape[0], distinct))
            return y

        self.cpu.forward = counted

    def per_step(self, start: float, end: float) -> tuple[float, float, float]:
        """(CPU engine ms per step, distinct experts per layer call, expert MB per step) over the
        calls that began in [start, end]."""
        inside = [c for c in self.calls if start <= c[0] <= end]
        if not inside:
            return float("nan"), float("nan"), float("nan")
        steps = len(inside) / len(self.layers)
        distinct = sum(c[3] for c in inside) / len(inside)
        return 1e3 * sum(b - a for a, b, *_ in inside) / steps, distinct, distinct * len(self.layers) * self.expert_bytes / 1e6


def run_engine(engine, run: str, reqs: list[Req], concurrency=None, arrivals=None, counter: ExpertCounter | None = None,
               label_c=None) -> dict:
    """One level through the engine, with the engine's peaks (running requests, KV slots) sampled."""
    peaks = dict(running=0, kv_slots_used=0)
    steps0 = engine.stats().steps
    if counter is not None:
        counter.calls.clear()

    async def main():
        async def watch():
            while True:
                s = engine.stats()
                peaks["running"] = max(peaks["running"], s.running)
                peaks["kv_slots_used"] = max(peaks["kv_slots_used"], s.kv_slots_used)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            return await drive(engine_sender(engine), reqs, concurrency, arrivals)
        finally:
            watcher.cancel()

    traces, t0 = asyncio.run(main())
    steps = engine.stats().steps - steps0
    row = summarize(run, label_c if label_c is not None else concurrency, traces, t0, steps=steps,
                    peak_running=peaks["running"], peak_kv_slots=peaks["kv_slots_used"])
    row["step_ms"] = 1e3 * row["seconds"] / steps if steps else float("nan")
    if counter is not None:
        row["routing"] = _routing(counter, concurrency or len(reqs))
    return row


def _routing(counter: ExpertCounter, c: int) -> dict:
    calls = [(tokens, distinct, end - start) for start, end, tokens, distinct in counter.calls]
    decode = [call for call in calls if call[0] <= c]  # a step of decodes alone has at most c tokens
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return dict(calls=len(calls), decode_calls=len(decode), decode_tokens=mean([t for t, _, _ in decode]),
                decode_distinct=mean([d for _, d, _ in decode]), decode_call_s=mean([s for *_, s in decode]),
                expert_bytes=counter.expert_bytes, layers=len(counter.layers),
                bytes_total=sum(d for _, d, _ in calls) * counter.expert_bytes, moe_s=sum(s for *_, s in calls))


def warm_workload(args, vocab: int) -> list[Req]:
    """Batch sizes from the largest level down, a longest prompt, every adapter (allocators,
    kernels compiled per shape)."""
    reqs = workload(max(args.levels), vocab, (8, 64), (2, 12), seed=99, mix=(None, *[f"lora{i}" for i in range(1, NUM_ADAPTERS + 1)]))
    reqs[0] = Req(workload(1, vocab, (args.prompt_lens[1], args.prompt_lens[1]), (2, 2), seed=98)[0].prompt, 2, None)
    return reqs


def warm_up(engine, args, vocab: int) -> None:
    asyncio.run(drive(engine_sender(engine), warm_workload(args, vocab), concurrency=max(args.levels)))


async def rss_drive(send, args, vocab: int, pids: list[int], engine=None, label: str = "") -> dict:
    """--rss: --rss-requests short requests, closed loop; the RSS of ``pids`` (and CUDA memory
    in this process) after every tenth of them (request 100, 200, ... of 1,000)."""
    import psutil

    n = args.rss_requests
    reqs = workload(n, vocab, (8, 64), (4, 16), seed=7)
    marks, done = {max(1, n * i // 10): None for i in range(1, 11)}, [0]
    procs = [psutil.Process(pid) for pid in pids]

    def on_done(_i):
        done[0] += 1
        if done[0] in marks:
            gc.collect()
            marks[done[0]] = dict(rss_mib=[p.memory_info().rss / 2**20 for p in procs],
                                  cuda_mib=torch.cuda.memory_allocated() / 2**20 if engine and torch.cuda.is_available() else None)

    c = min(args.compare_at, max(args.levels))
    traces, t0 = await drive(send, reqs, concurrency=c, on_done=on_done)
    row = summarize(f"{label}RSS: short requests (prompt 8-64, output 4-16)", c, traces, t0)
    row["marks"] = marks
    return row


def engine_config(model_dir: Path, paths: dict, args, budget: int):
    from expertlora.runtime import EngineConfig

    return EngineConfig(
        model_dir, method=args.method, adapters=paths, device=args.device,
        gpu_experts_ratio=args.gpu_experts_ratio if args.device != "cpu" else None, threads=args.threads,
        max_num_seqs=max(args.levels), max_model_len=args.prompt_lens[1] + args.output_lens[1],
        max_prefill_tokens=args.max_prefill_tokens, kv_cache_memory=budget,
        max_queued_requests=max(1024, args.rss_requests),
    )


# -- peers -------------------------------------------------------------------------------------


def one_at_a_time(model_dir: Path, paths: dict, reqs: list[Req], args) -> dict:
    """`expertlora run`'s path: run.load_setup, then run.generate for each request in turn."""
    from expertlora.run import ModelOptions, Sampling, generate, load_setup

    cuda = args.device != "cpu"
    options = ModelOptions(model_dir, tuple(f"{n}={p}" for n, p in paths.items()), args.method, threads=args.threads,
                           device=args.device, gpu_ratio=args.gpu_experts_ratio if cuda else None)
    setup = load_setup(options, None, None, "1", progress=False)
    lm = setup.model
    generate(lm, reqs[0].prompt[:32], reqs[0].adapter, Sampling(max_new_tokens=4, ignore_eos=True))  # warm-up
    traces, t0 = [], time.perf_counter()
    for r in reqs:
        trace = Trace(time.perf_counter())
        g = generate(lm, r.prompt, r.adapter, Sampling(max_new_tokens=r.max_tokens, ignore_eos=True))
        trace.times = [time.perf_counter()] * len(g.token_ids)  # the whole output at once: no TTFT / ITL
        traces.append(trace)
    row = summarize("one at a time: run's path (run.generate)", 1, traces, t0, latency=False)
    del setup, lm
    _free()
    return row


def transformers_cb(model_dir: Path, reqs: list[Req], concurrency: int, args) -> dict:
    """transformers' continuous batching on the plain model, no LoRA: a closed loop of
    ``concurrency`` requests in flight (one added as one finishes), per-token timestamps; stopped
    after --cb-limit-s (then the requests finished by then count)."""
    import importlib.util
    import inspect

    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(args.device).eval()
    gen = GenerationConfig(do_sample=False, max_new_tokens=args.output_lens[1], eos_token_id=-1, pad_token_id=0)
    page, max_len = 256, args.prompt_lens[1] + args.output_lens[1]
    # as our engine: at most `concurrency` sequences, prompt chunks within the prefill budget, no prefix sharing
    wanted = dict(max_requests_per_batch=concurrency, allow_block_sharing=False, max_batch_tokens=args.max_prefill_tokens + concurrency,
                  num_blocks=concurrency * math.ceil(max_len / page) + 8, page_size=page,
                  # flash attention where it is installed; never fetched from the Hub (the device has no network)
                  auto_switch_to_flash=importlib.util.find_spec("flash_attn") is not None)
    kwargs = {}
    try:
        from transformers import ContinuousBatchingConfig

        if "continuous_batching_config" not in inspect.signature(model.init_continuous_batching).parameters:
            raise ImportError
        fields = set(inspect.signature(ContinuousBatchingConfig).parameters)
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if k in fields})
    except ImportError:  # earlier transformers 5 read these from the generation config
        for k, v in wanted.items():
            setattr(gen, "block_size" if k == "page_size" else k, v)
    manager = model.init_continuous_batching(generation_config=gen, **kwargs)
    if hasattr(manager, "warmup"):
        manager.warmup()
    manager.start()
    stamps = "record_timestamps" in inspect.signature(manager.add_request).parameters
    sent, results = {}, {}
    next_i, t0 = 0, time.perf_counter()

    def submit(i):
        sent[f"r{i}"] = time.perf_counter()
        manager.add_request(reqs[i].prompt, request_id=f"r{i}", max_new_tokens=reqs[i].max_tokens, eos_token_id=-1,
                            **(dict(record_timestamps=True) if stamps else {}))

    try:
        while next_i < min(concurrency, len(reqs)):
            submit(next_i)
            next_i += 1
        while len(results) < len(reqs) and time.perf_counter() - t0 < args.cb_limit_s:
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped")
                continue
            if out.is_finished():
                results[out.request_id] = (out, time.perf_counter())
                if next_i < len(reqs):
                    submit(next_i)
                    next_i += 1
    finally:
        manager.stop(block=True, timeout=10)
    traces = []
    for i, r in enumerate(reqs):
        if f"r{i}" not in results:
            continue
        out, got = results[f"r{i}"]
        trace = Trace(sent[f"r{i}"])
        n = len(out.generated_tokens)
        trace.times = list(out.timestamps)[:n] if stamps and out.timestamps else [got] * n
        if out.error or n != r.max_tokens:
            trace.error = out.error or f"{n} tokens, asked for {r.max_tokens}"
        traces.append(trace)
    cut = f" (stopped at {args.cb_limit_s:.0f} s: {len(traces)} of {len(reqs)} requests)" if len(traces) < len(reqs) else ""
    row = summarize(f"transformers continuous batching, no LoRA{cut}", concurrency, traces, t0, latency=stamps,
                    attention=model.config._attn_implementation)
    manager = model = None  # the model's memory back before the next part
    _free()
    return row


class Server:
    """`expertlora serve` on 127.0.0.1 and a free port, as a subprocess, with the in-process
    engine's options (those its --help lists); SIGINT on exit."""

    def __init__(self, model_dir: Path, paths: dict, args, budget: int, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = "base"
        prefix = [sys.executable, "-c", "from expertlora.cli import main; main()", "serve"]
        help_text = subprocess.run([*prefix, "--help"], capture_output=True, text=True, timeout=120,
                                   env=os.environ | {"COLUMNS": "400"}).stdout  # wide: rich cuts long option names
        listed = lambda flag: re.search(rf"(?<![\w-]){flag}(?![\w-])", help_text) is not None  # noqa: E731
        cmd = [*prefix, "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        for name, path in paths.items():
            cmd += ["--adapter", f"{name}={path}"]
        options = [("--served-model-name", "base"), ("--method", args.method), ("--device", args.device),
                   ("--max-num-seqs", max(args.levels)), ("--max-model-len", args.prompt_lens[1] + args.output_lens[1]),
                   ("--max-prefill-tokens", args.max_prefill_tokens), ("--kv-cache-memory", budget),
                   ("--max-queued-requests", max(1024, args.rss_requests)),
                   ("--gpu-experts-ratio", args.gpu_experts_ratio if args.device != "cpu" else None), ("--threads", args.threads)]
        self.dropped = [flag for flag, value in options if value is not None and not listed(flag)]
        cmd += [str(x) for flag, value in options if value is not None and listed(flag) for x in (flag, value)]
        cmd += ["--no-progress"] if listed("--no-progress") else []
        self.cmd, self.log, self.proc, self.threads = cmd, log, None, args.threads

    def __enter__(self):
        import httpx

        env = os.environ | ({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})  # torch's threads, as in process
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"expertlora serve exited with {self.proc.returncode}: {_tail(self.log)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    models = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
                    self.base = next((m["id"] for m in models if not m.get("parent")), self.base)
                    return self
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"expertlora serve not healthy after 900 s: {_tail(self.log)}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: it stops admitting and exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _tail(log: Path) -> str:
    try:
        return " | ".join(log.read_text().strip().splitlines()[-3:])
    except OSError:
        return ""


def run_http(server: Server, args, fn):
    """fn(send) (a coroutine) with an httpx client for ``server``, in a fresh event loop."""
    import httpx

    async def main():
        n = max(args.levels) + 8
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(None), limits=limits) as client:
            return await fn(http_sender(client, server.base))

    return asyncio.run(main())


def http_level(server: Server, args, run: str, reqs: list[Req], concurrency=None, arrivals=None, label_c=None) -> dict:
    traces, t0 = run_http(server, args, lambda send: drive(send, reqs, concurrency, arrivals))
    return summarize(f"HTTP: {run}", label_c if label_c is not None else concurrency, traces, t0)


# -- set-up ------------------------------------------------------------------------------------


def model_config(args):
    cfg = qwen3_config(args.vocab, args.layers)
    if args.model == "small":
        for k, v in SMALL.items():
            setattr(cfg, k, v)
    return cfg


def checkpoint(work: Path, args) -> tuple[Path, dict[str, Path]]:
    """The random checkpoint and the five adapters in ``work``, made once (a stamp names the
    settings they were made with)."""
    spec = dict(model=args.model, layers=args.layers, vocab=args.vocab, adapters=NUM_ADAPTERS, rank=RANK, alpha=ALPHA, version=1)
    model_dir, root = work / "model", work / "adapters"
    names = [f"lora{i}" for i in range(1, NUM_ADAPTERS + 1)]
    paths = {n: root / n for n in names}
    stamp = work / "serving-bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return model_dir, paths
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    print(f"making the random checkpoint and {NUM_ADAPTERS} adapters in {work}", flush=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(model_dir)
    targets = [f"model.layers.{L}.mlp.experts.{p}" for L in range(args.layers) for p in ("gate_up_proj", "down_proj")]
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "o_proj"], target_parameters=targets)
    peft_model = get_peft_model(model, lora, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(root)  # a folder per adapter (not "default")
    missing = [p for p in paths.values() if not (p / "adapter_config.json").is_file()]
    if missing:
        raise RuntimeError(f"PEFT did not write {missing}")
    stamp.write_text(json.dumps(spec))
    del model, peft_model
    gc.collect()
    return model_dir, paths


def kv_budget(args) -> int:
    """Exactly max(levels) sequences of the longest request, in the model's dtype."""
    cfg = model_config(args)
    per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * (4 if args.method == "fp32" else 2)
    return per_token * (args.prompt_lens[1] + args.output_lens[1]) * max(args.levels)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split("-"))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO-HI with 1 <= LO <= HI")
    return lo, hi


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


PARTS = ("levels", "adapters", "nolora", "arrivals", "alone", "cb")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("qwen3-30b-a3b", "small"), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--method", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu-experts-ratio", type=float, default=1.0, help="with --device cuda: 1, 0.5, 0 ... of each layer's experts on the GPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engine's own default; torch gets all cores)")
    p.add_argument("--levels", type=_ints, default=[1, 8, 32, 128], help="concurrency levels")
    p.add_argument("--compare-at", type=int, default=32, help="the level of the ratios and the adapter / no-LoRA runs")
    p.add_argument("--rounds", type=int, default=2, help="requests per level: max(--min-requests, rounds x level)")
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--prompt-lens", type=_pair, default=(32, 1024))
    p.add_argument("--output-lens", type=_pair, default=(64, 256))
    p.add_argument("--max-prefill-tokens", type=int, default=1024)
    p.add_argument("--arrival-requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: 0.8x the rate at --compare-at)")
    p.add_argument("--alone-requests", type=int, default=4, help="requests for the one-at-a-time peer")
    p.add_argument("--cb-limit-s", type=float, default=180.0, help="stop transformers' continuous batching after this")
    p.add_argument("--parts", default=",".join(PARTS), help=f"any of {', '.join(PARTS)} (the level at --compare-at always runs)")
    p.add_argument("--http", action="store_true", help="also through a live `expertlora serve` on 127.0.0.1")
    p.add_argument("--rss", action="store_true", help="RSS across --rss-requests short requests")
    p.add_argument("--rss-requests", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=1, help="the runs compared at --compare-at: this many tries each, in turn; the best kept")
    p.add_argument("--budget-s", type=float, default=None, help="skip the parts not started after this many seconds")
    p.add_argument("--quick", action="store_true", help="small everything: levels 1,4,16, prompts 32-256, outputs 16-64")
    p.add_argument("--cache-mb", type=int, default=64, help="the L3 size, for the read-bandwidth buffer (8x this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the checkpoint and adapters here (reused when they match)")
    p.add_argument("--out", default=None, help="append the markdown to this file")
    p.add_argument("--json", default=None, help="append every row to this file as a JSON line, as it is measured")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in p._actions}
        for k, v in dict(levels=[1, 4, 16], compare_at=16, rounds=1, prompt_lens=(32, 256), output_lens=(16, 64),
                         arrival_requests=8, alone_requests=2, rss_requests=200, max_prefill_tokens=256).items():
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
    args.parts = [x for x in args.parts.split(",") if x]
    if bad := set(args.parts) - set(PARTS):
        p.error(f"--parts: unknown {', '.join(sorted(bad))}")
    args.levels = sorted({*args.levels, args.compare_at})
    if args.prompt_lens[1] + args.output_lens[1] > 32768:
        p.error("--prompt-lens + --output-lens: longer than the model's context (32768)")
    return args


# -- main --------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:  # torch's threads too (the server gets OMP_NUM_THREADS): the same for every path measured
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.json:
        JSON_LINES.append(args.json)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's SIGTERM still stops the server we started
    from expertlora.runtime import Engine

    cuda = args.device != "cpu"
    cpu_experts = not cuda or args.gpu_experts_ratio == 0
    t_start = time.perf_counter()
    over = lambda: args.budget_s is not None and time.perf_counter() - t_start > args.budget_s  # noqa: E731
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="expertlora-serving-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, paths = checkpoint(work, args)
    vocab, budget, C = args.vocab, kv_budget(args), args.compare_at
    count = lambda c: max(args.rounds * c, args.min_requests)  # noqa: E731
    reqs = workload(max(map(count, args.levels)), vocab, args.prompt_lens, args.output_lens, args.seed)
    all_levels = {c: reqs[: count(c)] for c in args.levels}  # HTTP runs every level
    levels = {c: lr for c, lr in all_levels.items() if "levels" in args.parts or c == C}
    arrival_reqs = workload(args.arrival_requests, vocab, args.prompt_lens, args.output_lens, args.seed + 1)
    rows, notes, skipped, arrivals = [], {}, [], None
    read_gbs = bandwidth(args.cache_mb)[0] if cpu_experts else None
    if read_gbs:
        print(f"read bandwidth here: {read_gbs:.1f} GB/s", flush=True)

    def part(name: str) -> bool:
        if name not in args.parts:
            return False
        if over():
            skipped.append(name)
            return False
        return True

    t_load = time.perf_counter()
    engine = Engine(engine_config(model_dir, paths, args, budget))
    notes["load_s"] = time.perf_counter() - t_load
    stats = engine.stats()
    notes["kv"] = dict(budget=budget, allocated=stats.kv_cache_bytes, slots=stats.kv_slots)
    counter = ExpertCounter(engine.lm) if cpu_experts else None
    server = None
    with contextlib.ExitStack() as stack:
        stack.callback(engine.close)
        if args.http:  # up beside the engine: in-process and HTTP runs then take turns, under the same drift
            try:
                server = Server(model_dir, paths, args, budget, work / "serve.log")
                notes["http_dropped"] = server.dropped
                stack.enter_context(server)
            except Exception as e:  # noqa: BLE001 - reported; the in-process runs still come
                notes["http_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"HTTP runs failed: {notes['http_error']}", flush=True)
                server = None
        warm_up(engine, args, vocab)
        if server is not None:
            http_level(server, args, "warm-up", warm_workload(args, vocab), max(args.levels))
        mixed = "no adapter + 4 adapters mixed"
        # the runs compared at C first, --repeat turns each, in turn (drift and neighbours fall on all alike); the best kept
        compared = [(f"engine: {mixed}", lambda: run_engine(engine, f"engine: {mixed}", levels[C], C, counter=counter))]
        for name, label, mix in (("nolora", "engine: no adapter (no LoRA)", (None,)), ("adapters", "engine: one adapter", ("lora1",)),
                                 ("adapters", "engine: five adapters mixed", tuple(f"lora{i}" for i in range(1, NUM_ADAPTERS + 1)))):
            if part(name):
                compared.append((label, lambda label=label, mix=mix: run_engine(engine, label, with_adapters(levels[C], mix), C, counter=counter)))
        if server is not None:
            compared.append(("http", lambda: http_level(server, args, mixed, all_levels[C], C)))
        tries = {label: [] for label, _ in compared}
        for _ in range(args.repeat):
            for label, fn in compared:
                tries[label].append(fn())
        rows += [best_of(t) for t in tries.values()]
        # the peers next, while the engine waits idle: the ratios first, should the budget run out
        if part("alone"):
            rows.append(one_at_a_time(model_dir, paths, reqs[: args.alone_requests], args))
        if part("cb"):
            try:
                rows.append(transformers_cb(model_dir, with_adapters(levels[C], (None,)), C, args))
            except Exception as e:  # noqa: BLE001 - a peer's failure is reported, the table still comes
                notes["cb_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"transformers continuous batching failed: {notes['cb_error']}", flush=True)
        for c, lr in levels.items():
            if c != C:
                if over():
                    skipped.append(f"level {c}")
                else:
                    rows.append(run_engine(engine, f"engine: {mixed}", lr, c, counter=counter))
        for c, lr in all_levels.items():
            if server is not None and c != C:
                if over():
                    skipped.append(f"HTTP level {c}")
                else:
                    rows.append(http_level(server, args, mixed, lr, c))
        if part("arrivals"):
            args.rate_used = args.rate or 0.8 * _find(rows, f"engine: {mixed}", C)["req_s"]
            arrivals = poisson(len(arrival_reqs), args.rate_used, args.seed + 2)
            for label, kw in ((f"Poisson arrivals, {args.rate_used:.2f} req/s", dict(arrivals=arrivals, label_c="open")),
                              ("burst (all at once)", dict(arrivals=[0.0] * len(arrival_reqs), label_c="burst"))):
                rows.append(run_engine(engine, f"engine: {label}", arrival_reqs, **kw))
                if server is not None:
                    rows.append(http_level(server, args, label, arrival_reqs, **kw))
        if args.rss and not over():
            rows.append(asyncio.run(rss_drive(engine_sender(engine), args, vocab, [os.getpid()], engine)))
            if server is not None:
                rows.append(run_http(server, args, lambda send: rss_drive(send, args, vocab, [server.proc.pid], label="HTTP: the server's ")))
        elif args.rss:
            skipped.append("rss")
        s = engine.stats()
        notes["kv"].update(peak_used=max(r.get("peak_kv_slots", 0) for r in rows), after_used=s.kv_slots_used, after_running=s.running)
    engine = counter = server = None  # the engine thread and its memory go with the last reference
    _free()
    notes["total_s"], notes["skipped"] = time.perf_counter() - t_start, skipped
    emit(markdown(rows, notes, args, read_gbs, threads), args.out)
    if tmp is not None:
        tmp.cleanup()


def best_of(tries: list[dict]) -> dict:
    """The try with the most tokens/s, with every try's tokens/s beside it."""
    best = dict(max(tries, key=lambda r: r["tok_s"]))
    if len(tries) > 1:
        best["tries_tok_s"] = [r["tok_s"] for r in tries]
    return best


def _find(rows, run_prefix: str, c=None):
    return next((r for r in rows if r["run"].startswith(run_prefix) and (c is None or r["concurrency"] == c)), None)


def markdown(rows: list[dict], notes: dict, args, read_gbs: float | None, threads: int) -> str:
    import transformers

    cuda = args.device != "cpu"
    card = f"{torch.cuda.get_device_name()}, " if cuda else ""
    where = f"{round(100 * args.gpu_experts_ratio)}% of the experts on the GPU" if cuda else "every expert on the CPU"
    shape = "the Qwen3-30B-A3B shape" if args.model != "small" else "a small shape (H 256, I 128, 32 experts, top-4, 4 heads / 2 KV, head 64)"
    lines = [
        f"### {card}{cpu_name()}, {os.cpu_count()} cores, threads {threads}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {date.today()}: {where}",
        "",
        f"`python benchmarks/serving.py {' '.join(sys.argv[1:])}`. {args.layers} layers of {shape}, vocabulary {args.vocab}, "
        f"{args.method} experts, random weights. Prompts {args.prompt_lens[0]}-{args.prompt_lens[1]} tokens (log-uniform), outputs "
        f"{args.output_lens[0]}-{args.output_lens[1]} (uniform, ignore_eos), adapters: none + 4 mixed (five PEFT LoRAs r {RANK} on the "
        f"experts + q_proj / o_proj). Level c: a closed loop of c clients over max({args.min_requests}, {args.rounds} x c) requests. "
        f"--max-prefill-tokens {args.max_prefill_tokens}. Engine loaded in {notes['load_s']:.0f} s; whole run {notes['total_s']:.0f} s"
        + (f"; skipped (over --budget-s): {', '.join(notes['skipped'])}" if notes["skipped"] else "") + ".",
        "",
        "| run | concurrency | requests | output tokens | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | peak running | ms / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pair = lambda a, b: "-" if math.isnan(r[a]) else f"{r[a]:.1f} / {r[b]:.1f}"  # noqa: E731
        err = f" **{r['errors']} errors**: {r['first_error']}" if r["errors"] else ""
        step = f"{r['step_ms']:.1f}" if "step_ms" in r else "-"
        tries = f" (best of {', '.join(f'{t:.1f}' for t in r['tries_tok_s'])})" if "tries_tok_s" in r else ""
        lines.append(f"| {r['run']}{err} | {r['concurrency']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f}{tries} | "
                     f"{pair('ttft_p50', 'ttft_p99')} | {pair('itl_p50', 'itl_p99')} | {r.get('peak_running', '-')} | {step} |")
    lines += ["", *ratios(rows, notes, args), *bound(rows, args, read_gbs)]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict], notes: dict, args) -> list[str]:
    C, cuda, out = args.compare_at, args.device != "cpu", []

    def ratio(label, a, b, goal):
        if a and b and b["tok_s"] > 0:
            bad = " (a run had errors)" if a["errors"] or b["errors"] else ""
            out.append(f"- {label}: {a['tok_s']:.1f} / {b['tok_s']:.1f} = **{a['tok_s'] / b['tok_s']:.2f}x** ({goal}){bad}")

    mixed = _find(rows, "engine: no adapter + 4", C)
    goal = ("goal >= 10x on the GPU" if cuda and args.gpu_experts_ratio == 1 else
            "goal >= 2x with every expert on the CPU" if not cuda or args.gpu_experts_ratio == 0 else "no goal at this placement")
    ratio(f"Engine at {C} concurrent / the first {args.alone_requests} requests one at a time through run's path", mixed,
          _find(rows, "one at a time"), goal)
    ratio(f"Five adapters mixed / one adapter, at {C}", _find(rows, "engine: five"), _find(rows, "engine: one adapter"), "goal >= 0.85x")
    ratio(f"Engine without LoRA / transformers' continuous batching without LoRA, at {C}", _find(rows, "engine: no adapter (no"),
          _find(rows, "transformers continuous"), "goal >= 1x")
    http = _find(rows, "HTTP: no adapter + 4", C)
    if http and mixed:
        out.append(f"- HTTP layer at {C} concurrent: {http['tok_s']:.1f} tokens/s through `expertlora serve` against {mixed['tok_s']:.1f} "
                   f"in process: cost **{100 * (1 - http['tok_s'] / mixed['tok_s']):.1f}%** (goal <= 5%)")
    for key, what in (("cb_error", "transformers' continuous batching failed"), ("http_error", "HTTP runs failed")):
        if key in notes:
            out.append(f"- {what}: `{notes[key]}`")
    if notes.get("http_dropped"):
        out.append(f"- `expertlora serve --help` lists none of {', '.join(notes['http_dropped'])}: the server ran with its defaults there")
    kv = notes["kv"]
    if "peak_used" in kv:
        within = kv["allocated"] <= kv["budget"] and kv["peak_used"] <= kv["slots"] and kv["after_used"] == 0
        out.append(f"- KV cache: budget {kv['budget'] / 2**20:.1f} MiB, allocated {kv['allocated'] / 2**20:.1f} MiB ({kv['slots']} slots); "
                   f"at most {kv['peak_used']} slots in use; after the runs {kv['after_used']} in use, {kv['after_running']} running: "
                   + ("within budget" if within else "**not within budget**"))
    for r in rows:
        marks = sorted((int(k), v) for k, v in r.get("marks", {}).items() if v)
        if len(marks) >= 2:
            (a, ma), (b, mb) = marks[0], marks[-1]
            cuda_txt = f"; CUDA allocated {ma['cuda_mib']:.0f} -> {mb['cuda_mib']:.0f} MiB" if ma.get("cuda_mib") is not None else ""
            series = ", ".join(f"{m['rss_mib'][0]:.0f}" for _, m in marks)
            out.append(f"- {r['run']}: RSS after request {a} {ma['rss_mib'][0]:.0f} MiB, after request {b} {mb['rss_mib'][0]:.0f} MiB "
                       f"({mb['rss_mib'][0] - ma['rss_mib'][0]:+.1f} MiB; after every {a}: {series}){cuda_txt}")
    return out


def bound(rows: list[dict], args, read_gbs: float | None) -> list[str]:
    """Every expert on the CPU: the expert bytes each decode step touches against the read bandwidth."""
    routed = [r for r in rows if "routing" in r and r["run"].startswith("engine: no adapter + 4")]
    if not routed or not read_gbs:
        return []
    cfg = model_config(args)
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    g0 = routed[0]["routing"]
    out = ["", f"Bound with every expert on the CPU: read bandwidth {read_gbs:.1f} GB/s (measured in this run), one expert "
               f"{g0['expert_bytes'] / 2**20:.2f} MiB, {g0['layers']} MoE layers. Distinct experts are counted from the router "
               f"per MoE layer per step; decode steps = steps of at most c tokens.", "",
           "| concurrency | decode steps | tokens / step | distinct experts / layer | expert MB / step | at read bandwidth ms | MoE engine ms / step | step ms (all steps) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in sorted(routed, key=lambda r: r["concurrency"]):
        g = r["routing"]
        if not g["decode_calls"]:  # decode steps replayed as CUDA graphs pass no forward to count: uniform routing's estimate
            T = r["tokens"] / max(1, r["steps"])
            g.update(decode_tokens=T, decode_distinct=E * (1 - (1 - k / E) ** T), decode_call_s=float("nan"), estimated=True)
        mb = g["decode_distinct"] * g["expert_bytes"] * g["layers"] / 1e6
        est = " (estimated: uniform routing, output tokens / steps)" if g.get("estimated") else ""
        moe = "-" if math.isnan(g["decode_call_s"]) else f"{1e3 * g['decode_call_s'] * g['layers']:.2f}"
        out.append(f"| {r['concurrency']} | {g['decode_calls'] // g['layers']} | {g['decode_tokens']:.1f} | {g['decode_distinct']:.1f} of {E}{est} | "
                   f"{mb:.0f} | {mb / read_gbs:.2f} | {moe} | {r['step_ms']:.2f} |")
    one = next((r for r in routed if r["concurrency"] == 1), None)
    at = next((r for r in routed if r["concurrency"] == args.compare_at), None)
    if one and at:
        g1, gc_ = one["routing"], at["routing"]
        b = (gc_["decode_tokens"] / gc_["decode_distinct"]) / (g1["decode_tokens"] / g1["decode_distinct"])
        read = lambda g: g["decode_distinct"] * g["expert_bytes"] * g["layers"] / (read_gbs * 1e9)  # noqa: E731 - seconds a decode step's expert reads take
        out += ["", f"A decode step's expert reads at the read bandwidth: {1e3 * read(g1):.2f} ms at 1 concurrent "
                    f"({100 * read(g1) / (one['step_ms'] / 1e3):.0f}% of its measured step), {1e3 * read(gc_):.2f} ms at {args.compare_at} "
                    f"({100 * read(gc_) / (at['step_ms'] / 1e3):.0f}%). Were decode bound by those reads alone, {gc_['decode_tokens']:.1f} decodes "
                    f"a step would give at most {gc_['decode_tokens']:.1f} x {g1['decode_distinct']:.1f} / {gc_['decode_distinct']:.1f} = "
                    f"**{b:.2f}x** the tokens/s of one; the engine measured {at['tok_s'] / one['tok_s']:.2f}x ({args.compare_at} against 1 "
                    f"concurrent). Uniform routing would touch {E * (1 - (1 - k / E) ** args.compare_at):.1f} of {E} experts at "
                    f"{args.compare_at} tokens."]
    return out


if __name__ == "__main__":
    main()

"""Decode throughput of the serving engine, eager steps against CUDA-graph steps, on the device.

The 4-layer Qwen3-30B-A3B-shaped random model of benchmarks/e2e.py (bf16, LoRA r 16 on experts and
q_proj / o_proj), at 0 / 50 / 100% of each layer's experts on the GPU: N concurrent requests
(same prompt length, ignore_eos), output tokens/s over the decode steps only (the time from the
last request's first token to the end, with every request decoding), graphs off and on. Beside each rate, what bounds it where experts are on the CPU: the CPU
engine's own time per step (its calls timed on whichever thread runs them, eager or inside a
replayed graph; not where the graph's host nodes run the compiled kernel themselves, which calls
no Python: the bound then takes the eager run's experts), the distinct CPU experts a layer reads per step, and the time those bytes take
at this host's measured read bandwidth.

    python scripts/engine_speed.py [--shares 0,50,100] [--concurrency 1,8,32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from e2e import RANK, checkpoint  # noqa: E402
from serving import ExpertCounter  # noqa: E402

from expertlora.host_nodes import Semaphore  # noqa: E402
from expertlora.hybrid_graph import GraphCpuPart  # noqa: E402
from expertlora.runtime import Engine, EngineConfig, SamplingParams  # noqa: E402


READY_WAIT = Semaphore.wait


class StepClock:
    """Where an engine step's time goes, from timestamps taken on the engine thread and on the
    thread that serves a replayed graph's host calls: outside the model (scheduling, the batch's
    inputs, sampling, output text), the model call (an eager forward, or a replay up to its
    synchronize) and, inside a replay, the waits for each layer's inputs (the GPU's work before
    that layer's CPU part: attention, the copies, the host node's latency), the CPU parts (the CPU
    engine and the Python around it) and the rest (launch, the work after the last CPU part)."""

    def __init__(self, engine: Engine):
        self.steps: list[tuple[float, float]] = []
        self.runs: list[tuple[float, float]] = []
        self.waits: list[tuple[float, float]] = []
        self.parts: list[tuple[float, float]] = []
        engine._step = self._timed(engine._step, self.steps)
        engine.runner.run = self._timed(engine.runner.run, self.runs)
        part = engine.runner._part
        if isinstance(part, GraphCpuPart):  # (KernelHostCalls' host nodes run no Python to time)
            part._run = self._timed(part._run, self.parts)
            # only the host-call servers wait on a Semaphore from Python (the stream waits in C)
            Semaphore.wait = lambda sem, timeout_s, _w=self._timed(READY_WAIT, self.waits): _w(sem, timeout_s)

    @staticmethod
    def _timed(fn, into: list):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into.append((t0, time.perf_counter()))

        return timed

    def per_step(self, start: float, end: float) -> tuple[float, ...]:
        """ms per step over the steps that began in [start, end]: (step, outside the model, model,
        inside the model: waits for inputs, CPU parts, rest). The other events count where they
        began inside one of those steps (a step that began before ``start`` keeps its model call)."""
        steps = [(a, b) for a, b in self.steps if start <= a <= end]
        if not steps:
            return (float("nan"),) * 6

        def total(events):
            return 1e3 * sum(b - a for a, b in events if any(s <= a <= e for s, e in steps))

        step, run, waits, parts = (total(e) / len(steps) for e in (self.steps, self.runs, self.waits, self.parts))
        return step, step - run, run, waits, parts, run - waits - parts


def decode_rate(engine: Engine, n: int, prompt_len: int, new_tokens: int, vocab: int,
                clock: ExpertCounter | None = None, steps: StepClock | None = None) -> tuple[float, float, tuple, tuple]:
    """(output tokens/s over the decode window, step ms, the clock's per-step figures, the step
    clock's breakdown)."""
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(n)]
    s = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    # warm: this level's batch buckets captured before the timed run (a capture inside it cost
    # 2-3.5 ms a step at 8 and 32 requests on the H200 host, 16 new tokens)
    engine.generate(prompts, ["lora" if i % 2 else None for i in range(n)], [SamplingParams(max_tokens=4, ignore_eos=True)] * n)
    handles = [engine.add_request(p, "lora" if i % 2 else None, s) for i, p in enumerate(prompts)]
    outs = [h.result(timeout=600) for h in handles]
    start = max(o.first_token_time for o in outs)
    end = max(o.finished_time for o in outs)
    # tokens produced after every request had its first token
    if end <= start:
        return float("nan"), float("nan"), (float("nan"),) * 3, (float("nan"),) * 6
    tokens = sum(len(o.token_ids) - 1 for o in outs)
    per_step = clock.per_step(start, end) if clock else (float("nan"),) * 3
    breakdown = steps.per_step(start, end) if steps else (float("nan"),) * 6
    return tokens / (end - start), 1e3 * (end - start) * n / tokens, per_step, breakdown


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shares", default="0,50,100")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", default=None, help="keep the random checkpoint here, and reuse it when it is there (benchmarks/e2e.py "
                   "shares it; default: a temporary folder)")
    p.add_argument("--polls", default="0,0", help="graph runs: how long the host nodes' waits poll before blocking, "
                   "'ready,done' microseconds (host_nodes.set_spin); several separated by ';'")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (no graphs there)")
    p.add_argument("--cache-mb", type=int, default=300, help="the CPU's L3 in MiB (the read bandwidth buffer is 8x)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from moe_layer import bandwidth  # noqa: E402 - benchmarks/ is on the path

    read_gbs, _ = bandwidth(args.cache_mb)
    print(f"read bandwidth {read_gbs:.1f} GB/s", flush=True)
    polls = [tuple(map(int, poll.split(","))) for poll in args.polls.split(";")]
    shares, levels = [int(s) for s in args.shares.split(",")], [int(n) for n in args.concurrency.split(",")]
    rows = {}  # (share, mode, concurrency) -> (tokens/s, step ms, CPU engine ms/step, CPU experts/layer, MB/step)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="expertlora-engine-")))
        checkpoint(work, args.vocab, args.layers)
        for share in shares:
            for graphs in (False, True):
                cfg = EngineConfig(work / "model", method="bf16", adapters={"lora": work / "adapter"}, device=args.device,
                                   gpu_experts_ratio=share / 100, placement="uniform", max_num_seqs=64, max_model_len=256,
                                   cuda_graphs=graphs)
                t0 = time.perf_counter()
                with Engine(cfg) as engine:
                    load_s = time.perf_counter() - t0
                    clock = ExpertCounter(engine.lm)
                    step_clock = StepClock(engine)
                    replayed = graphs and engine.runner.graphs
                    for poll in polls if replayed else [None]:
                        if poll is not None:
                            from expertlora.host_nodes import set_spin

                            set_spin(*poll)
                        mode = f"graphs, poll {poll[0]} / {poll[1]} us" if poll else "eager"
                        for n in levels:
                            rate, step_ms, per_step, parts = decode_rate(engine, n, args.prompt_tokens, args.new_tokens, args.vocab,
                                                                         clock, step_clock)
                            rows[share, mode, n] = row = (rate, step_ms, *per_step)
                            print(f"share {share}% {mode}, concurrency {n}: {row[0]:.1f} output tokens/s, step {row[1]:.2f} ms, "
                                  f"CPU engine {row[2]:.2f} ms/step, {row[3]:.1f} CPU experts/layer, {row[4]:.0f} MB/step "
                                  f"(load {load_s:.0f} s)", flush=True)
                            print(f"  per step: {parts[0]:.2f} ms = {parts[1]:.2f} outside the model + {parts[2]:.2f} model"
                                  + (f" (waits for a layer's inputs {parts[3]:.2f}, CPU parts {parts[4]:.2f}, rest {parts[5]:.2f})"
                                     if replayed else ""), flush=True)
                torch.cuda.empty_cache()
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU only"
    modes = sorted({m for _, m, _ in rows if m != "eager"})
    print(f"\n### {card}, torch {torch.__version__}: engine decode, {args.layers} layers Qwen3-30B-A3B shape, bf16, "
          f"LoRA r {RANK} (half the requests), prompt {args.prompt_tokens}, {args.new_tokens} new tokens\n")
    print(f"Read bandwidth {read_gbs:.1f} GB/s. Bound: the CPU experts' bytes per step (distinct experts counted from each "
          "call's routing) at that bandwidth, and the tokens/s it allows (concurrency / bound).\n")
    header = ["experts on GPU", "concurrency", "eager tokens/s", *(f"{m} tokens/s (x eager)" for m in modes),
              "step ms eager / graphs", "CPU engine ms/step eager / graphs", "CPU experts/layer", "CPU expert MB/step",
              "bound ms/step", "bound tokens/s", "bound / eager"]
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    nan = (float("nan"),) * 5
    for s in shares:
        for n in levels:
            eager = rows.get((s, "eager", n), nan)
            graph = rows.get((s, modes[0], n), nan) if modes else nan
            figures = graph if graph[4] == graph[4] else eager
            bound_ms = figures[4] / read_gbs  # MB / (GB/s) = ms; nan where no expert is on the CPU
            bound_rate = 1e3 * n / bound_ms
            cells = [f"{s}%", str(n), f"{eager[0]:.1f}",
                     *(f"{rows.get((s, m, n), nan)[0]:.1f} ({rows.get((s, m, n), nan)[0] / eager[0]:.2f})" for m in modes),
                     f"{eager[1]:.2f} / {graph[1]:.2f}", f"{eager[2]:.2f} / {graph[2]:.2f}", f"{figures[3]:.1f}",
                     f"{figures[4]:.0f}", f"{bound_ms:.2f}", f"{bound_rate:.0f}", f"{bound_rate / eager[0]:.2f}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Decode throughput of the serving engine, eager steps against CUDA-graph steps, on the device.

The 4-layer Qwen3-30B-A3B-shaped random model of benchmarks/e2e.py (bf16, LoRA r 16 on experts and
q_proj / o_proj), at 0 / 50 / 100% of each layer's experts on the GPU: N concurrent requests
(same prompt length, ignore_eos), output tokens/s over the decode steps only (the time from the
last request's first token to the end, with every request decoding), graphs off and on.

    python scripts/engine_speed.py [--shares 0,50,100] [--concurrency 1,8,32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from e2e import ALPHA, RANK, config  # noqa: E402

from expertlora.runtime import Engine, EngineConfig, SamplingParams  # noqa: E402


def build(work: Path, vocab: int, layers: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(vocab, layers), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(work / "model")
    targets = [f"model.layers.{L}.mlp.experts.{p}" for L in range(layers) for p in ("gate_up_proj", "down_proj")]
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "o_proj"], target_parameters=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(work / "adapter")


def decode_rate(engine: Engine, n: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(n)]
    s = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engine.generate(prompts[:1], ["lora"], [SamplingParams(max_tokens=4, ignore_eos=True)])  # warm (graph capture)
    handles = [engine.add_request(p, "lora" if i % 2 else None, s) for i, p in enumerate(prompts)]
    outs = [h.result(timeout=600) for h in handles]
    start = max(o.first_token_time for o in outs)
    end = max(o.finished_time for o in outs)
    # tokens produced after every request had its first token
    return sum(len(o.token_ids) - 1 for o in outs) / (end - start) if end > start else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shares", default="0,50,100")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory(prefix="expertlora-engine-") as tmp:
        work = Path(tmp)
        build(work, args.vocab, args.layers)
        for share in map(int, args.shares.split(",")):
            for graphs in (False, True):
                cfg = EngineConfig(work / "model", method="bf16", adapters={"lora": work / "adapter"}, device="cuda",
                                   gpu_experts_ratio=share / 100, placement="uniform", max_num_seqs=64, max_model_len=256,
                                   cuda_graphs=graphs)
                t0 = time.perf_counter()
                with Engine(cfg) as engine:
                    load_s = time.perf_counter() - t0
                    for n in map(int, args.concurrency.split(",")):
                        rate = decode_rate(engine, n, args.prompt_tokens, args.new_tokens, args.vocab)
                        rows.append((share, graphs and engine.runner.graphs, n, rate))
                        print(f"share {share}% graphs {rows[-1][1]} concurrency {n}: {rate:.1f} output tokens/s (load {load_s:.0f} s)", flush=True)
                torch.cuda.empty_cache()
    print(f"\n### {torch.cuda.get_device_name()}, torch {torch.__version__}: engine decode, {args.layers} layers Qwen3-30B-A3B shape, bf16, "
          f"LoRA r {RANK} (half the requests), prompt {args.prompt_tokens}, {args.new_tokens} new tokens\n")
    print("| experts on GPU | concurrency | eager tokens/s | graphs tokens/s | graphs / eager |\n|---|---|---|---|---|")
    table = {(s, g, n): r for s, g, n, r in rows}
    for s in map(int, args.shares.split(",")):
        for n in map(int, args.concurrency.split(",")):
            eager, graph = table.get((s, False, n)), table.get((s, True, n))
            ratio = f"{graph / eager:.2f}" if eager and graph else "-"
            print(f"| {s}% | {n} | {eager or float('nan'):.1f} | {graph or float('nan'):.1f} | {ratio} |")


if __name__ == "__main__":
    main()

"""End to end: prefill and decode tokens/s of a mid-size random MoE model, on the CPU or the GPU.

    python benchmarks/e2e.py                       # 4 layers of the Qwen3-30B-A3B shape, CPU
    python benchmarks/e2e.py --methods bf16 --new-tokens 16
    python benchmarks/e2e.py --device cuda         # GPU: 0 / 25 / 50 / 100% of the experts there

The model: 4 decoder layers of Qwen3-30B-A3B (H 2048, E 128, top-8, I 768, 32 heads, 4 KV heads),
random weights, vocabulary --vocab (default 32000, so the output layer does not hide the MoE).
The adapter: PEFT ``target_parameters`` LoRA r 16 on every MoE layer's experts plus q_proj /
o_proj. Rows, all in one process: transformers 5 base (its default experts forward);
transformers 5 + PEFT; expertlora without and with the adapter, for each method (the non-expert
layers in bf16). Prefill: one forward over --prompt-tokens. Decode: --new-tokens single-token
steps with the KV cache, after the prefill; tokens/s over the steps alone. Each row runs a
warm-up on the whole prompt first (the first long forward takes one-time costs), then reports
the medians of three runs (PEFT's row: one).

With --device cuda, transformers and PEFT run wholly on the GPU, and expertlora (bf16) runs the
non-expert layers there with --gpu-shares percent of each layer's experts (uniform placement),
the rest on the CPU engine. A further row per share decodes with decode.greedy_decode, each step
replayed as one CUDA graph (the CPU experts inside it through host nodes). On the GPU, --methods
picks the CPU experts' methods (default bf16), and --gpu-prefill adds a row per method and share
with GPU prefill on (gpu_prefill.py, the method's default threshold): the prefill against the row
without it is the lever's end-to-end gain.

    python benchmarks/e2e.py --device cuda --gpu-shares 0 --methods bf16,int4 --prompt-tokens 2048 --gpu-prefill
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import traceback
import warnings
from datetime import date
from pathlib import Path

import torch

from expertlora import MoEConfig, load_adapter
from expertlora.decode import graph_ready
from expertlora.gpu_prefill import default_threshold
from expertlora.integration import load_model
from expertlora.placement import gpu_masks
from moe_layer import cpu_name, emit  # this folder is on sys.path when a benchmark runs as a script

RANK, ALPHA = 16, 32.0


def config(vocab: int, layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=vocab,
        norm_topk_prob=True, tie_word_embeddings=False,
    )


def checkpoint(work: Path, vocab: int, layers: int) -> None:
    """The random model (work/model, bf16, every tensor drawn) and its PEFT adapter (work/adapter:
    LoRA r RANK on every MoE layer's experts and q_proj / o_proj, B drawn too), built unless work
    already holds them for this vocabulary and layer count (so several benchmarks share one)."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    made = work / "model" / "config.json"
    if made.is_file() and (work / "adapter" / "adapter_config.json").is_file():
        cfg = json.loads(made.read_text())
        if (cfg.get("vocab_size"), cfg.get("num_hidden_layers")) == (vocab, layers):
            return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(vocab, layers), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(work / "model")
    targets = [f"model.layers.{L}.mlp.experts.{p}" for L in range(layers) for p in ("gate_up_proj", "down_proj")]
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "o_proj"], target_parameters=targets)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(work / "adapter")


def speeds(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 3, **kw) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) with the KV cache, greedy: the medians of ``repeats``
    runs after a warm-up run on the whole prompt (a long prompt takes paths a short one does not:
    GPU prefill's first use stacks the adapters' LoRA on the GPU, the kernel's workspace grows)."""
    _decode(model, prompt, min(new_tokens, 2), **kw)
    runs = [_decode(model, prompt, new_tokens, **kw) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _decode(model, prompt: torch.Tensor, new_tokens: int, **kw) -> tuple[float, float]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **kw)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        int(token[0, 0])  # waits for the GPU, where there is one
        prefill = prompt.shape[1] / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True, **kw)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        int(token[0, 0])
        return prefill, new_tokens / (time.perf_counter() - t0)


def graph_decode_speed(lm, prompt: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s of decode.greedy_decode's replayed steps: two runs differing by
    new_tokens * 4 steps, so the difference holds only replays (the prefill, the eager first step
    and the capture are in both)."""
    from expertlora.decode import greedy_decode

    times = []
    for n in (8, 8 + 4 * new_tokens):
        greedy_decode(lm, prompt, n)  # warm: compiles, allocator
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        greedy_decode(lm, prompt, n)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 4 * new_tokens / (times[1] - times[0])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="default: bf16,int8,int4 on the CPU, bf16 on the GPU")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--peft-new-tokens", type=int, default=3, help="PEFT decodes slowly: fewer steps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (then --gpu-shares)")
    p.add_argument("--gpu-shares", default="0,25,50,100", help="with --device cuda: percent of each layer's experts on the GPU")
    p.add_argument("--workdir", default=None, help="keep the random checkpoint here, and reuse it when it is there (default: a temporary folder)")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip the transformers and PEFT rows")
    p.add_argument("--gpu-prefill", action="store_true", help="with --device cuda: rows with GPU prefill on as well")
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args()
    methods = (args.methods or ("bf16,int8,int4" if args.device == "cpu" else "bf16")).split(",")
    warnings.simplefilter("ignore")
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        work = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="expertlora-e2e-")))
        checkpoint(work, args.vocab, args.layers)
        prompt = torch.randint(0, args.vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
        prompt = prompt.to(args.device)
        where = "" if args.device == "cpu" else f" ({args.device})"
        rows = []
        if args.peers:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16).eval().to(args.device)
            rows.append((f"transformers 5 base{where}", "bf16", *speeds(model, prompt, args.new_tokens)))
            print(rows[-1], flush=True)
            peft_model = PeftModel.from_pretrained(model, work / "adapter").eval()
            peft_steps = args.peft_new_tokens if args.device == "cpu" else args.new_tokens
            rows.append((f"transformers 5 + PEFT{where}", "bf16", *speeds(peft_model, prompt, peft_steps, repeats=1)))
            print(rows[-1], flush=True)
            del model, peft_model
        base = MoEConfig.from_model_dir(work / "model")
        adapter = load_adapter(work / "adapter", base)
        if args.device == "cpu":
            runs = [(method, "", {}) for method in methods]
        else:
            runs = []
            for method in methods:
                for share in map(int, args.gpu_shares.split(",")):
                    masks = gpu_masks(base.num_experts, base.moe_layers, round(share / 100 * base.num_experts), "uniform")
                    runs.append((method, f", {share}% of experts on the GPU", dict(device=args.device, gpu_masks=masks)))
                    if args.gpu_prefill and share < 100:
                        N = default_threshold(method)
                        runs.append((method, f", {share}% of experts on the GPU, GPU prefill from {N} tokens",
                                     dict(device=args.device, gpu_masks=masks, gpu_prefill_threshold=N)))
        for method, label, placement in runs:
            # on the GPU, the default leaves a core to the thread that drives it
            engine_threads = threads if args.device == "cpu" else args.threads
            lm = load_model(work / "model", method, adapters={"lora": adapter}, threads=engine_threads, **placement)
            for name in (None, "lora"):
                lm.use([name])
                rows.append((f"expertlora {'+ adapter' if name else 'no adapter'}{label}", method, *speeds(lm.model, prompt, args.new_tokens)))
                print(rows[-1], flush=True)
                # every GPU share: CPU experts run in the graph via host nodes (GPU prefill does not change decode)
                if args.device != "cpu" and "gpu_prefill_threshold" not in placement and graph_ready(lm):
                    try:
                        rows.append((f"{rows[-1][0]}, decode step as one CUDA graph", method, rows[-1][2],
                                     graph_decode_speed(lm, prompt, args.new_tokens)))
                        print(rows[-1], flush=True)
                    except Exception:  # noqa: BLE001 - reported; the other rows still come
                        traceback.print_exc()
            del lm
            if args.device != "cpu":
                torch.cuda.empty_cache()
    cpu = cpu_name()
    card = f"{torch.cuda.get_device_name()}, " if args.device != "cpu" else ""
    table = [
        f"### {card}{cpu}, {os.cpu_count()} cores, threads {threads}, torch {torch.__version__}, {date.today()}",
        "",
        f"{args.layers} layers of the Qwen3-30B-A3B shape, vocabulary {args.vocab}, prompt {args.prompt_tokens} tokens, "
        f"decode {args.new_tokens} steps ({args.peft_new_tokens} for PEFT), LoRA r {RANK} on experts + q_proj / o_proj.",
        "",
        "| run | experts | prefill tokens/s | decode tokens/s |",
        "|---|---|---|---|",
        *(f"| {run} | {method} | {pre:.1f} | {dec:.2f} |" for run, method, pre, dec in rows),
    ]
    emit("\n".join(table) + "\n", args.out)


if __name__ == "__main__":
    main()

"""Time and peak RSS of `expertlora convert` on a DeepSeek-V2-Lite-sized adapter.

Synthetic PEFT per-expert adapter (transformers 4.x naming): 26 MoE layers (1-26), 64 experts,
H 2048, I 1408, r 16, bf16 — 6 tensors per expert per layer, ~10k tensors, ~530 MiB.
The conversion runs in a fresh process; its peak RSS (ru_maxrss of the child) is compared with
the largest layer's size and with the bare interpreter (python -c "import expertlora.cli").

    python benchmarks/convert.py [--workdir DIR] [--experts 64] [--layers 26]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_adapter(out: Path, layers: int, E: int, H: int, I: int, r: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for L in range(1, layers + 1):
        for name, (d_in, d_out) in (("gate_proj", (H, I)), ("up_proj", (H, I)), ("down_proj", (I, H))):
            for e in range(E):
                prefix = f"base_model.model.model.layers.{L}.mlp.experts.{e}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=g).bfloat16()
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, r, generator=g).bfloat16()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["gate_proj", "up_proj", "down_proj"], "peft_version": "0.15.2"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return E * r * (H + I) * 3 * 2  # bytes of one layer in bf16


def child_peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` alone in a fresh child; return (seconds, its peak RSS in MiB)."""
    # Each measurement goes through its own wrapper process so ru_maxrss is that command's alone.
    wrapper = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True);"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), int(out[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--layers", type=int, default=26)
    p.add_argument("--experts", type=int, default=64)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="expertlora-bench-"))
    H, I, r = 2048, 1408, 16
    t = time.perf_counter()
    layer_bytes = make_adapter(work / "adapter", args.layers, args.experts, H, I, r)
    print(f"made the adapter in {time.perf_counter() - t:.1f} s: {(work / 'adapter' / 'adapter_model.safetensors').stat().st_size / 2**20:.0f} MiB, largest layer {layer_bytes / 2**20:.1f} MiB")
    exe = [sys.executable, "-m", "expertlora.cli"]
    _, interp = child_peak_rss_mib([sys.executable, "-c", "import expertlora.cli, expertlora.convert"])
    rows = []
    for fmt, dtype in (("safetensors", "keep"), ("safetensors", "fp32"), ("pt", "keep")):
        out = work / f"out.{fmt}"
        secs, peak = child_peak_rss_mib([*exe, "convert", str(work / "adapter"), "-o", str(out), "--output-format", fmt, "--dtype", dtype, "--no-progress"])
        rows.append((fmt, dtype, secs, peak))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, torch {torch.__version__}")
    print(f"interpreter + imports peak RSS: {interp:.0f} MiB; largest layer (bf16): {layer_bytes / 2**20:.1f} MiB")
    print("| output | dtype | time (s) | peak RSS (MiB) | RSS over interpreter (MiB) | over / largest layer |")
    print("|---|---|---|---|---|---|")
    for fmt, dtype, secs, peak in rows:
        print(f"| {fmt} | {dtype} | {secs:.1f} | {peak:.0f} | {peak - interp:.0f} | {(peak - interp) / (layer_bytes / 2**20):.2f} |")


if __name__ == "__main__":
    main()

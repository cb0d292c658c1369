"""Peak memory while loading a checkpoint onto the engine, against the size of what is kept.

    python benchmarks/load_memory.py                  # a random 4-layer Qwen3-30B-A3B-shaped model
    python benchmarks/load_memory.py --model DIR

Each method loads in a fresh process; peak RSS is that process's VmHWM (/proc/self/status;
ru_maxrss would carry the parent's peak across fork + exec). "kept" is the
engine's expert storage plus the model's other parameters; "imports" is the same process after
importing torch / transformers / expertlora and before loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, transformers
from expertlora.integration import load_model

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = hwm_mib()
lm = load_model(sys.argv[1], sys.argv[2])
experts = sum(w.nbytes for w in lm.engine.layers.values())
other = sum(p.numel() * p.element_size() for p in lm.model.parameters() if p.device.type != "meta")
print(json.dumps({"imports_mib": base, "peak_mib": hwm_mib(), "experts_mib": experts / 2**20, "other_mib": other / 2**20}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--methods", default="bf16,int8,int4")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="expertlora-load-") as tmp:
        model = args.model or _random_checkpoint(Path(tmp) / "model")
        size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2**20
        print(f"checkpoint {model}: {size:.0f} MiB of safetensors")
        print("| method | imports MiB | peak MiB | kept: experts + other MiB | peak - imports - kept MiB |")
        print("|---|---|---|---|---|")
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, "-c", CHILD, str(model), method], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            kept = r["experts_mib"] + r["other_mib"]
            print(f"| {method} | {r['imports_mib']:.0f} | {r['peak_mib']:.0f} | {r['experts_mib']:.0f} + {r['other_mib']:.0f} | "
                  f"{r['peak_mib'] - r['imports_mib'] - kept:.0f} |")


def _random_checkpoint(out: Path) -> Path:
    """Written by a child process, so this one stays small."""
    code = (
        "import sys, torch, warnings; warnings.simplefilter('ignore'); sys.path.insert(0, sys.argv[2]);"
        "from e2e import config; from transformers import AutoModelForCausalLM; torch.manual_seed(0);"
        "AutoModelForCausalLM.from_config(config(32000, 4), dtype=torch.bfloat16).save_pretrained(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(out), str(Path(__file__).parent)], check=True, capture_output=True)
    return out


if __name__ == "__main__":
    main()

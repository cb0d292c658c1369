"""Where greedy_decode fails on a GPU, one family and mode per process (a CUDA fault poisons the
process that hits it): each tiny family, bf16, every expert on the GPU, decoded eagerly with
StaticCache and then with the replayed graph, with CUDA_LAUNCH_BLOCKING=1 so that a fault names
its kernel. The graph is also tried with one SDPA backend at a time (math, efficient, flash), with
transformers' eager attention, and with the fused Triton experts off, to locate a fault.

    python scripts/decode_check.py [FAMILY ...]        (default: every family; needs CUDA)
    MODES=eager,graph,graph-math python scripts/decode_check.py deepseek_v3
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

from expertlora import MoEConfig, tiny


def check(family: str, mode: str, workdir: str) -> None:
    from expertlora.decode import greedy_decode
    from expertlora.integration import load_model

    model = tiny.save_checkpoint(tiny.tiny_model(family, seed=0), os.path.join(workdir, family))
    base = MoEConfig.from_model_dir(model)
    everything = {L: torch.ones(base.num_experts, dtype=torch.bool) for L in base.moe_layers}
    lm = load_model(model, "bf16", device="cuda", gpu_masks=everything, threads=2)
    ids = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(11)).cuda()
    if mode == "eager":
        tokens = greedy_decode(lm, ids, 6, graph=False)
    else:
        import expertlora.decode as decode
        from torch.nn.attention import SDPBackend, sdpa_kernel

        decode.GRAPH_FAMILIES = (family,)  # the check, not the product's list
        variant = mode.removeprefix("graph").removeprefix("-")
        backends = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
        if variant == "eagerattn":
            lm.model.set_attn_implementation("eager")
        if variant == "unfused":
            lm.engine.gpu.fused = False
        if variant in backends:  # greedy_decode's own backend choice, narrowed to one
            decode._attention_backends = lambda device, math: sdpa_kernel([backends[variant]])
        tokens = greedy_decode(lm, ids, 6)
    torch.cuda.synchronize()
    print(f"{family} {mode}: ok {tokens[0].tolist()}", flush=True)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        check(sys.argv[2], sys.argv[3], tempfile.mkdtemp(prefix="expertlora-decode-"))
        return
    families = sys.argv[1:] or list(tiny.FAMILIES)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for family in families:
        for mode in os.environ.get("MODES", "eager,graph").split(","):
            done = subprocess.run([sys.executable, __file__, "--one", family, mode], env=env, capture_output=True, text=True)
            if done.returncode:
                print(f"{family} {mode}: FAILED\n" + "\n".join((done.stdout + done.stderr).splitlines()[-25:]), flush=True)
            else:
                print(done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()

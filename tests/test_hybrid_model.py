"""Whole tiny models with experts split between the GPU and the CPU, for every family and
placement, with two adapters and no adapter mixed in one batch. Needs a CUDA GPU
(scripts/device_check.sh).

fp32: the hybrid model's logits equal the all-CPU model's within 1e-4 relative. bf16: each MoE
layer's output inside the hybrid model equals the all-CPU engine's on the same inputs within
2e-2. Whole-model bf16 logits are not compared: the non-expert layers round differently on the
GPU and the CPU, and in tiny random models that flips near-tied routing choices.
"""

from __future__ import annotations

import pytest
import torch

from expertlora import load_adapter, tiny
from expertlora.integration import load_model
from expertlora.placement import RoutingStats, gpu_masks

from .conftest import FAMILIES, rel_err
from .test_integration import prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
TOLERANCE = {"fp32": 1e-4}


def masks(strategy: str, base, count: int):
    E, layers = base.num_experts, base.moe_layers
    if strategy == "random":
        gen = torch.Generator().manual_seed(count)
        return {L: torch.zeros(E, dtype=torch.bool).index_fill_(0, torch.randperm(E, generator=gen)[:count], True) for L in layers}
    gen = torch.Generator().manual_seed(7)
    stats = RoutingStats("tiny", E, 100, {L: torch.randint(0, 50, (E,), generator=gen).tolist() for L in layers})
    return gpu_masks(E, layers, count, strategy, stats)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, fused_adapter):
    def make(family: str):
        adapter_dir, _, base = fused_adapter(family)
        v4 = tiny.write_per_expert_adapter(
            tmp_path_factory.mktemp(f"{family}_v4") / "v4", num_layers=list(base.moe_layers), num_experts=base.num_experts,
            hidden_size=base.hidden_size, intermediate_size=base.intermediate_size, r=2, alpha=3.0, seed=9,
        )
        return base, {"math": load_adapter(adapter_dir, base), "v4": load_adapter(v4, base)}

    return make


PLACEMENTS = lambda E: (("prefix", E // 2), ("uniform", E // 4 or 1), ("frequency", E // 2), ("random", E - 1), ("prefix", E), ("prefix", 0))  # noqa: E731
NAMES = ["math", "v4", None]  # each sequence's adapter: two adapters and none in one batch


def all_cpu_logits(model, ads) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, fp32 logits of the all-CPU model) for the mixed batch of NAMES."""
    ids = prompt(len(NAMES), 6, seed=3)
    cpu = load_model(model, "fp32", adapters=ads, threads=2)
    cpu.use(NAMES)
    with torch.no_grad():
        return ids, cpu.model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_model_equals_all_cpu_fp32(family, model_dir, adapters):
    base, ads = adapters(family)
    ids, expected = all_cpu_logits(model_dir(family), ads)
    for strategy, count in PLACEMENTS(base.num_experts):
        hybrid = load_model(model_dir(family), "fp32", adapters=ads, threads=2, device="cuda", gpu_masks=masks(strategy, base, count))
        hybrid.use(NAMES)
        with torch.no_grad():
            got = hybrid.model(input_ids=ids.cuda()).logits.cpu()
        assert rel_err(got, expected) < TOLERANCE["fp32"], (strategy, count)


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_moe_layers_equal_all_cpu_bf16(family, model_dir, adapters):
    base, ads = adapters(family)
    ids = prompt(len(NAMES), 6, seed=3)
    cpu = load_model(model_dir(family), "bf16", adapters=ads, threads=2)
    for strategy, count in PLACEMENTS(base.num_experts):
        hybrid = load_model(model_dir(family), "bf16", adapters=ads, threads=2, device="cuda", gpu_masks=masks(strategy, base, count))
        hybrid.use(NAMES)
        calls = []
        for L in base.moe_layers:
            experts = hybrid.model.get_submodule(f"model.layers.{L}.mlp.experts")
            experts.register_forward_hook(lambda m, args, out, L=L: calls.append((L, [a.cpu() for a in args], out.cpu())))
        with torch.no_grad():
            hybrid.model(input_ids=ids.cuda())
        assert [L for L, _, _ in calls] == list(base.moe_layers)
        slots = cpu.engine.token_slots(NAMES).repeat_interleave(ids.shape[1])
        for L, (x, top_k_index, top_k_weights), out in calls:
            expected = cpu.engine.forward(L, x, top_k_index, top_k_weights, slots)
            assert rel_err(out, expected) < 2e-2, (strategy, count, L)


def test_hybrid_generate_matches_all_cpu_greedy(model_dir, adapters):
    from expertlora.run import Sampling, generate

    base, ads = adapters("qwen3_moe")
    cpu = load_model(model_dir("qwen3_moe"), "fp32", adapters=ads, threads=2)
    hybrid = load_model(model_dir("qwen3_moe"), "fp32", adapters=ads, threads=2, device="cuda",
                        gpu_masks=masks("uniform", base, base.num_experts // 2))
    sampling = Sampling(max_new_tokens=8, ignore_eos=True)
    assert generate(hybrid, [5, 9, 11], "math", sampling).token_ids == generate(cpu, [5, 9, 11], "math", sampling).token_ids



def test_run_and_profile_commands_on_the_gpu(tmp_path, model_dir, fused_adapter):
    """expertlora profile, then expertlora run --device cuda with its stats as placement: the same
    greedy tokens as the CPU run (fp32)."""
    import json

    from typer.testing import CliRunner

    from expertlora.cli import app

    model, (adapter, _, _) = model_dir("qwen3_moe"), fused_adapter("qwen3_moe")
    (tmp_path / "prompts.txt").write_text("5,9,11\n7,3\n")
    runner = CliRunner()
    profiled = runner.invoke(app, ["profile", "--model", str(model), "--adapter", f"math={adapter}", "--prompts",
                                   str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "stats.json"), "--no-progress"])
    assert profiled.exit_code == 0, profiled.output
    common = ["run", "--model", str(model), "--adapter", f"math={adapter}", "--prompt-ids", "5,9,11", "--max-new-tokens", "6",
              "--ignore-eos", "--method", "fp32", "--json", "--no-progress"]
    on_cpu = runner.invoke(app, common)
    for placement in (["--gpu-experts", "3", "--placement", str(tmp_path / "stats.json")], ["--gpu-experts-ratio", "0.5", "--placement", "uniform"],
                      ["--kt-num-gpu-experts", "6"], ["--gpu-experts-ratio", "1"]):
        on_gpu = runner.invoke(app, [*common, "--device", "cuda", *placement])
        assert on_gpu.exit_code == 0, (placement, on_gpu.output)
        assert json.loads(on_gpu.stdout)["token_ids"] == json.loads(on_cpu.stdout)["token_ids"], placement

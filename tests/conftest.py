"""Fixtures: tiny random checkpoints and PEFT adapters built from configs (nothing downloaded)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Without a GPU, Triton kernels (the fused GPU path) run in Triton's interpreter. Set before any
# import of triton, which reads it once (transformers may import triton early).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from expertlora import MoEConfig, tiny

warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
warnings.filterwarnings("ignore", category=FutureWarning)

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek_v2"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """family -> checkpoint directory of a tiny random model (config.json + model.safetensors)."""
    cache = {}

    def make(family: str):
        if family not in cache:
            cache[family] = tiny.save_checkpoint(tiny.tiny_model(family, seed=0), tmp_path_factory.mktemp(family))
        return cache[family]

    return make


@pytest.fixture(scope="session")
def fused_adapter(tmp_path_factory, model_dir):
    """family -> (adapter dir, PeftModel, MoEConfig): a PEFT fused LoRA on experts and non-expert modules."""
    cache = {}

    def make(family: str):
        if family not in cache:
            base_dir = model_dir(family)
            base = MoEConfig.from_model_dir(base_dir)
            first_moe = base.moe_layers[0]
            out = tmp_path_factory.mktemp(f"{family}_adapter")
            peft_model = tiny.peft_fused_adapter(
                tiny.tiny_model(family, seed=0), out, family=family, r=4, alpha=8.0,
                rank_pattern={f"model.layers.{first_moe}.mlp.experts.down_proj": 8},
                alpha_pattern={f"model.layers.{first_moe}.mlp.experts.gate_up_proj": 3.0},
            )
            # The reference is PEFT loading the saved adapter, as a user would: PEFT's in-memory model
            # can differ from its own saved config (DeepSeek-V3 gets an extra `.*\.gate_up_proj`
            # pattern that, sorted first on save, wins over ours on reload).
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(tiny.tiny_model(family, seed=0), str(out)).eval()
            cache[family] = (out, peft_model, base)
        return cache[family]

    return make


@pytest.fixture
def per_expert_adapter(tmp_path):
    """A transformers-4.x style per-expert PEFT adapter (qwen3-like sizes), and its description."""
    spec = dict(num_layers=[0, 1], num_experts=4, hidden_size=32, intermediate_size=24)
    path = tiny.write_per_expert_adapter(tmp_path / "per_expert", **spec)
    return path, spec


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())

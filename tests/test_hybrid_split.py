"""The hybrid split inside whole models without a GPU: load_model's hybrid engine with its "GPU"
part on the CPU, so the placement, the split and the per-layer plumbing run in CI. fp32 logits
equal the all-CPU model's within 1e-4 relative, for every family and placement, with two
adapters and no adapter mixed in one batch. (tests/test_hybrid_model.py runs the real split on
a GPU.)"""

from __future__ import annotations

import pytest
import torch

from expertlora import integration
from expertlora.integration import load_model

from .conftest import FAMILIES, rel_err
from .test_hybrid_model import NAMES, PLACEMENTS, adapters, all_cpu_logits, masks  # noqa: F401 - adapters is a fixture


def split_on_cpu(ckpt, method, backend, threads, group_size, wrap, device, gpu_masks):
    group = group_size or integration._int4_group(ckpt.config.hidden_size, ckpt.config.intermediate_size)
    return integration._hybrid_engine(ckpt, method, threads, group, wrap, torch.device("cpu"), gpu_masks or {})


@pytest.mark.parametrize("family", FAMILIES)
def test_split_model_equals_all_cpu(family, model_dir, adapters, monkeypatch):  # noqa: F811
    base, ads = adapters(family)
    ids, expected = all_cpu_logits(model_dir(family), ads)
    monkeypatch.setattr(integration, "_engine", split_on_cpu)
    for strategy, count in PLACEMENTS(base.num_experts):
        lm = load_model(model_dir(family), "fp32", adapters=ads, threads=2, gpu_masks=masks(strategy, base, count))
        assert type(lm.engine).__name__ == "HybridMoE"
        lm.use(NAMES)
        with torch.no_grad():
            assert rel_err(lm.model(input_ids=ids).logits, expected) < 1e-4, (strategy, count)

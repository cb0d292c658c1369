"""decode.greedy_decode: the StaticCache decode loop, eager on the CPU and replayed as one CUDA
graph per step on a GPU, gives transformers' own greedy tokens (DynamicCache, step by step), for
every family, with two adapters and none mixed in one batch."""

from __future__ import annotations

import pytest
import torch

from expertlora.decode import GRAPH_FAMILIES, greedy_decode
from expertlora.integration import load_model

from .conftest import FAMILIES
from .test_hybrid_model import NAMES, adapters, masks, prompt  # noqa: F401 - adapters is a fixture

NEW_TOKENS = 6
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def transformers_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' decode loop with its default (dynamic) cache: [B, new_tokens]."""
    out, tokens = model(input_ids=ids, use_cache=True), []
    for _ in range(new_tokens):
        tokens.append(out.logits[:, -1:].argmax(-1))
        out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_decode_gives_transformers_tokens(family, model_dir, adapters):  # noqa: F811
    _, ads = adapters(family)
    lm = load_model(model_dir(family), "fp32", adapters=ads, threads=2)
    lm.use(NAMES)
    ids = prompt(len(NAMES), 5, seed=11)
    with torch.no_grad():
        expected = transformers_greedy(lm.model, ids, NEW_TOKENS)
    got = greedy_decode(lm, ids, NEW_TOKENS)
    assert torch.equal(got, expected)
    assert torch.equal(greedy_decode(lm, ids, 1), expected[:, :1])


@CUDA
@pytest.mark.parametrize("family", GRAPH_FAMILIES)
def test_cuda_graph_decode_equals_eager(family, model_dir, adapters):  # noqa: F811
    """Every expert on the GPU, bf16: the replayed steps give the eager steps' tokens (the same
    kernels). (Against transformers' own loop the CPU test checks in fp32: in bf16 its dynamic
    cache's attention rounds differently, which can flip near-tied tokens of a tiny random model.)
    DeepSeek-V2 / V3 decode with SDPA's math backend (decode.MATH_ATTENTION says why)."""
    base, ads = adapters(family)
    everything = masks("prefix", base, base.num_experts)
    lm = load_model(model_dir(family), "bf16", adapters=ads, threads=2, device="cuda", gpu_masks=everything)
    lm.use(NAMES)
    ids = prompt(len(NAMES), 5, seed=11).cuda()
    eager = greedy_decode(lm, ids, NEW_TOKENS, graph=False)
    assert torch.equal(greedy_decode(lm, ids, NEW_TOKENS), eager)


@CUDA
def test_cuda_graph_decode_refuses_what_it_cannot_replay(model_dir, adapters):  # noqa: F811
    """GPU experts in fp32 (their grouped matmuls wait on the device): a one-line error."""
    family = FAMILIES[0]
    base, _ = adapters(family)
    lm = load_model(model_dir(family), "fp32", device="cuda", gpu_masks=masks("prefix", base, base.num_experts), threads=2)
    with pytest.raises(ValueError, match="needs the GPU experts in bf16 .* and a model of qwen3_moe"):
        greedy_decode(lm, prompt(1, 4, seed=1).cuda(), 3)

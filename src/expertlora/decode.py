"""Greedy decoding with the whole decode step replayed as one CUDA graph.

transformers runs a decode step op by op: on the GPU, a small MoE model's step is a few hundred
launches whose host time far exceeds the GPU's work. So the step is captured once and replayed;
with every expert on the GPU nothing in it needs the host, and CPU experts run inside it through
host nodes (hybrid_graph.py: the stream hands each layer's CPU part to a worker and waits):

    prefill (eager, StaticCache)  ->  step 1 (eager: warms up and compiles)  ->  capture step
    ->  replay per token: logits -> argmax -> the next step's input token, all on the GPU

The KV cache is transformers' StaticCache (fixed addresses, as a graph needs). The adapters are
those selected with ``LoadedModel.use`` before the call. Without CUDA, or with ``graph=False``,
the same steps run eagerly (tests check the two against transformers' own cache).
"""

from __future__ import annotations

import contextlib

import torch

from .integration import LoadedModel

# Families whose graph decode equals their eager decode on the H200 (tests/test_decode.py).
GRAPH_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3")
# Multi-head latent attention (DeepSeek-V2 / V3): torch's cuDNN attention fails on the tiny test
# models' head sizes, eagerly too, and its flash / memory-efficient kernels hit a CUDA "misaligned
# address" when a step is captured in a graph (H200, 2026-12-01: scripts/decode_check.py, one
# backend at a time; eager steps and the math backend are fine). They decode here with the math
# backend, eager steps too (graph and eager must round alike): at one query token a step's
# attention is two small matmuls either way.
MATH_ATTENTION = ("deepseek_v2", "deepseek_v3")


def greedy_decode(lm: LoadedModel, input_ids: torch.Tensor, max_new_tokens: int, graph: bool = True) -> torch.Tensor:
    """``input_ids`` [B, S] on the model's device -> the [B, max_new_tokens] greedy tokens that
    follow (no stop at EOS). ``graph``: replay steps 2.. from one CUDA graph (needs CUDA and the
    GPU experts in bf16; CPU experts run in it through host nodes)."""
    from transformers import StaticCache

    model = lm.model
    B, S = input_ids.shape
    graph = graph and input_ids.is_cuda
    if graph and not graph_ready(lm):
        raise ValueError(f"a CUDA graph decode needs the GPU experts in bf16 (host nodes where some experts are on the CPU) "
                         f"and a model of {', '.join(GRAPH_FAMILIES)}")
    part = lm.engine.graph_part if graph else None  # None: every expert on the GPU, no host nodes
    cache = StaticCache(config=model.config, max_cache_len=S + max_new_tokens)
    generated = torch.empty(B, max_new_tokens, dtype=torch.long, device=input_ids.device)
    token = torch.empty(B, 1, dtype=torch.long, device=input_ids.device)  # the step's input, then its output
    position = torch.full((1,), S, dtype=torch.long, device=input_ids.device)

    def step():
        """One decode step: ``token`` (at ``position``) is recorded and replaced by the next."""
        generated.index_copy_(1, position - S, token)
        logits = model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits
        token.copy_(logits[:, -1:].argmax(-1))
        position.add_(1)

    with torch.no_grad(), _attention_backends(input_ids.device, math=model.config.model_type in MATH_ATTENTION):
        logits = model(input_ids=input_ids, past_key_values=cache, cache_position=torch.arange(S, device=input_ids.device),
                       use_cache=True).logits
        token.copy_(logits[:, -1:].argmax(-1))
        steps = max_new_tokens - 1  # the last token is recorded without a step
        if graph and steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the first step, eager: caches and kernels warm before capture
                if part is not None:
                    part.preparing = True  # the CPU parts' pinned buffers, allocated now
                try:
                    step()
                finally:
                    if part is not None:
                        part.preparing = False
            torch.cuda.current_stream().wait_stream(side)
            replay = torch.cuda.CUDAGraph()
            with torch.cuda.graph(replay):
                step()
            calls = part.take_captured() if part is not None else []
            for _ in range(steps - 1):
                if part is None:
                    replay.replay()
                else:
                    part.replay(calls, replay)
        else:
            for _ in range(steps):
                step()
        generated[:, -1:] = token
        return generated


def graph_ready(lm: LoadedModel) -> bool:
    """Whether a decode step can be captured: GPU experts on a path that never waits for the GPU
    (bf16, where the grouped matmuls run on the device), host nodes for the CPU experts where
    some are there, and a family whose replayed decode was checked on a GPU."""
    from .hybrid import HybridMoE

    return lm.model.config.model_type in GRAPH_FAMILIES and isinstance(lm.engine, HybridMoE) and lm.engine.graphs_ready()


def _attention_backends(device: torch.device, math: bool):
    """SDPA's backends on CUDA: never cuDNN's (see MATH_ATTENTION), only the math one
    where ``math``."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH] if math else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

"""The GPU backend (gpu.py) and the hybrid executor (hybrid.py) against the float64 reference and
the all-CPU engine.

Each case runs with the backend on the CPU (CI has no GPU; the same code, with PyTorch's grouped
matmul or its per-expert loop) and on CUDA where there is one (scripts/device_check.sh).
Tolerances (relative Frobenius error of the layer output): fp32 1e-5, bf16 2e-2 (the GPU and CPU
parts round in different places).
"""

from __future__ import annotations

import contextlib

import os

import pytest
import torch

from expertlora import gpu as gpu_module
from expertlora.engine import MoELoRAEngine
from expertlora.experts import ExpertWeights
from expertlora.gpu import GpuMoELoRA, grouped_mm
from expertlora.hybrid import HybridMoE
from expertlora.moe import reference_moe
from expertlora.placement import RoutingStats, gpu_masks
from expertlora.slots import NO_ADAPTER, AdapterSlots
from expertlora.tiny import random_expert_lora

from .test_engine import make_weights, rel, routing

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}
E, H, I, K, LAYER = 8, 64, 32, 3, 2


def adapters():
    return {
        "a": random_expert_lora(E, H, I, [LAYER], {"gate": 4, "up": 8, "down": 16}, alpha=8.0, seed=1),
        "b": random_expert_lora(E, H, I, [LAYER], {"gate": 3, "down": 1}, alpha=2.0, use_rslora=True, seed=2),
        "c": random_expert_lora(E, H, I, [LAYER], {"gate": 33, "up": 33, "down": 33}, alpha=64.0, seed=3),
    }


def backend(method: str, device: str, mask: torch.Tensor, loaded=("a", "b", "c")):
    gate, up, down = make_weights(E, H, I)
    slots = AdapterSlots(E, H, I, DTYPES[method])
    ads = adapters()
    for name in loaded:
        slots.load(name, ads[name])
    gpu = GpuMoELoRA(device, DTYPES[method], slots)
    gpu.add_layer(LAYER, torch.cat((gate, up), 1), down, mask)
    return gpu, (gate, up, down), ads


def token_loras(names, ads):
    return [ads[n].layers[LAYER] if n else None for n in names]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 7, 50])
def test_gpu_backend_matches_reference(device, method, T):
    mask = torch.zeros(E, dtype=torch.bool)
    mask[[0, 2, 3, 5, 6]] = True  # any subset, not a prefix
    gpu, (gate, up, down), ads = backend(method, device, mask)
    ids, w = routing(T, E, K, seed=T)
    ids[0, 0] = -1  # skipped ids stay skipped
    names = [("a", "b", None, "c")[t % 4] for t in range(T)]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    slots = gpu.slots.token_slots(names)
    y = gpu.forward(LAYER, x.to(device, DTYPES[method]), ids.to(device), w.to(device), slots.to(device))
    # The reference runs only the resident pairs: the rest belong to the CPU engine.
    ids_here = ids.masked_fill(~mask[ids.clamp(min=0)] | (ids < 0), -1)
    xr = x.to(DTYPES[method]).double()
    ref = reference_moe(xr, ids_here, w, gate, up, down, token_loras(names, ads))
    assert rel(y.cpu(), ref) < TOLERANCE[method]


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_without_adapter_are_bit_identical_to_base(device):
    mask = torch.ones(E, dtype=torch.bool)
    with_adapters, _, _ = backend("bf16", device, mask)
    bare, _, _ = backend("bf16", device, mask, loaded=())
    T = 12
    ids, w = routing(T, E, K, seed=5)
    x = torch.randn(T, H).to(device, torch.bfloat16)
    names = [None if t % 3 == 0 else "ac"[t % 2] for t in range(T)]
    slots = with_adapters.slots.token_slots(names).to(device)
    y = with_adapters.forward(LAYER, x, ids.to(device), w.to(device), slots)
    base = bare.forward(LAYER, x, ids.to(device), w.to(device), None)
    plain = torch.tensor([n is None for n in names])
    assert torch.equal(y[plain.to(device)], base[plain.to(device)])
    assert not torch.equal(y[~plain.to(device)], base[~plain.to(device)])  # the others did get LoRA


@pytest.mark.parametrize("device", DEVICES)
def test_unloaded_adapter_gives_way_to_a_new_one(device):
    gpu, _, ads = backend("fp32", device, torch.ones(E, dtype=torch.bool), loaded=("a",))
    ids, w = routing(4, E, K, seed=1)
    x = torch.randn(4, H).to(device)
    slot = gpu.slots.index("a")
    before = gpu.forward(LAYER, x, ids.to(device), w.to(device), torch.full((4,), slot, device=device))
    gpu.slots.unload("a")
    gpu.slots.load("c", ads["c"])  # takes slot 0 again: the cached GPU form must not be reused
    after = gpu.forward(LAYER, x, ids.to(device), w.to(device), torch.full((4,), gpu.slots.index("c"), device=device))
    assert gpu.slots.index("c") == slot and not torch.allclose(before, after)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [True, False])
def test_grouped_mm_matches_per_group_matmuls(device, dtype, native, monkeypatch):
    if native and not gpu_module._has_grouped_mm(device, dtype):
        pytest.skip("torch._grouped_mm does not run here")
    if not native:  # the per-expert loop, for devices without the grouped op
        monkeypatch.setattr(gpu_module, "_has_grouped_mm", lambda *_: False)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 32, generator=gen), torch.randn(4, 16, 32, generator=gen)
    ends = torch.tensor([3, 3, 9, 11], dtype=torch.int32)  # group 1 is empty
    y = grouped_mm(x.to(device, dtype), w.to(device, dtype), ends.to(device)).float().cpu()
    starts = [0, 3, 3, 9]
    ref = torch.cat([x[s:e].double() @ w[j].double().T for j, (s, e) in enumerate(zip(starts, ends.tolist()))])
    assert rel(y, ref) < TOLERANCE["fp32" if dtype == torch.float32 else "bf16"]


def _masks(strategy: str, count: int):
    if strategy == "random":
        mask = torch.zeros(E, dtype=torch.bool)
        mask[torch.randperm(E, generator=torch.Generator().manual_seed(count))[:count]] = True
        return {LAYER: mask}
    stats = RoutingStats(model="tiny", num_experts=E, tokens=100, counts={LAYER: [3, 9, 1, 7, 7, 0, 12, 2]})
    return gpu_masks(E, [LAYER], count, strategy, stats)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy,count", [("prefix", 3), ("uniform", 4), ("frequency", 5), ("random", 2), ("prefix", 0), ("prefix", E)])
def test_hybrid_equals_all_cpu(device, method, strategy, count):
    gate, up, down = make_weights(E, H, I)
    weights = ExpertWeights.from_tensors(gate, up, down, method)
    cpu_alone = MoELoRAEngine({LAYER: weights}, threads=2, kernel="torch")
    mask = _masks(strategy, count)[LAYER]
    hybrid = HybridMoE.build([(LAYER, torch.cat((gate, up), 1), down)], {LAYER: mask}, method, device=device, threads=2)
    assert hybrid.cpu.layers[LAYER].num_experts == E - count  # the CPU holds only its own experts
    for name, adapter in adapters().items():
        cpu_alone.load_adapter(name, adapter)
        hybrid.load_adapter(name, adapter)
    T = 20
    ids, w = routing(T, E, K, seed=count)
    names = [("a", None, "b", "c")[t % 4] for t in range(T)]
    x = torch.randn(T, H).to(DTYPES[method])
    expected = cpu_alone.forward(LAYER, x, ids, w, cpu_alone.token_slots(names))
    got = hybrid.forward(LAYER, x.to(device), ids.to(device), w.to(device), hybrid.token_slots(names))
    assert got.device.type == device and got.dtype == x.dtype
    assert rel(got.cpu(), expected.double()) < TOLERANCE[method]


@pytest.mark.parametrize("device", DEVICES)
def test_hybrid_worker_equals_all_cpu(device):
    """Batches whose CPU experts run on the hybrid's worker thread (``worker=True``), with a GPU
    while the caller is on a stream other than the default."""
    gate, up, down = make_weights(E, H, I)
    cpu_alone = MoELoRAEngine({LAYER: ExpertWeights.from_tensors(gate, up, down, "fp32")}, threads=2, kernel="torch")
    built = HybridMoE.build([(LAYER, torch.cat((gate, up), 1), down)], _masks("uniform", 4), "fp32", device=device, threads=2, kernel="torch")
    hybrid = HybridMoE(built.cpu, built.gpu, worker=True)
    for name, adapter in adapters().items():
        cpu_alone.load_adapter(name, adapter)
        hybrid.load_adapter(name, adapter)
    hybrid.adapters_changed()
    side = torch.cuda.Stream() if device == "cuda" else None
    for T in (32, 5):
        ids, w = routing(T, E, K, seed=T)
        names = [("a", None, "b", "c")[t % 4] for t in range(T)]
        x = torch.randn(T, H)
        expected = cpu_alone.forward(LAYER, x, ids, w, cpu_alone.token_slots(names))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():  # the caller's stream, not the default
            got = hybrid.forward(LAYER, x.to(device), ids.to(device), w.to(device), hybrid.token_slots(names))
            got = got.cpu()
        assert rel(got, expected.double()) < TOLERANCE["fp32"], T


@pytest.mark.parametrize("worker", [False, True])
def test_hybrid_without_adapters_and_with_none_tokens(worker):
    gate, up, down = make_weights(E, H, I)
    hybrid = HybridMoE.build([(LAYER, torch.cat((gate, up), 1), down)], _masks("prefix", 4), "fp32", device="cpu", threads=2,
                             worker=worker, kernel="torch")
    ids, w = routing(5, E, K, seed=3)
    x = torch.randn(5, H)
    ref = reference_moe(x, ids, w, gate, up, down, [None] * 5)
    assert rel(hybrid.forward(LAYER, x, ids, w, None), ref) < 1e-5
    assert rel(hybrid.forward(LAYER, x, ids, w, torch.full((5,), NO_ADAPTER)), ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [0, 4, E])
def test_hybrid_results_do_not_share_buffers(device, count):
    """The hybrid reuses host buffers between layer calls: a result must survive the next call."""
    gate, up, down = make_weights(E, H, I)
    hybrid = HybridMoE.build([(LAYER, torch.cat((gate, up), 1), down)], _masks("prefix", count), "bf16", device=device, threads=2, kernel="torch")
    first_ids, first_w = routing(3, E, K, seed=1)
    first = hybrid.forward(LAYER, torch.randn(3, H).to(device, torch.bfloat16), first_ids.to(device), first_w.to(device))
    kept = first.clone()
    ids, w = routing(3, E, K, seed=2)
    hybrid.forward(LAYER, torch.randn(3, H).to(device, torch.bfloat16), ids.to(device), w.to(device))
    assert torch.equal(first, kept)


def test_hybrid_refuses_a_cpu_engine_that_holds_other_experts():
    gate, up, down = make_weights(E, H, I)
    cpu = MoELoRAEngine({LAYER: ExpertWeights.from_tensors(gate, up, down, "fp32")}, threads=2, kernel="torch")
    gpu = GpuMoELoRA("cpu", torch.float32)
    gpu.add_layer(LAYER, torch.cat((gate, up), 1), down, _masks("prefix", 3)[LAYER])
    with pytest.raises(ValueError, match="layer 2: the CPU engine must hold exactly the experts that are not on the GPU"):
        HybridMoE(cpu, gpu)


@pytest.fixture
def triton_here(device):
    """Triton's kernels on a GPU, or in its interpreter on the CPU (conftest sets that up where
    there is no GPU)."""
    pytest.importorskip("triton")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs on CPU tensors only in its interpreter, used where there is no GPU")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 5])
def test_fused_kernels_match_reference(device, method, T, triton_here):
    mask = torch.zeros(E, dtype=torch.bool)
    mask[[1, 2, 4, 7]] = True
    gpu, (gate, up, down), ads = backend(method, device, mask)
    gpu.fused = True
    ids, w = routing(T, E, K, seed=T + 10)
    ids[0, 1] = -1
    names = [("c", None, "b", "a")[t % 4] for t in range(T)]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    slots = gpu.slots.token_slots(names)
    y = gpu.forward(LAYER, x.to(device, DTYPES[method]), ids.to(device), w.to(device), slots.to(device))
    ids_here = ids.masked_fill(~mask[ids.clamp(min=0)] | (ids < 0), -1)
    ref = reference_moe(x.to(DTYPES[method]).double(), ids_here, w, gate, up, down, token_loras(names, ads))
    assert rel(y.cpu(), ref) < TOLERANCE[method]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_kernels_with_many_blocks(device, triton_here):
    """Blocks smaller than every dimension: the kernels' loops over blocks and chunks, and the
    sums of their partial shrinks, are exercised (the defaults cover the tiny layer in one)."""
    from expertlora.gpu_triton import fused_forward

    mask = torch.ones(E, dtype=torch.bool)
    mask[5] = False
    gpu, (gate, up, down), ads = backend("fp32", device, mask)
    T = 4
    ids, w = routing(T, E, K, seed=21)
    names = ["a", "c", None, "b"]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
    g = gpu.layers[LAYER]
    lora = gpu._stacked(LAYER, g)
    slots = gpu.slots.token_slots(names).to(device)
    y = fused_forward(g.group, g.gate_up, g.down, lora, x.to(device), ids.to(device), w.to(device), slots,
                      block_n=8, block_k=16, num_warps=2, shrink_chunk=16)
    ref = reference_moe(x.double(), ids.masked_fill(ids == 5, -1), w, gate, up, down, token_loras(names, ads))
    assert rel(y.cpu(), ref) < TOLERANCE["fp32"]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_tokens_without_adapter_are_bit_identical_to_base(device, triton_here):
    mask = torch.ones(E, dtype=torch.bool)
    with_adapters, _, _ = backend("bf16", device, mask)
    bare, _, _ = backend("bf16", device, mask, loaded=())
    with_adapters.fused = bare.fused = True
    T = 6
    ids, w = routing(T, E, K, seed=5)
    x = torch.randn(T, H).to(device, torch.bfloat16)
    names = [None, "a", None, "c", "b", None]
    y = with_adapters.forward(LAYER, x, ids.to(device), w.to(device), with_adapters.slots.token_slots(names).to(device))
    base = bare.forward(LAYER, x, ids.to(device), w.to(device), None)
    plain = torch.tensor([n is None for n in names]).to(device)
    assert torch.equal(y[plain], base[plain]) and not torch.equal(y[~plain], base[~plain])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_hybrid_with_quantized_cpu_experts(device, method):
    """The CPU side keeps its experts (only those) in int8 / int4, the GPU side in bf16: the layer
    equals the float64 reference on exactly those weights."""
    gate, up, down = make_weights(E, H, I)
    mask = _masks("random", 4)[LAYER]
    hybrid = HybridMoE.build([(LAYER, torch.cat((gate, up), 1), down)], {LAYER: mask}, method, group_size=32, device=device, threads=2)
    ads = adapters()
    for name, adapter in ads.items():
        hybrid.load_adapter(name, adapter)
    # the weights each side runs: bf16 on the GPU, the CPU engine's own dequantized storage
    cpu_gate, cpu_up, cpu_down = hybrid.cpu.layers[LAYER].dequantize()
    held = (~mask).nonzero().squeeze(1)
    ref_gate, ref_up, ref_down = (w.bfloat16().double() for w in (gate, up, down))
    ref_gate[held], ref_up[held], ref_down[held] = cpu_gate.double(), cpu_up.double(), cpu_down.double()
    T = 12
    ids, w = routing(T, E, K, seed=3)
    names = [("a", None, "b", "c")[t % 4] for t in range(T)]
    x = torch.randn(T, H).bfloat16()
    got = hybrid.forward(LAYER, x.to(device), ids.to(device), w.to(device), hybrid.token_slots(names))
    ref = reference_moe(x.double(), ids, w, ref_gate, ref_up, ref_down, token_loras(names, ads))
    assert rel(got.cpu(), ref) < 2e-2

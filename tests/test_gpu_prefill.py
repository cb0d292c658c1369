"""GPU prefill for CPU-resident experts (gpu_prefill.py, through hybrid.py) against the float64
reference and the hybrid's CPU path.

Each case runs with the "GPU" on the CPU device (CI: the same buffers, layouts, dequantization,
scheduling and GpuMoELoRA math, with plain copies) and on CUDA where there is one
(scripts/device_prefill.sh: page-locked host blocks, the copy stream and its events).
Tolerances (relative Frobenius error of the layer output): fp32 1e-5; bf16, int8 and int4 2e-2
(the GPU runs bf16 weights, int8 / int4 dequantized to bf16; the CPU path rounds elsewhere).
The reference runs the weights each side holds: the GPU's resident experts in its dtype, the
CPU engine's experts as its storage dequantizes them.
"""

from __future__ import annotations

import pytest
import torch

from expertlora import gpu_prefill, integration
from expertlora.gpu_prefill import dequantize_into, memory_needed
from expertlora.hybrid import HybridMoE
from expertlora.integration import load_model
from expertlora.moe import reference_moe
from expertlora.quantize import quantize
from expertlora.tiny import random_expert_lora

from .conftest import rel_err
from .test_engine import make_weights, routing
from .test_integration import prompt

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
METHODS = ["fp32", "bf16", "int8", "int4"]
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "int8": 2e-2, "int4": 2e-2}
E, H, I, K = 8, 64, 96, 3  # int4: gate_up in groups of 64 (H), down in groups of 32 (I)
GPU_EXPERTS = {1: [0, 3, 6], 2: [], 4: [1, 2, 4, 5, 7], 6: list(range(E))}  # layer 6: nothing left on the CPU
THRESHOLD = 16


def adapters(layers=tuple(GPU_EXPERTS)):
    layers = list(layers)
    return {
        "a": random_expert_lora(E, H, I, layers, {"gate": 4, "up": 8, "down": 16}, alpha=8.0, seed=1),
        "b": random_expert_lora(E, H, I, layers[:2], {"gate": 3, "down": 1}, alpha=2.0, use_rslora=True, seed=2),
        "c": random_expert_lora(E, H, I, layers, {"gate": 9, "up": 9, "down": 9}, alpha=64.0, seed=3),
        "d": random_expert_lora(E, H, I, layers, {"up": 5}, alpha=5.0, seed=4),
    }


def tensors():
    return {L: make_weights(E, H, I, seed=L) for L in GPU_EXPERTS}


def build(method: str, device: str, threshold: int | None = THRESHOLD, loaded=("a", "b", "c")):
    weights = tensors()
    masks = {L: torch.zeros(E, dtype=torch.bool).index_fill_(0, torch.tensor(ids, dtype=torch.long), True)
             for L, ids in GPU_EXPERTS.items()}
    hybrid = HybridMoE.build(((L, torch.cat((g, u), 1), d) for L, (g, u, d) in weights.items()), masks, method,
                             device=device, threads=2, kernel="torch", gpu_prefill_threshold=threshold)
    ads = adapters()
    for name in loaded:
        hybrid.load_adapter(name, ads[name])
    return hybrid, weights, ads


def dtype_of(method: str) -> torch.dtype:
    return torch.float32 if method == "fp32" else torch.bfloat16


def reference(hybrid: HybridMoE, method: str, weights, L: int, x, ids, w, names, ads) -> torch.Tensor:
    """The float64 layer on the weights each side holds."""
    gate, up, down = (t.to(dtype_of(method)).double() for t in weights[L])
    held = hybrid.slots.experts.get(L, torch.arange(E))
    if len(held):
        cpu_gate, cpu_up, cpu_down = hybrid.cpu.layers[L].dequantize()
        gate[held], up[held], down[held] = cpu_gate.double(), cpu_up.double(), cpu_down.double()
    loras = [ads[n].layers.get(L) if n else None for n in names]
    return reference_moe(x.double(), ids, w, gate, up, down, loras)


def inputs(T: int, seed: int, method: str, names_cycle=("a", None, "b", "c")):
    ids, w = routing(T, E, K, seed=seed)
    ids[0, 1] = -1  # a skipped pair stays skipped
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(dtype_of(method))
    return x, ids, w, [names_cycle[t % len(names_cycle)] for t in range(T)]


def refuse_cpu(hybrid: HybridMoE):
    def refuse(*_args, **_kw):
        raise AssertionError("the CPU engine ran a forward GPU prefill should have taken")

    hybrid.cpu.forward = refuse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_prefill_equals_reference_and_the_cpu_path(method, device):
    hybrid, weights, ads = build(method, device)
    plain, _, _ = build(method, device, threshold=None)
    assert plain.prefill is None
    refuse_cpu(hybrid)
    T = THRESHOLD + 5
    for n, L in enumerate([1, 2, 4, 6, 4, 1]):  # in order, then out of order and again
        x, ids, w, names = inputs(T, seed=10 + n, method=method)
        args = (x.to(device), ids.to(device), w.to(device))
        got = hybrid.forward(L, *args, hybrid.token_slots(names))
        assert got.device.type == device and got.dtype == x.dtype
        ref = reference(hybrid, method, weights, L, x, ids, w, names, ads)
        assert rel_err(got.cpu(), ref) < TOLERANCE[method], L
        assert rel_err(got.cpu(), plain.forward(L, *args, plain.token_slots(names)).cpu()) < TOLERANCE[method], L


@pytest.mark.parametrize("device", DEVICES)
def test_short_forwards_stay_on_the_cpu_engine_with_its_page_locked_storage(device):
    hybrid, weights, ads = build("int4", device)
    calls = []
    cpu_forward = hybrid.cpu.forward
    hybrid.cpu.forward = lambda *a, **kw: calls.append(a[0]) or cpu_forward(*a, **kw)
    for L in (1, 2, 4):
        x, ids, w, names = inputs(THRESHOLD - 1, seed=L, method="int4")
        got = hybrid.forward(L, x.to(device), ids.to(device), w.to(device), hybrid.token_slots(names))
        assert rel_err(got.cpu(), reference(hybrid, "int4", weights, L, x, ids, w, names, ads)) < TOLERANCE["int4"]
    assert calls == [1, 2, 4] and hybrid.prefill.copies == 0
    stack = hybrid.cpu.layers[2].gate_up
    # the engine's storage lies in a registered block (torch's is_pinned() does not see cudaHostRegister'ed memory)
    start = stack.data.data_ptr()
    inside = [b for b in hybrid.prefill._host._registered if b.data_ptr() <= start < b.data_ptr() + b.numel()]
    assert len(inside) == (device == "cuda")
    assert stack.group_size == 64 and hybrid.cpu.layers[2].down.group_size == 32


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_found_in_a_buffer_is_not_copied_again(device):
    hybrid, _, _ = build("bf16", device, loaded=())
    T = THRESHOLD
    copies = []
    for L in [1, 2, 4, 6, 4, 1, 2]:
        x, ids, w, _ = inputs(T, seed=L, method="bf16")
        hybrid.forward(L, x.to(device), ids.to(device), w.to(device))
        copies.append(hybrid.prefill.copies)
    # 1: copies 1 and prefetches 2; 2: prefetches 4 over 1; 4: the last layer with CPU experts;
    # 6: none on the CPU; 4: found; 1: copied over 2 (least recently used), and prefetches 2 over 4;
    # 2: found, prefetches 4 over 1 again.
    assert copies == [2, 3, 3, 3, 3, 5, 6]
    assert len(hybrid.prefill._buffers) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_without_adapter_get_the_bits_of_no_adapters(device):
    with_adapters, _, _ = build("bf16", device)
    bare, _, _ = build("bf16", device, loaded=())
    x, ids, w, names = inputs(THRESHOLD + 3, seed=4, method="bf16", names_cycle=(None, "a", None, "c"))
    args = (x.to(device), ids.to(device), w.to(device))
    for L in (1, 2):
        y = with_adapters.forward(L, *args, with_adapters.token_slots(names))
        base = bare.forward(L, *args, None)
        plain = torch.tensor([n is None for n in names]).to(device)
        assert torch.equal(y[plain], base[plain]) and not torch.equal(y[~plain], base[~plain])


@pytest.mark.parametrize("device", DEVICES)
def test_adapters_changed_after_a_prefill(device):
    hybrid, weights, ads = build("fp32", device, loaded=("a",))
    x, ids, w, _ = inputs(THRESHOLD, seed=5, method="fp32")
    args = (x.to(device), ids.to(device), w.to(device))
    before = hybrid.forward(2, *args, hybrid.token_slots(["a"] * THRESHOLD))
    hybrid.unload_adapter("a")
    hybrid.load_adapter("d", ads["d"])  # takes slot 0 again: the stacked LoRA of "a" must not serve it
    hybrid.prefill.adapters_changed()
    names = ["d", None] * (THRESHOLD // 2)
    after = hybrid.forward(2, *args, hybrid.token_slots(names))
    assert hybrid.slot("d") == 0 and not torch.allclose(before, after)
    assert rel_err(after.cpu(), reference(hybrid, "fp32", weights, 2, x, ids, w, names, ads)) < TOLERANCE["fp32"]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_dequantize_into_is_the_storage_rounded_once(method, monkeypatch):
    w = torch.randn(5, 24, 64, generator=torch.Generator().manual_seed(0))
    stack = quantize(w, method, 32 if method == "int4" else None)
    expected = stack.dequantize().bfloat16()
    out = torch.empty(7, 24, 64, dtype=torch.bfloat16)  # more experts than the stack: the rest untouched
    assert torch.equal(dequantize_into(out, stack), expected)
    monkeypatch.setattr(gpu_prefill, "DEQUANT_CHUNK_BYTES", 2 * 24 * 64 * 2)  # two experts a step
    out.zero_()
    assert torch.equal(dequantize_into(out, stack), expected) and not out[5:].any()


def test_refused_when_the_gpu_lacks_the_memory(monkeypatch):
    hybrid, _, _ = build("int4", "cpu", threshold=None)
    layers = list(hybrid.cpu.layers.values())
    need = memory_needed(layers)
    largest = max(w.nbytes for w in layers)
    assert need >= 2 * largest + 3 * 8 * H * I * 2  # two packed layers and a bf16 workspace of one
    monkeypatch.setattr(gpu_prefill, "_free_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"GPU prefill: needs \d+\.\d\d GiB of GPU memory \(two layers of CPU experts, "
                                         r"a bf16 workspace\), \d+\.\d\d GiB free"):
        hybrid.enable_gpu_prefill(THRESHOLD)
    assert hybrid.prefill is None
    monkeypatch.setattr(gpu_prefill, "_free_bytes", lambda device: need)
    hybrid.enable_gpu_prefill(THRESHOLD)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "16"])
def test_threshold_must_be_a_positive_token_count(bad):
    hybrid, _, _ = build("bf16", "cpu", threshold=None)
    with pytest.raises(ValueError, match="GPU prefill threshold: expected a token count >= 1"):
        hybrid.enable_gpu_prefill(bad)


def test_default_threshold_follows_the_cpu_path(monkeypatch):
    """The kernel's AMX tiles make the CPU path faster, so GPU prefill pays from more tokens."""
    monkeypatch.setattr(gpu_prefill, "amx_from", lambda: 5)
    with_tiles = {m: gpu_prefill.threshold_for(None, m, "cuda", cpu_experts=True) for m in METHODS}
    monkeypatch.setattr(gpu_prefill, "amx_from", lambda: 0)
    without = {m: gpu_prefill.threshold_for(None, m, "cuda", cpu_experts=True) for m in METHODS}
    assert with_tiles == {m: gpu_prefill.DEFAULT_THRESHOLDS["amx"][m] for m in METHODS}
    assert without == {m: gpu_prefill.DEFAULT_THRESHOLDS["avx512"][m] for m in METHODS}
    assert with_tiles["bf16"] > without["bf16"]
    assert gpu_prefill.threshold_for(None, "bf16", "cpu", cpu_experts=True) is None
    assert gpu_prefill.threshold_for(0, "bf16", "cuda", cpu_experts=True) is None


def _split_on_cpu(ckpt, method, backend, threads, group_size, wrap, device, gpu_masks):
    """load_model's hybrid engine with its "GPU" part on the CPU (as tests/test_hybrid_split.py)."""
    return integration._hybrid_engine(ckpt, method, threads, group_size, wrap, torch.device("cpu"), gpu_masks or {})


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_whole_model_with_gpu_prefill_equals_all_cpu(family, model_dir, monkeypatch):
    from .test_hybrid_model import masks

    from expertlora import MoEConfig

    base = MoEConfig.from_model_dir(model_dir(family))
    ads = {"a": random_expert_lora(base.num_experts, base.hidden_size, base.intermediate_size, list(base.moe_layers),
                                   {"gate": 4, "up": 2, "down": 8}, alpha=8.0, seed=1)}
    ids = prompt(3, 7, seed=2)
    names = ["a", None, "a"]
    cpu = load_model(model_dir(family), "fp32", adapters=ads, threads=2)
    cpu.use(names)
    monkeypatch.setattr(integration, "_engine", _split_on_cpu)
    lm = load_model(model_dir(family), "fp32", adapters=ads, threads=2, gpu_masks=masks("uniform", base, base.num_experts // 4),
                    gpu_prefill_threshold=8)
    lm.use(names)
    with torch.no_grad():
        expected, got = cpu.model(input_ids=ids).logits, lm.model(input_ids=ids).logits
    assert lm.engine.prefill.copies > 0  # 21 tokens: every MoE layer's CPU experts ran on the "GPU"
    assert rel_err(got, expected) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_whole_model_on_the_gpu_with_gpu_prefill_equals_all_cpu(model_dir):
    from .test_hybrid_model import masks

    from expertlora import MoEConfig

    base = MoEConfig.from_model_dir(model_dir("qwen3_moe"))
    ads = {"a": random_expert_lora(base.num_experts, base.hidden_size, base.intermediate_size, list(base.moe_layers),
                                   {"gate": 4, "up": 2, "down": 8}, alpha=8.0, seed=1)}
    ids = prompt(3, 7, seed=2)
    cpu = load_model(model_dir("qwen3_moe"), "fp32", adapters=ads, threads=2)
    cpu.use(["a", None, "a"])
    for share in (0, base.num_experts // 2):
        lm = load_model(model_dir("qwen3_moe"), "fp32", adapters=ads, threads=2, device="cuda",
                        gpu_masks=masks("uniform", base, share), gpu_prefill_threshold=8)
        lm.use(["a", None, "a"])
        with torch.no_grad():
            expected, got = cpu.model(input_ids=ids).logits, lm.model(input_ids=ids.cuda()).logits.cpu()
        assert lm.engine.prefill.copies > 0 and rel_err(got, expected) < 1e-4, share

"""The CPU MoE-LoRA engine against the float64 reference (moe.reference_moe).

Tolerances (relative Frobenius error of the layer output): fp32 1e-5; bf16 1e-2; int8 / int4
1e-2 against the reference run on their own dequantized weights. Each case runs on both
paths: the compiled kernel (skipped only where it cannot be built) and the PyTorch fallback.
"""

from __future__ import annotations

import pytest
import torch

from expertlora.engine import MoELoRAEngine
from expertlora.errors import AdapterError
from expertlora.experts import ExpertWeights
from expertlora.kernels import KernelUnavailable, cpu_kernel
from expertlora.moe import reference_moe
from expertlora.quantize import quantize, resolve_method
from expertlora.tiny import random_expert_lora

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "int8": 1e-2, "int4": 1e-2}
# Error of the quantized engine against the unquantized reference: reported, loosely bounded.
QUANT_ERROR_BOUND = {"fp32": 1e-5, "bf16": 1e-2, "int8": 3e-2, "int4": 0.25}
LAYER = 3


def _compiled_available() -> bool:
    try:
        cpu_kernel()
        return True
    except KernelUnavailable:
        return False


KERNELS = [
    "torch",
    pytest.param("compiled", marks=pytest.mark.skipif(not _compiled_available(), reason="kernel cannot be built here")),
]


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).norm() / ref.norm())


def shape_for(method: str, kernel: str = "compiled") -> tuple[int, int, int]:
    """E, H, I. The compiled kernel wants multiples of 32 (all real models have them), int4 whole
    groups; the PyTorch path also runs other sizes."""
    if method == "int4":
        return 6, 64, 96
    return (6, 40, 24) if kernel == "torch" else (6, 64, 32)


def make_weights(E: int, H: int, I: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(E, I, H, generator=gen) / H**0.5, torch.randn(E, I, H, generator=gen) / H**0.5
    down = torch.randn(E, H, I, generator=gen) / I**0.5
    return gate, up, down


def routing(T: int, E: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=gen) + 0.1
    return ids, weights


def engine_and_adapters(method: str, kernel: str, group_size: int = 32, shape_of: str | None = None):
    E, H, I = shape_for(method, shape_of or kernel)
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I), method=method, group_size=group_size)
    engine = MoELoRAEngine({LAYER: weights}, threads=2, kernel=kernel)
    adapters = {
        "a": random_expert_lora(E, H, I, [LAYER], {"gate": 4, "up": 8, "down": 16}, alpha=8.0, seed=1),
        "b": random_expert_lora(E, H, I, [LAYER], {"gate": 1, "down": 1}, alpha=2.0, use_rslora=True, seed=2),
        "c": random_expert_lora(E, H, I, [LAYER], {"gate": 64, "up": 64, "down": 64}, alpha=64.0, seed=3),
    }
    for name, adapter in adapters.items():
        engine.load_adapter(name, adapter)
    return engine, weights, adapters


def reference(weights: ExpertWeights, x, ids, w, names, adapters, dequantized: bool = True):
    gate, up, down = weights.dequantize() if dequantized else dequantized
    loras = [adapters[n].layers.get(LAYER) if n else None for n in names]
    return reference_moe(x, ids, w, gate, up, down, loras)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["fp32", "bf16", "int8", "int4"])
def test_mixed_batch_matches_reference(method, kernel):
    engine, weights, adapters = engine_and_adapters(method, kernel)
    E, H, _ = shape_for(method, kernel)
    names = ["a", None, "b", "c", "a", None, "c", "b", "a"]
    T = len(names)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(T, H, generator=gen)
    ids, w = routing(T, E, 3, seed=11)
    ids[1, 2] = ids[1, 0]  # the same expert twice for one token
    ids[2, 1] = -1  # an expert that runs elsewhere
    ids[4, 0] = E  # out of range: skipped too
    y = engine.forward(LAYER, x, ids, w, engine.token_slots(names))
    ref = reference(weights, x, ids, w, names, adapters)
    assert y.dtype == x.dtype and y.shape == (T, H)
    assert rel(y, ref) < TOLERANCE[method]
    # Against the unquantized weights: the storage method's own error, bounded loosely.
    gate, up, down = make_weights(*shape_for(method, kernel))
    loras = [adapters[n].layers.get(LAYER) if n else None for n in names]
    assert rel(y, reference_moe(x, ids, w, gate, up, down, loras)) < QUANT_ERROR_BOUND[method]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("T", [23, 64])
def test_many_tokens_per_expert_match_reference(T, method, kernel):
    """Experts with many tokens each (whole register tiles of tokens and rows, and the remainders
    of both: 6 experts, 3 a token, LoRA ranks 1 to 64) against the float64 reference."""
    engine, weights, adapters = engine_and_adapters(method, kernel)
    E, H, _ = shape_for(method, kernel)
    names = [("a", None, "b", "c", "a", "c", None)[t % 7] for t in range(T)]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    ids, w = routing(T, E, 3, seed=T + 1)
    y = engine.forward(LAYER, x, ids, w, engine.token_slots(names))
    assert rel(y, reference(weights, x, ids, w, names, adapters)) < TOLERANCE[method]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["fp32", "bf16", "int8", "int4"])
def test_tokens_without_adapter_get_the_base_bits(method, kernel):
    engine, weights, _ = engine_and_adapters(method, kernel)
    bare = MoELoRAEngine({LAYER: weights}, threads=1, kernel=kernel)
    E, H, _ = shape_for(method, kernel)
    names = [None, "a", None, "c", "b", None]
    x = torch.randn(len(names), H)
    ids, w = routing(len(names), E, 2, seed=5)
    y = engine.forward(LAYER, x, ids, w, engine.token_slots(names))
    base = bare.forward(LAYER, x, ids, w)
    none = torch.tensor([n is None for n in names])
    assert torch.equal(y[none], base[none])
    assert not torch.allclose(y[~none], base[~none])  # the adapters did change the others


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank", [1, 3, 16, 33, 64])
def test_ranks(rank, kernel):
    E, H, I = shape_for("fp32", kernel)
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I), method="fp32")
    engine = MoELoRAEngine({LAYER: weights}, threads=2, kernel=kernel)
    adapter = random_expert_lora(E, H, I, [LAYER], {"gate": rank, "up": rank, "down": rank}, seed=rank)
    engine.load_adapter("x", adapter)
    x = torch.randn(5, H)
    ids, w = routing(5, E, 2, seed=rank)
    y = engine.forward(LAYER, x, ids, w, engine.token_slots(["x"] * 5))
    assert rel(y, reference(weights, x, ids, w, ["x"] * 5, {"x": adapter})) < TOLERANCE["fp32"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_single_token_empty_batch_and_all_skipped(kernel):
    engine, weights, adapters = engine_and_adapters("bf16", kernel)
    E, H, _ = shape_for("bf16", kernel)
    x = torch.randn(1, H, dtype=torch.bfloat16)
    ids, w = routing(1, E, 2, seed=3)
    y = engine.forward(LAYER, x, ids, w, engine.token_slots(["c"]))
    assert y.dtype == torch.bfloat16
    assert rel(y, reference(weights, x, ids, w, ["c"], adapters)) < TOLERANCE["bf16"]

    empty = engine.forward(LAYER, torch.randn(0, H), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, H)

    skipped = engine.forward(LAYER, torch.randn(3, H), torch.full((3, 2), -1), torch.rand(3, 2))
    assert torch.equal(skipped, torch.zeros(3, H))


@pytest.mark.parametrize("kernel", KERNELS)
def test_layer_without_lora_and_thread_count(kernel):
    """An adapter that leaves this layer out gives the base result; threads do not change bits."""
    E, H, I = shape_for("bf16", kernel)
    weights = {L: ExpertWeights.from_tensors(*make_weights(E, H, I, seed=L), method="bf16") for L in (1, 2)}
    one, two = (MoELoRAEngine(weights, threads=n, kernel=kernel) for n in (1, 2))
    for engine in (one, two):
        engine.load_adapter("only1", random_expert_lora(E, H, I, [1], {"gate": 4, "up": 4, "down": 4}))
    x = torch.randn(6, H)
    ids, w = routing(6, E, 2, seed=0)
    slots = one.token_slots(["only1"] * 6)
    assert torch.equal(one.forward(2, x, ids, w, slots), one.forward(2, x, ids, w))
    assert torch.equal(one.forward(1, x, ids, w, slots), two.forward(1, x, ids, w, slots))


def test_compiled_and_torch_paths_agree():
    if not _compiled_available():
        pytest.skip("kernel cannot be built here")
    fast, _, _ = engine_and_adapters("int8", "compiled")
    slow, _, _ = engine_and_adapters("int8", "torch", shape_of="compiled")
    E, H, _ = shape_for("int8")
    names = ["a", "b", None, "c"] * 8
    x = torch.randn(len(names), H)
    ids, w = routing(len(names), E, 4, seed=9)
    ref = slow.forward(LAYER, x, ids, w, slow.token_slots(names)).double()
    assert rel(fast.forward(LAYER, x, ids, w, fast.token_slots(names)), ref) < 1e-2


@pytest.mark.parametrize("kernel", KERNELS)
def test_slots_load_and_unload(kernel):
    E, H, I = shape_for("fp32", kernel)
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I), method="fp32")
    engine = MoELoRAEngine({LAYER: weights}, kernel=kernel)
    lora = {n: random_expert_lora(E, H, I, [LAYER], {"gate": 2, "up": 2, "down": 2}, seed=i) for i, n in enumerate("abc")}
    assert engine.load_adapter("a", lora["a"]) == 0
    assert engine.load_adapter("b", lora["b"]) == 1
    x = torch.randn(4, H)
    ids, w = routing(4, E, 2, seed=1)
    before = engine.forward(LAYER, x, ids, w, engine.token_slots(["b"] * 4))
    engine.unload_adapter("a")
    assert engine.slot("b") == 1  # b keeps its slot
    with pytest.raises(ValueError, match="slot 0 holds no adapter"):
        engine.forward(LAYER, x, ids, w, torch.zeros(4, dtype=torch.long))
    assert torch.equal(engine.forward(LAYER, x, ids, w, engine.token_slots(["b"] * 4)), before)
    assert engine.load_adapter("c", lora["c"]) == 0  # the free slot is reused
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_adapter("c", lora["c"])
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        engine.slot("a")


def test_adapter_for_other_experts_is_refused():
    E, H, I = shape_for("fp32", "torch")
    engine = MoELoRAEngine({LAYER: ExpertWeights.from_tensors(*make_weights(E, H, I), method="fp32")}, kernel="torch")
    with pytest.raises(AdapterError, match="intermediate_size: expected 24"):
        engine.load_adapter("x", random_expert_lora(E, H, I + 1, [LAYER], {"gate": 2}))


def test_bad_routing_shapes_are_refused():
    engine, _, _ = engine_and_adapters("fp32", "torch")
    _, H, _ = shape_for("fp32", "torch")
    with pytest.raises(KernelUnavailable, match="multiples of 32"):
        MoELoRAEngine({LAYER: ExpertWeights.from_tensors(*make_weights(6, 40, 24), method="fp32")}, kernel="compiled")
    with pytest.raises(ValueError, match="topk_ids / topk_weights"):
        engine.forward(LAYER, torch.randn(3, H), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 3))
    with pytest.raises(ValueError, match="x: expected"):
        engine.forward(LAYER, torch.randn(3, H + 1), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantization_error(group_size):
    w = torch.randn(3, 16, 256)
    for method, bound in (("bf16", 4e-3), ("int8", 1e-2), ("int4", 0.15)):
        q = quantize(w, method, group_size)
        err = float((q.dequantize() - w).norm() / w.norm())
        assert 0 < err < bound, (method, err)
    assert quantize(w, "fp32").dequantize().equal(w)
    assert quantize(w, "int4", group_size).nbytes == 3 * 16 * 128 + 3 * 16 * (256 // group_size) * 4


def test_method_names():
    assert [resolve_method(m) for m in ("AMXBF16_SFT", "AMXINT8_SFT", "AMXINT4_SFT", "fp32")] == ["bf16", "int8", "int4", "fp32"]
    with pytest.raises(ValueError, match="unknown method 'int3'"):
        resolve_method("int3")
    with pytest.raises(ValueError, match="group size 48"):
        quantize(torch.randn(1, 4, 96), "int4", 48)


@pytest.mark.parametrize("method", ["fp32", "bf16", "int8", "int4"])
def test_compiled_kernel_at_a_shape_that_splits_into_many_tasks(method):
    """Rows are cut into tasks of about 32 KB: check the cuts at a size where there are many."""
    if not _compiled_available():
        pytest.skip("kernel cannot be built here")
    E, H, I = 4, 256, 512
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I), method=method, group_size=64)
    engine = MoELoRAEngine({LAYER: weights}, threads=2, kernel="compiled")
    adapter = random_expert_lora(E, H, I, [LAYER], {"gate": 8, "up": 8, "down": 8}, seed=4)
    engine.load_adapter("a", adapter)
    names = ["a", None] * 20
    x = torch.randn(len(names), H)
    ids, w = routing(len(names), E, 2, seed=4)
    y = engine.forward(LAYER, x, ids, w, engine.token_slots(names))
    assert rel(y, reference(weights, x, ids, w, names, {"a": adapter})) < TOLERANCE[method]


def test_large_bf16_batches_can_run_on_onednn():
    """With onednn_from set, large bf16 batches take the PyTorch path (AMX through oneDNN)."""
    E, H, I = shape_for("bf16")
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I), method="bf16")
    adapter = random_expert_lora(E, H, I, [LAYER], {"gate": 4, "up": 4, "down": 4}, seed=7)
    engines = {
        "onednn": MoELoRAEngine({LAYER: weights}, kernel="auto", onednn_from=2),
        "torch": MoELoRAEngine({LAYER: weights}, kernel="torch"),
    }
    names = ["a", None, "a"] * 4
    x = torch.randn(len(names), H)
    ids, w = routing(len(names), E, 2, seed=8)
    out = {}
    for key, engine in engines.items():
        engine.load_adapter("a", adapter)
        out[key] = engine.forward(LAYER, x, ids, w, engine.token_slots(names))
    assert torch.equal(out["onednn"], out["torch"])
    assert rel(out["onednn"], reference(weights, x, ids, w, names, {"a": adapter})) < TOLERANCE["bf16"]


def test_onednn_takes_large_bf16_batches_only_where_the_amx_tiles_are_off(monkeypatch):
    """On an AMX CPU the kernel's own tiles beat oneDNN at every size: oneDNN is the default
    for large bf16 batches only with the tiles off (EXPERTLORA_AMX=0)."""
    import expertlora.engine as engine_module

    weights = ExpertWeights.from_tensors(*make_weights(*shape_for("bf16")), method="bf16")
    monkeypatch.setattr(engine_module, "has_amx", lambda: True)
    for tiles_from, expected in ((5, None), (0, engine_module.ONEDNN_TOKENS_PER_EXPERT)):
        monkeypatch.setattr(engine_module, "amx_from", lambda: tiles_from)
        assert MoELoRAEngine({LAYER: weights}, kernel="torch").onednn_from == expected
    monkeypatch.setattr(engine_module, "has_amx", lambda: False)
    assert MoELoRAEngine({LAYER: weights}, kernel="torch").onednn_from is None


def test_a_slightly_larger_batch_reuses_the_kernel_workspace():
    """The kernel keeps its intermediates from call to call and grows them with headroom: a batch
    a little larger than the last (the AMX path's padded blocks vary so with the routing) must
    not allocate them again, which faults every page in anew (~250 ms at 2048 tokens on the
    device). Page faults counted: a regrowth of this ~160 MB workspace adds ~40,000."""
    import resource

    if not _compiled_available():
        pytest.skip("kernel cannot be built here")
    E, H, I, k = 4, 1024, 256, 2
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I), method="bf16")
    engine = MoELoRAEngine({LAYER: weights}, threads=2, kernel="compiled")

    def faults(T: int) -> int:
        x = torch.randn(T, H, dtype=torch.bfloat16)
        ids, w = routing(T, E, k, seed=T)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        engine.forward(LAYER, x, ids, w)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    T = 12_000
    workspace_pages = T * k * (2 * I * 4 + H * 4 + I * 2) // 4096
    faults(T)  # grows the workspace to this size (or finds it larger)
    same = faults(T)
    larger = faults(T + T // 50)
    assert larger < same + workspace_pages // 2, (same, larger, workspace_pages)


def test_falls_back_to_the_pytorch_path_when_the_kernel_cannot_build(monkeypatch):
    import expertlora.engine as engine_module
    import expertlora.kernels as kernels

    def unavailable():
        raise KernelUnavailable("building moe_lora_cpu.cpp failed: no compiler")

    monkeypatch.setattr(engine_module, "cpu_kernel", unavailable)
    kernels.warn_unavailable.cache_clear()
    E, H, I = shape_for("bf16")
    weights = {LAYER: ExpertWeights.from_tensors(*make_weights(E, H, I), method="bf16")}
    with pytest.warns(UserWarning, match="kernel unavailable .*no compiler.*PyTorch path"):
        assert MoELoRAEngine(weights).kernel == "torch"
    with pytest.raises(KernelUnavailable, match="no compiler"):
        MoELoRAEngine(weights, kernel="compiled")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("H", "I", "groups"), [(256, 96, (128, 32)), (64, 160, (64, 32)), (64, 48, (64, 48)), (40, 24, (40, 24))])
def test_int4_group_size_per_projection(kernel, H, I, groups):
    """int4 chooses each projection's group size by its own input size (gate_up: H, down: I): the
    largest of 128 / 64 / 32 dividing it, else one group per row; both paths run the mixed sizes."""
    if kernel == "compiled" and (H % 32 or I % 32):
        pytest.skip("the compiled kernel wants multiples of 32")
    E = 4
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I, seed=21), method="int4")
    assert weights.group_sizes == groups
    assert weights.gate_up.scale.shape == (E, 2 * I, H // groups[0]) and weights.down.scale.shape == (E, H, I // groups[1])
    engine = MoELoRAEngine({LAYER: weights}, threads=2, kernel=kernel)
    assert engine.kernel == kernel
    adapter = random_expert_lora(E, H, I, [LAYER], {"gate": 4, "up": 2, "down": 8}, alpha=8.0, seed=22)
    engine.load_adapter("a", adapter)
    names = ["a", None, "a", "a", None]
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(len(names), H, generator=gen)
    ids, w = routing(len(names), E, 2, seed=24)
    y = engine.forward(LAYER, x, ids, w, engine.token_slots(names))
    assert rel(y, reference(weights, x, ids, w, names, {"a": adapter})) < TOLERANCE["int4"]
    gate, up, down = make_weights(E, H, I, seed=21)
    loras = [adapter.layers[LAYER] if n else None for n in names]
    assert rel(y, reference_moe(x, ids, w, gate, up, down, loras)) < QUANT_ERROR_BOUND["int4"]


def test_int4_forced_group_size():
    E, H, I = 2, 256, 96
    weights = ExpertWeights.from_tensors(*make_weights(E, H, I), method="int4", group_size=32)
    assert weights.group_sizes == (32, 32)
    with pytest.raises(ValueError, match="group size 64: it does not divide the input size 96"):
        ExpertWeights.from_tensors(*make_weights(E, H, I), method="int4", group_size=64)
    with pytest.raises(ValueError, match="group size 48: expected one of 128, 64, 32"):
        quantize(torch.randn(1, 4, 96), "int4", 48)

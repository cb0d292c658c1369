"""The compiled kernel's AMX tile path against its AVX-512 path and the float64 reference.

The dev box has no AMX: the "emulated" variant is a second build of the same source whose six
tile instructions are a scalar emulation (csrc/amx.h, EXPERTLORA_AMX_EMULATE), so the AMX
path's packing, tiling and indexing run here. The "amx" variant is the real build on a CPU
with AMX (skipped elsewhere). The threshold is forced low (every expert with a token on tiles)
or mid (some experts on tiles, the others on AVX-512 in the same call).

Tolerances (relative Frobenius error of the layer output): against the float64 reference on
the method's own dequantized weights, 1e-2 for every method (as tests/test_engine.py);
against the AVX-512 path, 3e-3 for bf16 / int8 (the same bf16 products summed in another
order, then h rounded to bf16) and 1e-2 for int4, whose tiles hold bf16((q - 8) * scale)
where AVX-512 scales each group's fp32 sum.
"""

from __future__ import annotations

import pytest
import torch

from expertlora.engine import MoELoRAEngine
from expertlora.experts import ExpertWeights
from expertlora.kernels import KernelUnavailable, cpu_kernel, has_amx
from expertlora.moe import reference_moe
from expertlora.tiny import random_expert_lora

LAYER = 0
TO_REFERENCE = 1e-2
TO_AVX = {"bf16": 3e-3, "int8": 3e-3, "int4": 1e-2}
# (method, int4 group size, E, H, I): H and I multiples of 32; int4 groups dividing both
CASES = [("bf16", 32, 6, 64, 96), ("int8", 32, 6, 96, 64), ("int4", 32, 6, 64, 96), ("int4", 64, 5, 128, 64)]


def _op(variant: str):
    try:
        if variant == "amx" and not has_amx():
            pytest.skip("the CPU has no AMX")
        return cpu_kernel(emulate_amx=variant == "emulated")
    except KernelUnavailable as err:
        pytest.skip(f"kernel cannot be built here: {err}")


VARIANTS = ["emulated", "amx"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def build(method: str, group: int, E: int, H: int, I: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(E, I, H, generator=gen) / H**0.5 for _ in range(2))
    down = torch.randn(E, H, I, generator=gen) / I**0.5
    weights = ExpertWeights.from_tensors(gate, up, down, method=method, group_size=group)
    adapters = {
        "a": random_expert_lora(E, H, I, [LAYER], {"gate": 4, "up": 8, "down": 16}, alpha=8.0, seed=seed + 1),
        "b": random_expert_lora(E, H, I, [LAYER], {"gate": 1, "down": 3}, alpha=2.0, seed=seed + 2),
        # ranks in whole tiles: the LoRA shrinks run on AMX too (a's down: one 16-row tile)
        "c": random_expert_lora(E, H, I, [LAYER], {"gate": 16, "up": 16, "down": 32}, alpha=16.0, seed=seed + 3),
    }
    return weights, adapters


def engine(weights, adapters, op=None, amx_from: int = 0, threads: int = 2) -> MoELoRAEngine:
    eng = MoELoRAEngine({LAYER: weights}, threads=threads, kernel="compiled")
    for name, adapter in adapters.items():
        eng.load_adapter(name, adapter)
    if op is not None:
        eng._kernel = op
    eng.amx_from = amx_from
    return eng


def inputs(H: int, E: int, T: int = 37, k: int = 3, seed: int = 7):
    """A batch whose routing gives expert 0 every token (whole blocks of 16 and a partial one: T
    is not a multiple of 16), expert 1 exactly one, expert E - 1 none, the others random."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 2, generator=gen)[:k] + 2 for _ in range(T)])  # experts 2 .. E-1
    ids[:, 0] = 0
    ids[T // 2, 1] = 1
    ids[ids == E - 1] = E - 2
    w = torch.rand(T, k, generator=gen) + 0.1
    names = [("a", None, "b", "c", "a", None, "c")[t % 7] for t in range(T)]
    x = torch.randn(T, H, generator=gen)
    return x, ids, w, names


def reference(weights, adapters, x, ids, w, names):
    gate, up, down = weights.dequantize()
    loras = [adapters[n].layers.get(LAYER) if n else None for n in names]
    return reference_moe(x.to(torch.bfloat16), ids, w, gate, up, down, loras)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method,group,E,H,I", CASES)
def test_amx_path_matches_reference_and_avx512(variant, method, group, E, H, I):
    op = _op(variant)
    weights, adapters = build(method, group, E, H, I)
    x, ids, w, names = inputs(H, E)
    avx = engine(weights, adapters)  # the real build, AVX-512 only
    slots = avx.token_slots(names)
    y_avx = avx.forward(LAYER, x, ids, w, slots)
    ref = reference(weights, adapters, x, ids, w, names)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert counts[0] == x.shape[0] and counts[1] >= 1 and counts[E - 1] == 0
    for amx_from in (1, 16):  # every expert on tiles; only those with >= 16 tokens
        y = engine(weights, adapters, op, amx_from).forward(LAYER, x, ids, w, slots)
        assert rel(y, ref) < TO_REFERENCE, amx_from
        assert rel(y, y_avx) < TO_AVX[method], amx_from
        assert not torch.equal(y, y_avx)  # the tiles did run (another summation order)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["bf16", "int4"])
def test_amx_tokens_without_adapter_get_the_base_bits(variant, method):
    op = _op(variant)
    _, group, E, H, I = next(c for c in CASES if c[0] == method)
    weights, adapters = build(method, group, E, H, I, seed=3)
    x, ids, w, names = inputs(H, E, T=21, seed=4)
    with_lora = engine(weights, adapters, op, amx_from=1)
    bare = engine(weights, {}, op, amx_from=1, threads=1)
    y = with_lora.forward(LAYER, x, ids, w, with_lora.token_slots(names))
    base = bare.forward(LAYER, x, ids, w)
    none = torch.tensor([n is None for n in names])
    assert torch.equal(y[none], base[none])
    assert not torch.allclose(y[~none], base[~none])


@pytest.mark.parametrize("variant", VARIANTS)
def test_amx_threshold_off_is_the_avx512_path_and_copied_rows_equal_direct(variant, monkeypatch):
    op = _op(variant)
    method, group, E, H, I = CASES[0]
    weights, adapters = build(method, group, E, H, I, seed=5)
    x, ids, w, names = inputs(H, E, T=40, seed=6)
    slots = engine(weights, adapters).token_slots(names)
    y_avx = engine(weights, adapters).forward(LAYER, x, ids, w, slots)
    assert torch.equal(engine(weights, adapters, op, amx_from=0).forward(LAYER, x, ids, w, slots), y_avx)
    y_big = engine(weights, adapters, op, amx_from=10**6).forward(LAYER, x, ids, w, slots)
    assert torch.equal(y_big, y_avx)  # no expert reaches the threshold
    direct = engine(weights, adapters, op, amx_from=1).forward(LAYER, x, ids, w, slots)
    monkeypatch.setenv("EXPERTLORA_AMX_COPY", "1")  # bf16 A tiles from a copy of the task's rows
    copied = engine(weights, adapters, op, amx_from=1).forward(LAYER, x, ids, w, slots)
    assert torch.equal(direct, copied) and not torch.equal(direct, y_avx)


def test_emulated_and_real_amx_agree():
    if not has_amx():
        pytest.skip("the CPU has no AMX")
    emulated, real = _op("emulated"), _op("amx")
    method, group, E, H, I = CASES[2]
    weights, adapters = build(method, group, E, H, I, seed=8)
    x, ids, w, names = inputs(H, E, T=50, seed=9)
    slots = engine(weights, adapters).token_slots(names)
    y_emu = engine(weights, adapters, emulated, 1).forward(LAYER, x, ids, w, slots)
    y_real = engine(weights, adapters, real, 1).forward(LAYER, x, ids, w, slots)
    assert rel(y_real, y_emu) < 1e-3


def test_amx_from_environment(monkeypatch):
    from expertlora import kernels

    monkeypatch.setattr(kernels, "has_amx", lambda: True)
    monkeypatch.setenv("EXPERTLORA_AMX", "0")
    assert kernels.amx_from() == 0
    monkeypatch.setenv("EXPERTLORA_AMX", "8")
    assert kernels.amx_from() == 8
    monkeypatch.delenv("EXPERTLORA_AMX")
    assert kernels.amx_from() == kernels.AMX_TOKENS_PER_EXPERT
    for bad in ("many", "-1", "nan", "1e3", "²", "9" * 5000):
        monkeypatch.setenv("EXPERTLORA_AMX", bad)
        with pytest.raises(ValueError, match="EXPERTLORA_AMX: expected a token count"):
            kernels.amx_from()
    monkeypatch.setattr(kernels, "has_amx", lambda: False)
    monkeypatch.setenv("EXPERTLORA_AMX", "8")
    assert kernels.amx_from() == 0


@pytest.mark.parametrize("variant", ["avx512", *VARIANTS])
def test_small_and_large_batch_task_layouts_give_the_same_bits(variant):
    """Phases 2 and 4 split small batches by (pair, 64 columns) and large ones (at least 32 pairs
    a thread) by chunks of 8 pairs, the down LoRA expand moving out of the per-token sum: the
    operations per pair are the same, so are the bits. 60 pairs: large for 1 thread, small for 2."""
    op = None if variant == "avx512" else _op(variant)
    method, group, E, H, I = CASES[2]
    weights, adapters = build(method, group, E, H, I, seed=11)
    x, ids, w, names = inputs(H, E, T=20, seed=12)
    runs = [engine(weights, adapters, op, amx_from=0 if op is None else 1, threads=n) for n in (1, 2)]
    slots = runs[0].token_slots(names)
    y1, y2 = (eng.forward(LAYER, x, ids, w, slots) for eng in runs)
    assert torch.equal(y1, y2)

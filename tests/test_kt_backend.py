"""The kt backend (kt-kernel's SFT MoE behind our engine API) against the float64 reference and
our cpu backend. Runs where kt-kernel is installed (CI installs it: pip install --no-deps)."""

from __future__ import annotations

import sys

import pytest
import torch

from expertlora import ExpertWeights, load_adapter
from expertlora.engine import MoELoRAEngine
from expertlora.kt_backend import KtMoEEngine, KtUnavailable, kt_method
from expertlora.moe import reference_moe
from expertlora.tiny import random_expert_lora

from .conftest import rel_err

E, H, I, K, LAYER = 8, 256, 128, 2, 3


def setup(method="bf16"):
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(E, I, H, generator=g) / H**0.5, torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    adapters = {
        "a": random_expert_lora(E, H, I, [LAYER], {"gate": 4, "up": 8, "down": 16}, alpha=8.0, use_rslora=True, seed=1),
        "b": random_expert_lora(E, H, I, [LAYER], {"down": 2}, alpha=4.0, seed=2),
    }
    return (gate, up, down), adapters


def batch(T=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[1, 1] = -1  # an expert that runs elsewhere
    return x, ids, torch.rand(T, K, generator=g)


def test_kt_backend_matches_reference_and_cpu_backend():
    pytest.importorskip("kt_kernel")
    (gate, up, down), adapters = setup()
    weights = ExpertWeights.from_tensors(gate, up, down, "bf16")
    kt, cpu = KtMoEEngine({LAYER: weights}, threads=1), MoELoRAEngine({LAYER: weights}, threads=2)
    for name, adapter in adapters.items():
        kt.load_adapter(name, adapter)
        cpu.load_adapter(name, adapter)
    x, ids, w = batch()
    g, u, d = weights.dequantize()
    for name in ("a", "b", None, "a"):  # switching adapters back and forth
        loras = [adapters[name].layers[LAYER] if name else None] * len(x)
        ref = reference_moe(x, ids, w, g, u, d, loras)
        y = kt.forward(LAYER, x, ids, w, kt.token_slots([name] * len(x)))
        assert rel_err(y, ref) < 1e-2, name
        assert rel_err(y, cpu.forward(LAYER, x, ids, w, cpu.token_slots([name] * len(x)))) < 1e-2, name


def test_kt_int4_stays_close():
    pytest.importorskip("kt_kernel")
    (gate, up, down), adapters = setup()
    kt = KtMoEEngine({LAYER: ExpertWeights.from_tensors(gate, up, down, "bf16")}, kt_method("int4"), threads=1)
    kt.load_adapter("a", adapters["a"])
    x, ids, w = batch()
    ref = reference_moe(x, ids, w, gate, up, down, [adapters["a"].layers[LAYER]] * len(x))
    assert rel_err(kt.forward(LAYER, x, ids, w, kt.token_slots(["a"] * len(x))), ref) < 0.25  # per-row int4 there: 0.17 seen


def test_kt_refusals():
    pytest.importorskip("kt_kernel")
    (gate, up, down), adapters = setup()
    kt = KtMoEEngine({LAYER: ExpertWeights.from_tensors(gate, up, down, "bf16")}, threads=1)
    for name, adapter in adapters.items():
        kt.load_adapter(name, adapter)
    x, ids, w = batch()
    with pytest.raises(ValueError, match="one adapter per batch.*use the cpu backend"):
        kt.forward(LAYER, x, ids, w, kt.token_slots(["a", "b", "a", None, "a"]))
    with pytest.raises(KtUnavailable, match="not int8.*use the cpu backend"):
        kt_method("int8")
    with pytest.raises(KtUnavailable, match="give it bf16 expert weights"):
        KtMoEEngine({LAYER: ExpertWeights.from_tensors(gate, up, down, "int8")})


def test_kt_model_matches_peft(model_dir, fused_adapter):
    pytest.importorskip("kt_kernel")
    from expertlora.integration import load_model

    adapter_dir, peft_model, base = fused_adapter("qwen3_moe")
    ours = load_model(model_dir("qwen3_moe"), "bf16", adapters={"math": load_adapter(adapter_dir, base)}, backend="kt", threads=1)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours.use(["math", "math"])
        logits = ours.model(input_ids=ids).logits.float()
        assert rel_err(logits, peft_model(input_ids=ids).logits) < 5e-2


def test_kt_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kt_kernel", None)  # import fails as if not installed
    (gate, up, down), _ = setup()
    with pytest.raises(KtUnavailable, match="--backend kt needs kt-kernel.*pip install --no-deps kt-kernel"):
        KtMoEEngine({LAYER: ExpertWeights.from_tensors(gate, up, down, "bf16")})


def test_importing_kt_kernel_keeps_this_threads_denormals():
    """kt-kernel's import turns on flush-to-zero in the importing thread (checked here, in a fresh
    interpreter, so the test cannot pass by kt-kernel being imported already); the backend's
    import puts the mode back."""
    pytest.importorskip("kt_kernel")
    import subprocess

    probe = "import torch; print((torch.tensor([1e-39]) * 1.0).item() != 0.0)"
    plain = subprocess.run([sys.executable, "-c", f"import kt_kernel; {probe}"], capture_output=True, text=True, timeout=120)
    kept = subprocess.run([sys.executable, "-c", "from expertlora.kt_backend import keeping_denormals\n"
                           f"with keeping_denormals(): import kt_kernel\n{probe}"], capture_output=True, text=True, timeout=120)
    assert plain.stdout.split()[-1] == "False", plain.stdout + plain.stderr  # what the import does by itself
    assert kept.stdout.split()[-1] == "True", kept.stdout + kept.stderr

"""Reading kt-kernel's converted expert weights (convert_cpu_weights.py output), checked against
files that kt-kernel's own writer produces here (the C++ save path its converter uses) and against
kt-kernel's own SFT forward loading those files. Nothing here checks our reader against itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from expertlora.errors import AdapterError
from expertlora.kt_layout import kt_layout, kt_numa_parts, read_kt_layer
from expertlora.moe import reference_moe
from expertlora.tiny import random_expert_lora

from .conftest import rel_err

LAYER = 3
KT_CLASS = {"int8": "AMXInt8_MOE", "int4": "AMXInt4_MOE"}


def weights(E, H, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16()
    up = (torch.randn(E, I, H, generator=g) / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
    return gate, up, down


def kt_write(path, method, gate, up, down, layer=LAYER):
    """kt-kernel's own quantize-and-save (what convert_cpu_weights.py runs), one NUMA part."""
    from kt_kernel.experts_base import BaseMoEWrapper
    from kt_kernel_ext import moe

    E, I, H = gate.shape
    cpu = BaseMoEWrapper._get_cpu_infer(1, 1)
    tensors = [t.contiguous() for t in (gate, up, down)]  # kept alive until kt has read them
    on_gpu, experts = torch.zeros(E, dtype=torch.bool), torch.arange(E)
    config = moe.MOEConfig(E, 2, H, I, on_gpu.data_ptr())
    config.layer_idx, config.pool, config.max_len = layer, cpu.backend_, 64
    config.save, config.load, config.path = True, False, str(path)
    config.gate_proj, config.up_proj, config.down_proj = (t.data_ptr() for t in tensors)
    writer = getattr(moe, KT_CLASS[method])(config)
    cpu.submit(writer.load_weights_task(experts.data_ptr()))
    cpu.sync()


def kt_quantized(w: torch.Tensor, method: str) -> torch.Tensor:
    """kt-kernel's quantization of bf16 w [..., N, K] in its own fp32 steps, dequantized: what the
    files must hold. INT8: scale amax/127; INT4: scale amax/112, int8 value rounded to a multiple of 16."""
    w = w.float()
    scale = w.abs().amax(-1, keepdim=True) / (127 if method == "int8" else 112)
    q = torch.round(w * (1 / scale)).clamp(-128, 127)
    if method == "int4":
        q = q.sign() * torch.div(q.abs() + 8, 16, rounding_mode="floor") * 16
    return q * scale


def same_values(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same quantized values, up to kt's fp32 scale differing from ours in the last bit (the 0.7.2
    binary), which moves a value sitting on a rounding tie by one step: 2 in 131072 seen. Any
    layout error scrambles nearly all of them."""
    off = ~torch.isclose(got, expected, rtol=1e-6, atol=0)
    step = expected.abs().amax(-1, keepdim=True).expand_as(expected) / 7  # an int4 step, > an int8 one
    assert off.float().mean() < 1e-3 and ((got - expected).abs()[off] <= step[off]).all()


def to_merged_safetensors(kt_dir, out_dir, layer=LAYER):
    """What convert_cpu_weights.py does after kt's save: each .kt file as one 1-D tensor
    (quant bytes as int8, scales as float32) under blk.{L}.ffn_{proj}_exps.{e}.numa.{p}."""
    from safetensors.torch import save_file

    tensors = {}
    for file in (kt_dir / f"_layer_{layer}").glob("_numa_*/*.kt"):
        _, proj, expert, _, kind, _ = file.name.split("_")  # INT4_down_0_4096Byte_quant_.kt
        part = file.parent.name.removeprefix("_numa_")
        key = f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{part}.{'weight' if kind == 'quant' else 'scale'}"
        tensors[key] = torch.from_numpy(np.fromfile(file, dtype=np.int8 if kind == "quant" else np.float32))
    out_dir.mkdir()
    save_file(tensors, str(out_dir / "model.safetensors"))


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("E, H, I", [(4, 256, 128), (1, 4096, 128)])  # 4096 > K_BLOCK: several blocks
def test_reads_kt_writer_files_exactly(tmp_path, method, E, H, I):
    pytest.importorskip("kt_kernel")
    gate, up, down = weights(E, H, I)
    kt_write(tmp_path, method, gate, up, down)
    assert (kt_layout(tmp_path, LAYER), kt_numa_parts(tmp_path, LAYER)) == ("kt", 1)
    ours = read_kt_layer(tmp_path, LAYER, method, E, H, I)
    assert ours.method == method
    for got, w in zip(ours.dequantize(), (gate, up, down)):
        same_values(got, kt_quantized(w, method))


def test_merged_safetensors_read_like_kt_files(tmp_path):
    pytest.importorskip("kt_kernel")
    E, H, I = 4, 256, 128
    kt_write(tmp_path / "kt", "int4", *weights(E, H, I))
    to_merged_safetensors(tmp_path / "kt", tmp_path / "merged")
    assert (kt_layout(tmp_path / "merged", LAYER), kt_numa_parts(tmp_path / "merged", LAYER)) == ("safetensors", 1)
    a, b = read_kt_layer(tmp_path / "kt", LAYER, "AMXINT4", E, H, I), read_kt_layer(tmp_path / "merged", LAYER, "int4", E, H, I)
    assert torch.equal(a.gate_up.data, b.gate_up.data) and torch.equal(a.down.scale, b.down.scale)


TWO_PARTS = textwrap.dedent("""
    import sys, torch
    from kt_kernel.experts_base import BaseMoEWrapper
    from kt_kernel_ext import moe
    path, method, E, H, I = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
    w = torch.load(path + "/w.pt")
    cpu = BaseMoEWrapper._get_cpu_infer(2, 2)
    on_gpu, experts = torch.zeros(E, dtype=torch.bool), torch.arange(E)
    c = moe.MOEConfig(E, 2, H, I, on_gpu.data_ptr())
    c.layer_idx, c.pool, c.max_len, c.save, c.load, c.path = 0, cpu.backend_, 64, True, False, path
    c.gate_proj, c.up_proj, c.down_proj = (w[p].data_ptr() for p in ("gate", "up", "down"))
    writer = getattr(moe, {"int8": "AMXInt8_MOE", "int4": "AMXInt4_MOE"}[method])(c)
    cpu.submit(writer.load_weights_task(experts.data_ptr())); cpu.sync()
""")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_two_numa_parts(tmp_path, method):
    """kt's --threadpool-count 2: gate/up rows and down columns split in halves, a scale per row per part."""
    pytest.importorskip("kt_kernel")
    E, H, I = 2, 256, 256
    gate, up, down = weights(E, H, I)
    torch.save({"gate": gate.contiguous(), "up": up.contiguous(), "down": down.contiguous()}, tmp_path / "w.pt")
    # kt-kernel keeps one thread pool per process, so two parts are written in another one.
    subprocess.run([sys.executable, "-c", TWO_PARTS, str(tmp_path), method, str(E), str(H), str(I)], check=True, capture_output=True)
    assert kt_numa_parts(tmp_path, 0) == 2
    g, u, d = read_kt_layer(tmp_path, 0, method, E, H, I).dequantize()
    half = I // 2
    same_values(g, kt_quantized(gate, method))
    same_values(u, kt_quantized(up, method))
    down_kt = torch.cat([kt_quantized(down[..., :half], method), kt_quantized(down[..., half:], method)], dim=-1)
    if method == "int4":
        same_values(d, down_kt)  # a group never straddles two parts
    else:  # ours has one int8 scale per row: requantized, within half a step of it
        step = down_kt.abs().amax(-1, keepdim=True) / 127
        within = (d - down_kt).abs() <= step * 0.5001  # but for the rare ties of same_values
        assert within.float().mean() > 0.999 and not torch.equal(d, down_kt)


@pytest.mark.parametrize("method, merged", [("int8", False), ("int4", False), ("int4", True)])
def test_kt_engine_loads_converted_files(tmp_path, method, merged):
    """KtMoEEngine(weight_path=...) runs kt-kernel's SFT on its own files; it must compute the
    math on the weights read_kt_layer gives (and so agree with our engines on those weights)."""
    pytest.importorskip("kt_kernel")
    from expertlora.kt_backend import KtMoEEngine, kt_method

    E, H, I, K = 4, 256, 128, 2
    kt_write(tmp_path / "kt", method, *weights(E, H, I))
    path = tmp_path / "kt"
    if merged:
        to_merged_safetensors(path, tmp_path / "merged")
        path = tmp_path / "merged"
    ours = read_kt_layer(path, LAYER, method, E, H, I)
    kt = KtMoEEngine({LAYER: ours}, kt_method(method) if method == "int4" else "AMXINT8_SFT", threads=1, weight_path=str(path))
    adapter = random_expert_lora(E, H, I, [LAYER], {"gate": 4, "down": 8}, alpha=8.0, seed=1)
    kt.load_adapter("a", adapter)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, H, generator=g), torch.rand(6, K, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(6)])
    gate, up, down = ours.dequantize()
    for name in ("a", None):
        ref = reference_moe(x, ids, w, gate, up, down, [adapter.layers[LAYER] if name else None] * len(x))
        y = kt.forward(LAYER, x, ids, w, kt.token_slots([name] * len(x)))
        assert rel_err(y, ref) < 3e-2, name  # kt quantizes activations to int8: 0.018 seen


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(AdapterError, match="neither"):
        kt_layout(tmp_path, 0)
    part = tmp_path / "_layer_0" / "_numa_0"
    part.mkdir(parents=True)
    (part / "INT8_gate_0_100Byte_quant_.kt").write_bytes(bytes(100))
    (part / "INT8_gate_0_128Byte_scale_.kt").write_bytes(bytes(128))
    with pytest.raises(AdapterError, match=r"INT8_gate_0_100Byte_quant_.kt: expected 16384 quant bytes \(INT8 \[64, 256\]\), found 100"):
        read_kt_layer(tmp_path, 0, "int8", 1, 256, 64)
    with pytest.raises(AdapterError, match=r"_numa_0: INT4_gate_0_\*Byte_quant_.kt: expected one file, found 0"):
        read_kt_layer(tmp_path, 0, "int4", 1, 256, 128)
    with pytest.raises(AdapterError, match="multiples of 64"):
        read_kt_layer(tmp_path, 0, "int8", 1, 256, 96)


def test_run_with_kt_weight_path(tmp_path):
    """`expertlora run --kt-weight-path`: a model whose experts come from kt-kernel's converted files,
    on our cpu backend (unpacked, the same weights as read_kt_layer) and on the kt backend (kt-kernel
    loads them itself); bf16 reads the checkpoint, as the seed does; bad paths are one-line errors."""
    pytest.importorskip("kt_kernel")
    import json

    from typer.testing import CliRunner

    from expertlora import tiny
    from expertlora.cli import app
    from expertlora.integration import load_model
    from expertlora.model_config import MoEConfig

    model = tiny.save_checkpoint(tiny.tiny_model("qwen3_moe", hidden_size=256, moe_intermediate_size=128), tmp_path / "model")
    base = MoEConfig.from_model_dir(model)
    state = tiny.tiny_model("qwen3_moe", hidden_size=256, moe_intermediate_size=128).state_dict()
    for L in base.moe_layers:
        gate_up, down = (state[f"model.layers.{L}.mlp.experts.{p}"].bfloat16() for p in ("gate_up_proj", "down_proj"))
        I = base.intermediate_size
        kt_write(tmp_path / "kt", "int8", gate_up[:, :I], gate_up[:, I:], down, layer=L)
    lm = load_model(model, "int8", kt_weight_path=tmp_path / "kt")
    for L in base.moe_layers:
        expected = read_kt_layer(tmp_path / "kt", L, "int8", base.num_experts, base.hidden_size, base.intermediate_size)
        assert torch.equal(lm.engine.layers[L].gate_up.data, expected.gate_up.data)
        assert torch.equal(lm.engine.layers[L].down.scale, expected.down.scale)
    runner = CliRunner()
    for extra in (["--method", "int8"], ["--method", "AMXINT8_SFT", "--backend", "kt"], ["--method", "bf16"]):
        result = runner.invoke(app, ["run", "--model", str(model), "--kt-weight-path", str(tmp_path / "kt"), "--prompt-ids", "3,5,7",
                                     "--max-new-tokens", "3", "--ignore-eos", "--json", "--no-progress", *extra])
        assert result.exit_code == 0, (extra, result.output)
        if "kt" not in extra:  # the kt backend writes its result to the process's real stdout, past the runner
            assert len(json.loads(result.stdout.strip().splitlines()[-1])["token_ids"]) == 3
    missing = runner.invoke(app, ["run", "--model", str(model), "--kt-weight-path", str(tmp_path / "none"), "--method", "int8",
                                  "--prompt-ids", "1"])
    assert missing.exit_code == 2 and "--kt-weight-path" in missing.stderr and "expected a folder" in missing.stderr

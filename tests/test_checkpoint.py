"""Base expert weights from checkpoint directories: every family, single / sharded / fused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from expertlora import MoEConfig, tiny
from expertlora.checkpoint import Checkpoint
from expertlora.errors import AdapterError

from .conftest import FAMILIES


def model_experts(model, layer: int):
    """The transformers 5 model's own stacked experts of ``layer``."""
    experts = model.get_submodule(f"model.layers.{layer}.mlp.experts")
    return experts.gate_up_proj.detach(), experts.down_proj.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_match_the_model(family, model_dir):
    ckpt = Checkpoint(model_dir(family))
    model = tiny.tiny_model(family, seed=0)
    assert ckpt.layout.name == ("mixtral" if family == "mixtral" else "per-expert")
    for L in ckpt.config.moe_layers:
        gate_up, down = model_experts(model, L)
        w = ckpt.experts(L, "fp32")
        assert torch.equal(w.gate_up.data, gate_up) and torch.equal(w.down.data, down)
    int4 = ckpt.experts(ckpt.config.moe_layers[0], "int4", group_size=32) if ckpt.config.hidden_size % 32 == 0 else None
    if int4 is not None:
        assert int4.gate_up.data.dtype == torch.uint8


def test_sharded_and_fused_checkpoints(tmp_path, model_dir):
    """A sharded checkpoint with an index, its experts stored fused (transformers 5 layout)."""
    src = Checkpoint(model_dir("qwen3_moe"))
    tensors = {k: src.tensor(k) for k in src.keys() if ".experts." not in k}
    for L in src.config.moe_layers:
        w = src.experts(L, "fp32")
        tensors[f"model.layers.{L}.mlp.experts.gate_up_proj"] = w.gate_up.data
        tensors[f"model.layers.{L}.mlp.experts.down_proj"] = w.down.data
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((model_dir("qwen3_moe") / "config.json").read_text())
    ckpt = Checkpoint(tmp_path)
    assert ckpt.layout.fused
    for L in src.config.moe_layers:
        assert torch.equal(ckpt.experts(L, "bf16").gate_up.data, src.experts(L, "bf16").gate_up.data)


def test_bad_checkpoints(tmp_path, model_dir):
    with pytest.raises(AdapterError, match="config.json: expected a Hugging Face config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text((model_dir("mixtral") / "config.json").read_text())
    with pytest.raises(AdapterError, match="no .safetensors files"):
        Checkpoint(tmp_path)
    base = MoEConfig.from_model_dir(tmp_path)
    H, I = base.hidden_size, base.intermediate_size
    save_file({"model.layers.0.block_sparse_moe.experts.0.w1.weight": torch.randn(I, H)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    with pytest.raises(AdapterError, match=r"block_sparse_moe.experts.0.w3.weight: expected a tensor"):
        ckpt.experts(0, "fp32")
    save_file({"model.layers.0.block_sparse_moe.experts.0.w1.weight": torch.randn(I + 1, H)}, tmp_path / "model.safetensors")
    with pytest.raises(AdapterError, match=rf"w1.weight: expected \[{I}, {H}\] \(from config.json\), found \[{I + 1}, {H}\]"):
        Checkpoint(tmp_path).experts(0, "fp32")
    save_file({"model.embed_tokens.weight": torch.randn(4, H)}, tmp_path / "model.safetensors")
    with pytest.raises(AdapterError, match="expected expert weights under one of"):
        Checkpoint(tmp_path)


def test_quantized_checkpoints_are_refused(tmp_path, model_dir):
    config = json.loads((model_dir("deepseek_v3") / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="quantization_config: expected an unquantized checkpoint.*found fp8"):
        Checkpoint(tmp_path)


def test_integer_expert_weights_are_refused(tmp_path, model_dir):
    """An expert tensor stored as integers is not a model's weight: one line naming it and its
    dtype (found by the fuzz suite: an I32 down_proj was accepted and run)."""
    import shutil

    from safetensors.torch import load_file

    src = shutil.copytree(model_dir("qwen3_moe"), tmp_path / "model")
    tensors = load_file(src / "model.safetensors")
    key = "model.layers.1.mlp.experts.0.down_proj.weight"
    tensors[key] = (tensors[key] * 100).to(torch.int32)
    save_file(tensors, src / "model.safetensors")
    ckpt = Checkpoint(src)
    with pytest.raises(AdapterError, match=rf"{key}: expected a float tensor .*found I32"):
        ckpt.expert_tensors(1)

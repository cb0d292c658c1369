"""Base-model fidelity: every tensor of the checkpoint loaded, or a one-line error naming the key.

Each family's tiny model has every parameter and persistent buffer drawn at random (norm weights
!= 1, biases != 0, DeepSeek-V3's e_score_correction_bias != 0 with grouped routing, n_group 4 >
topk_group 2), saved with save_pretrained. The reference is transformers' own from_pretrained of
that directory (and PEFT on it, with an adapter). Tolerances, fp32: the non-expert tensors equal
exactly, logits within 1e-4 relative (Frobenius), greedy tokens equal.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from expertlora import MoEConfig, load_adapter, tiny
from expertlora.errors import AdapterError
from expertlora.integration import load_model

from .conftest import FAMILIES, rel_err
from .test_integration import greedy, prompt


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    """family -> checkpoint directory of a tiny model with every tensor random."""
    cache = {}

    def make(family: str):
        if family not in cache:
            model = tiny.tiny_model(family, seed=0, **tiny.ROUTING_OVERRIDES.get(family, {}))
            tiny.randomize_all(model, seed=11)
            cache[family] = tiny.save_checkpoint(model, tmp_path_factory.mktemp(f"{family}_random"))
        return cache[family]

    return make


def reference(model_dir):
    """transformers' own loading of the directory."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_base_matches_transformers(family, random_dir):
    ref = reference(random_dir(family))
    ours = load_model(random_dir(family), "fp32")
    theirs = {k: v for k, v in ref.state_dict().items() if ".experts." not in k}
    mine = {k: v for k, v in ours.model.state_dict().items() if ".experts." not in k}
    assert set(mine) == set(theirs)
    unequal = [k for k in theirs if not torch.equal(mine[k], theirs[k])]
    assert not unequal, f"tensors differ from transformers' loading: {unequal[:3]}"
    ids = prompt(2, 7, seed=21)
    with torch.no_grad():
        assert rel_err(ours.model(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-4
    assert torch.equal(greedy(ours.model, ids), greedy(ref, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_peft(family, random_dir, tmp_path):
    """LoRA on the experts and on non-expert modules (attention; Qwen2-MoE's shared expert too)."""
    from peft import PeftModel

    model_dir = random_dir(family)
    tiny.peft_fused_adapter(reference(model_dir), tmp_path, family=family, r=4, alpha=8.0, seed=12)
    peft_model = PeftModel.from_pretrained(reference(model_dir), str(tmp_path)).eval()  # as a user loads it
    ours = load_model(model_dir, "fp32", adapters={"a": load_adapter(tmp_path, MoEConfig.from_model_dir(model_dir))})
    ids = prompt(2, 6, seed=22)
    with torch.no_grad():
        ours.use(["a", "a"])
        assert rel_err(ours.model(input_ids=ids).logits, peft_model(input_ids=ids).logits) < 1e-4
        assert torch.equal(greedy(ours.model, ids), greedy(peft_model, ids))


def test_deepseek_v3_routing_depends_on_the_loaded_bias_and_groups(random_dir):
    """The DeepSeek-V3 tests above can fail: zeroing the correction bias, or routing without
    groups, changes which experts the checkpoint's router picks."""
    ref = reference(random_dir("deepseek_v3"))
    router = ref.model.layers[1].mlp.gate
    assert 1 < router.num_group and router.topk_group < router.num_group and router.e_score_correction_bias.abs().min() > 0
    h = torch.randn(64, router.hidden_dim, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        chosen = router(h)[2].sort(-1).values
        bias = router.e_score_correction_bias.clone()
        router.e_score_correction_bias.zero_()
        unbiased = router(h)[2].sort(-1).values
        router.e_score_correction_bias.copy_(bias)
        router.num_group, router.topk_group = 1, 1
        ungrouped = router(h)[2].sort(-1).values
    assert (chosen != unbiased).any(-1).sum() >= 8
    assert (chosen != ungrouped).any(-1).sum() >= 8


# Bad checkpoints: one line naming the key.


def edited(src, dst, edit):
    """A copy of checkpoint ``src`` whose tensors ``edit`` (a dict in place) changed."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def refused(model_dir) -> str:
    with pytest.raises(AdapterError) as e:
        load_model(model_dir, "fp32")
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("family, key", [
    ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias"),
    ("qwen3_moe", "model.layers.2.post_attention_layernorm.weight"),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight"),
])
def test_missing_tensor_is_refused(family, key, random_dir, tmp_path):
    message = refused(edited(random_dir(family), tmp_path, lambda t: t.pop(key)))
    model_key = key.replace("block_sparse_moe.gate", "mlp.gate")  # named as the model calls it
    assert f": {model_key}: expected this tensor (a " in message and message.endswith("found none in the checkpoint")


@pytest.mark.parametrize("key, shape", [
    ("model.layers.0.self_attn.bogus.weight", (4, 32)),
    ("model.layers.0.mlp.experts.6.gate_proj.weight", (64, 32)),  # qwen3_moe has experts 0-5
    ("model.layers.0.mlp.experts.03.up_proj.weight", (64, 32)),  # not the key the engine reads
    ("model.layers.3.input_layernorm.weight", (32,)),  # a layer beyond num_hidden_layers
])
def test_unexpected_key_is_refused(key, shape, random_dir, tmp_path):
    message = refused(edited(random_dir("qwen3_moe"), tmp_path, lambda t: t.update({key: torch.randn(shape)})))
    assert f"model.safetensors: {key}: expected only tensors the qwen3_moe model or its routed experts use, found a tensor that maps to neither" in message


def test_shape_mismatch_is_refused(random_dir, tmp_path):
    key = "model.layers.1.input_layernorm.weight"
    message = refused(edited(random_dir("qwen3_moe"), tmp_path, lambda t: t.update({key: torch.randn(33)})))
    assert message.endswith(f"model.safetensors: {key}: expected [32] (from config.json), found [33]")


@pytest.mark.parametrize("family, key", [
    ("deepseek_v3", "model.layers.61.eh_proj.weight"),  # DeepSeek-V3's MTP layer, past its 61 layers
    ("qwen3_moe", "model.layers.0.self_attn.rotary_emb.inv_freq"),  # an old per-layer rotary table
])
def test_keys_transformers_ignores_get_one_notice(family, key, random_dir, tmp_path):
    model_dir = edited(random_dir(family), tmp_path, lambda t: t.update({key: torch.randn(4)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_model(model_dir, "fp32")
    notices = [str(w.message) for w in caught if "expertlora" in str(w.message)]
    assert len(notices) == 1 and key in notices[0] and "\n" not in notices[0]
    ids = prompt(1, 5, seed=24)
    with torch.no_grad():
        assert rel_err(ours.model(input_ids=ids).logits, reference(model_dir)(input_ids=ids).logits) < 1e-4


@pytest.mark.parametrize("stored", ["embedding only", "both, different", "output layer only"])
def test_tied_embeddings_as_transformers_ties_them(stored, tmp_path):
    """tie_word_embeddings: the output layer follows whichever of the two the checkpoint holds;
    holding both with different values unties them (transformers' rule)."""
    model = tiny.tiny_model("qwen3_moe", seed=5, tie_word_embeddings=True)
    tiny.randomize_all(model, seed=13)
    src = tiny.save_checkpoint(model, tmp_path / "src")
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"]
    emb, out = "model.embed_tokens.weight", "lm_head.weight"

    def edit(t):
        if stored == "both, different":
            t[out] = torch.randn(t[emb].shape) / 32**0.5
        elif stored == "output layer only":
            t[out] = t.pop(emb)

    model_dir = edited(src, tmp_path / "ckpt", edit)
    ref, ours = reference(model_dir), load_model(model_dir, "fp32")
    assert (ours.model.lm_head.weight is ours.model.model.embed_tokens.weight) == (stored != "both, different")
    ids = prompt(1, 5, seed=25)
    with torch.no_grad():
        assert rel_err(ours.model(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-4

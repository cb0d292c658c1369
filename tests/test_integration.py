"""Whole models on our engine against transformers + PEFT (fp32: logits within 1e-4 relative,
the same greedy tokens), mixed adapters per sequence, and the quantized methods' errors."""

from __future__ import annotations

import pytest
import torch

from expertlora import load_adapter
from expertlora.integration import load_model

from .conftest import FAMILIES, rel_err

VOCAB = 96


def prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, steps: int = 6, **kw) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_matches_peft(family, model_dir, fused_adapter):
    adapter_dir, peft_model, base = fused_adapter(family)
    ours = load_model(model_dir(family), "fp32", adapters={"math": load_adapter(adapter_dir, base)})
    ids = prompt(2, 7)
    with torch.no_grad():
        ours.use(["math", "math"])
        assert rel_err(ours.model(input_ids=ids).logits, peft_model(input_ids=ids).logits) < 1e-4
        assert torch.equal(greedy(ours.model, ids), greedy(peft_model, ids))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])  # qwen2_moe: LoRA on its shared expert
def test_mixed_batch_picks_each_sequences_adapter(family, model_dir, fused_adapter):
    adapter_dir, peft_model, base = fused_adapter(family)
    ours = load_model(model_dir(family), "fp32", adapters={"math": load_adapter(adapter_dir, base)})
    ids = prompt(3, 5, seed=1)
    with torch.no_grad():
        ours.use(["math", None, "math"])
        logits = ours.model(input_ids=ids).logits
        with_lora = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=ids).logits
    assert rel_err(logits[[0, 2]], with_lora[[0, 2]]) < 1e-4
    assert rel_err(logits[1], without[1]) < 1e-4
    assert rel_err(with_lora[1], without[1]) > 1e-2  # the adapter matters


@pytest.mark.parametrize("method", ["bf16", "int8", "int4"])
def test_quantized_methods_stay_close(method, model_dir, fused_adapter):
    """Logit error against PEFT in fp32 and greedy agreement, bounded loosely (reported in the notes)."""
    adapter_dir, peft_model, base = fused_adapter("qwen3_moe")
    ours = load_model(model_dir("qwen3_moe"), method, adapters={"math": load_adapter(adapter_dir, base)})
    ids = prompt(2, 7, seed=2)
    with torch.no_grad():
        ours.use(["math", "math"])
        logits = ours.model(input_ids=ids).logits.float()
        ref = peft_model(input_ids=ids).logits
    assert rel_err(logits, ref) < {"bf16": 5e-2, "int8": 5e-2, "int4": 0.15}[method]


def test_one_adapter_or_none_for_the_whole_batch(model_dir, fused_adapter):
    """qwen2_moe has LoRA on its shared expert: whole-batch choices work there."""
    adapter_dir, peft_model, base = fused_adapter("qwen2_moe")
    ours = load_model(model_dir("qwen2_moe"), "fp32", adapters={"math": load_adapter(adapter_dir, base)})
    ids = prompt(2, 6, seed=3)
    with torch.no_grad():
        ours.use(["math", "math"])
        lora = ours.model(input_ids=ids).logits
        ours.use([None, None])
        none = ours.model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=ids).logits
        assert rel_err(lora, peft_model(input_ids=ids).logits) < 1e-4
    assert rel_err(none, without) < 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_transformers4_per_expert_adapter(family, tmp_path, model_dir):
    """A v4-style per-expert adapter runs directly. The reference: our fused export of it (checked
    against PEFT's deltas in test_formats), loaded by PEFT onto the transformers 5 model."""
    from peft import PeftModel

    from expertlora import MoEConfig, tiny
    from expertlora.convert import export

    base = MoEConfig.from_model_dir(model_dir(family))
    src = tiny.write_per_expert_adapter(
        tmp_path / "v4", num_layers=list(base.moe_layers), num_experts=base.num_experts, hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size, naming=base.expert_naming, extra_config={"use_rslora": True},
    )
    export(src, tmp_path / "fused", layout="fused", base=base, progress=False)
    peft_model = PeftModel.from_pretrained(tiny.tiny_model(family, seed=0), str(tmp_path / "fused")).eval()
    ours = load_model(model_dir(family), "fp32", adapters={"v4": load_adapter(src, base)})
    ids = prompt(2, 6, seed=4)
    with torch.no_grad():
        ours.use(["v4", "v4"])
        assert rel_err(ours.model(input_ids=ids).logits, peft_model(input_ids=ids).logits) < 1e-4
        assert torch.equal(greedy(ours.model, ids), greedy(peft_model, ids))


def test_tied_output_layer(tmp_path):
    """A checkpoint with tied embeddings: the output layer follows the loaded embedding."""
    from expertlora import tiny

    model = tiny.tiny_model("qwen3_moe", seed=5, tie_word_embeddings=True)
    tiny.save_checkpoint(model, tmp_path)
    ours = load_model(tmp_path, "fp32")
    ids = prompt(1, 5, seed=5)
    with torch.no_grad():
        assert rel_err(ours.model(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5



def test_two_adapters_and_none_in_one_batch_then_unload(tmp_path, model_dir, fused_adapter):
    """qwen2_moe: a fused adapter with shared-expert and attention LoRA, a v4 per-expert adapter
    and no adapter, one sequence each, in one forward; then one is unloaded."""
    from peft import PeftModel

    from expertlora import tiny
    from expertlora.convert import export
    from expertlora.integration import remove_adapter

    adapter_dir, peft_math, base = fused_adapter("qwen2_moe")
    v4 = tiny.write_per_expert_adapter(
        tmp_path / "v4", num_layers=list(base.moe_layers), num_experts=base.num_experts, hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size, r=2, alpha=3.0, seed=9,
    )
    export(v4, tmp_path / "v4_fused", layout="fused", base=base, progress=False)
    peft_v4 = PeftModel.from_pretrained(tiny.tiny_model("qwen2_moe", seed=0), str(tmp_path / "v4_fused")).eval()
    ours = load_model(model_dir("qwen2_moe"), "fp32", adapters={"math": load_adapter(adapter_dir, base), "v4": load_adapter(v4, base)})
    ids = prompt(3, 6, seed=6)
    with torch.no_grad():
        ours.use(["math", "v4", None])
        logits = ours.model(input_ids=ids).logits
        with peft_math.disable_adapter():
            plain = peft_math(input_ids=ids).logits
        assert rel_err(logits[0], peft_math(input_ids=ids).logits[0]) < 1e-4
        assert rel_err(logits[1], peft_v4(input_ids=ids).logits[1]) < 1e-4
        assert rel_err(logits[2], plain[2]) < 1e-4
        remove_adapter(ours, "math")
        ours.use([None, "v4", None])
        again = ours.model(input_ids=ids).logits
    assert torch.equal(again[1], logits[1]) and rel_err(again[0], plain[0]) < 1e-4
    with pytest.raises(KeyError, match="no adapter named 'math'"):
        ours.use(["math", None, None])

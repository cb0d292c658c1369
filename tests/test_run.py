"""`expertlora run`: greedy tokens equal transformers + PEFT's; bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from expertlora.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["run", *map(str, args), "--no-progress"])


@pytest.mark.parametrize("method", ["fp32", "int4"])
def test_run_json_matches_peft_greedy(method, model_dir, fused_adapter):
    adapter_dir, peft_model, _ = fused_adapter("mixtral")
    prompt = [5, 17, 33, 2, 40]
    result = run("--model", model_dir("mixtral"), "--adapter", f"math={adapter_dir}", "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", 6, "--ignore-eos", "--method", method, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["adapter"] == "math" and out["prompt_tokens"] == len(prompt) and out["text"] is None
    assert len(out["token_ids"]) == 6 and out["tokens_per_s"] > 0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    agree = sum(a == b for a, b in zip(out["token_ids"], ref[0, len(prompt):].tolist()))
    assert agree == 6 if method == "fp32" else agree >= 1  # int4: agreement reported, not exact


def test_bad_inputs(tmp_path, model_dir, fused_adapter):
    mixtral, (qwen_adapter, _, _) = model_dir("mixtral"), fused_adapter("qwen3_moe")
    cases = [
        (("--model", mixtral, "--adapter", qwen_adapter, "--prompt-ids", "1,2"), "lora_A.weight"),  # qwen3's experts against mixtral's sizes
        (("--model", tmp_path / "missing", "--prompt-ids", "1,2"), "config.json"),
        (("--model", mixtral, "--adapter", tmp_path / "missing", "--prompt-ids", "1,2"), "missing"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--method", "int5"), "unknown method 'int5'"),
        (("--model", mixtral, "--prompt", "hello"), "no tokenizer files"),
        (("--model", mixtral, "--prompt-ids", "1,x"), "comma-separated token ids"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--use", "other"), "--use 'other'"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--kt-num-gpu-experts", "2"), "need --device cuda"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--gpu-experts", "99"), "--gpu-experts 99: expected 0 to"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--gpu-experts", "1", "--gpu-experts-ratio", "0.5"), "not both"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--device", "tpu"), "--device 'tpu': expected cpu or cuda"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--gpu-prefill-threshold", "16"), "GPU prefill needs --device cuda"),
        (("--model", mixtral, "--prompt-ids", "1,2", "--adapter", f"a={qwen_adapter}", "--adapter", f"a={qwen_adapter}"),
         "the name 'a' is given twice"),
    ]
    if not torch.cuda.is_available():
        cases.append((("--model", mixtral, "--prompt-ids", "1,2", "--device", "cuda"), "no CUDA GPU"))
    for args, needle in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, result.stderr)


def test_seed_flags_are_checked_against_the_adapter(model_dir, fused_adapter):
    adapter_dir, _, _ = fused_adapter("qwen3_moe")
    result = run("--model", model_dir("qwen3_moe"), "--kt-moe-lora-path", adapter_dir, "--kt-moe-lora-rank", 16,
                 "--kt-method", "AMXINT4", "--prompt-ids", "1,2")
    assert result.exit_code == 2 and "--kt-moe-lora-rank 16" in result.stderr


def test_text_prompt_with_the_checkpoints_tokenizer(tmp_path, model_dir):
    import shutil

    from expertlora import tiny

    model = shutil.copytree(model_dir("qwen3_moe"), tmp_path / "model")
    tiny.save_tokenizer(model)
    by_text = run("--model", model, "--prompt", "t5 t17 t33", "--max-new-tokens", 4, "--ignore-eos", "--method", "fp32", "--json")
    by_ids = run("--model", model, "--prompt-ids", "5,17,33", "--max-new-tokens", 4, "--ignore-eos", "--method", "fp32", "--json")
    assert by_text.exit_code == 0, by_text.output
    text, ids = json.loads(by_text.stdout), json.loads(by_ids.stdout)
    assert text["token_ids"] == ids["token_ids"] and text["prompt_tokens"] == 3
    assert text["text"] == " ".join(f"t{i}" for i in text["token_ids"] if i > 1)


@pytest.mark.parametrize(("eos", "ignore_eos", "expected"), [
    ([5, 7], False, [1, 7]), (7, False, [1, 7]), (None, False, [1, 7, 3, 5]), ([5, 7], True, [1, 7, 3, 5]),
])
def test_graph_decode_tokens_stop_after_eos_as_generate_does(eos, ignore_eos, expected):
    """run's CUDA-graph decode runs all steps; its tokens are cut after the first EOS, as
    transformers' generate stops there (kept: the EOS itself)."""
    from types import SimpleNamespace

    from expertlora.run import Sampling, _until_eos

    lm = SimpleNamespace(model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos)))
    assert _until_eos([1, 7, 3, 5], lm, Sampling(ignore_eos=ignore_eos)) == expected


@pytest.mark.parametrize(("family", "key", "value"), [
    ("qwen3_moe", "hidden_act", "bogus"),
    ("deepseek_v3", "rope_parameters", {"rope_type": "bogus"}),
    ("qwen3_moe", "num_experts_per_tok", 7),
    ("mixtral", "num_experts_per_tok", 0),
    ("deepseek_v3", "n_group", 4),
    ("deepseek_v3", "n_group", None),
    ("deepseek_v3", "topk_group", 2),
    ("deepseek_v3", "routed_scaling_factor", float("nan")),
    ("mixtral", "sliding_window", 0),
    ("qwen2_moe", "shared_expert_intermediate_size", 0),
    ("deepseek_v3", "kv_lora_rank", 0),
])
def test_config_fields_transformers_builds_from(tmp_path, model_dir, family, key, value):
    """What transformers reads to build and run the model is checked first: one line naming
    config.json and the key, exit 2 (the fuzz suite found these reaching transformers: an
    internal error, a NaN model answering 0 0, a top-k of 0 routing nothing)."""
    import shutil

    model = shutil.copytree(model_dir(family), tmp_path / family)
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    result = run("--model", model, "--prompt-ids", "5,17,33", "--max-new-tokens", 2, "--method", "fp32")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"config.json: {key}" in result.stderr, result.stderr

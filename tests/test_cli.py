"""The CLI end to end: the README's main command, inspect --json, convert, export-peft."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from expertlora import load_adapter, tiny
from expertlora.cli import app

runner = CliRunner()


def test_demo_passes(tmp_path):
    result = runner.invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "adapter.non_expert").is_dir()


def test_inspect_json_convert_export(fused_adapter, model_dir, tmp_path):
    path, peft_model, base = fused_adapter("qwen2_moe")
    base_dir = str(model_dir("qwen2_moe"))
    result = runner.invoke(app, ["inspect", str(path), "--base", base_dir, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "peft-fused" and report["orientation"] == "new"
    assert report["num_experts"] == base.num_experts and list(report["layers"]) == [str(L) for L in base.moe_layers]
    assert any("shared_expert" in m for m in report["non_expert_modules"])

    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["convert", str(path), "-o", str(out), "--base", base_dir, "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert "non-expert LoRA" in result.output
    result = runner.invoke(app, ["export-peft", str(out), "-o", str(tmp_path / "peft"), "--layout", "per-expert", "--base", base_dir])
    assert result.exit_code == 0, result.output
    back = load_adapter(tmp_path / "peft")  # per-expert needs no base
    ours = tiny.canonical_expert_deltas(back)
    assert tiny.max_rel_error(ours, tiny.peft_expert_deltas(peft_model)) < 1e-2  # bf16 factors

    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "expertlora" in result.output and "bfloat16" in result.output


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("inspect", "convert", "export-peft", "demo"):
        assert command in result.output


def test_readme_python_example(fused_adapter, model_dir, tmp_path):
    import re
    import shutil
    from pathlib import Path

    from expertlora import tiny

    path, _, base = fused_adapter("qwen3_moe")
    model = shutil.copytree(model_dir("qwen3_moe"), tmp_path / "model")
    tiny.save_tokenizer(model)  # the engine example sends text
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S))
    for placeholder in ("path/to/peft_adapter", "path/to/adapter", "path/to/other"):
        code = code.replace(placeholder, str(path))
    code = code.replace("path/to/model", str(model))
    scope: dict = {}
    exec(code, scope)
    E, I, H = base.num_experts, base.intermediate_size, base.hidden_size
    assert scope["delta"].shape == (E, I, H) and scope["lora"].a.shape == (E, 4, H)
    assert scope["y"].shape == (3, H) and scope["y"].dtype == torch.bfloat16
    assert [o.adapter for o in scope["outs"]] == [None, "math"] and all(o.finished for o in scope["outs"])
    assert scope["engine"].adapter_names == ["math", "code"]

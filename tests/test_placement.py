"""Expert placement: masks per strategy, GPU expert counts, routing stats files, and
`expertlora profile` recording the same routing as the model's own routers."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from expertlora.cli import app
from expertlora.errors import AdapterError
from expertlora.integration import load_model
from expertlora.placement import (
    STATS_FORMAT,
    RoutingStats,
    gpu_expert_count,
    gpu_masks,
    parse_placement,
    profile,
    record_routing,
)

runner = CliRunner()


def ids(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().squeeze(1).tolist()


def test_prefix_and_uniform_masks():
    masks = gpu_masks(8, [1, 3], 3, "prefix")
    assert list(masks) == [1, 3] and all(m.dtype == torch.bool and m.shape == (8,) for m in masks.values())
    assert ids(masks[1]) == ids(masks[3]) == [0, 1, 2]
    assert ids(gpu_masks(8, [0], 3, "uniform")[0]) == [0, 2, 5]  # floor(i * 8 / 3)
    assert ids(gpu_masks(8, [0], 4, "uniform")[0]) == [0, 2, 4, 6]
    for strategy in ("prefix", "uniform"):
        assert ids(gpu_masks(8, [0], 8, strategy)[0]) == list(range(8))
        assert ids(gpu_masks(8, [0], 0, strategy)[0]) == []


def test_frequency_masks_pick_the_most_routed_lower_id_first():
    stats = RoutingStats("m", 5, 10, {1: [3, 9, 3, 0, 5], 2: [1, 1, 1, 1, 1]})
    masks = gpu_masks(5, [1, 2], 3, "frequency", stats)
    assert ids(masks[1]) == [0, 1, 4]  # 9, 5, then the tie 3 / 3 goes to expert 0
    assert ids(masks[2]) == [0, 1, 2]  # all tied
    assert all(int(m.sum()) == 3 for m in masks.values())


def test_frequency_needs_matching_stats():
    stats = RoutingStats("m", 5, 10, {1: [1] * 5}, path="stats.json")
    with pytest.raises(ValueError, match="routing stats"):
        gpu_masks(5, [1], 2, "frequency")
    with pytest.raises(AdapterError, match=r"^stats\.json: counts\.2: expected routing counts for MoE layer 2"):
        gpu_masks(5, [1, 2], 2, "frequency", stats)
    with pytest.raises(AdapterError, match=r"^stats\.json: num_experts: expected 6, found 5"):
        gpu_masks(6, [1], 2, "frequency", stats)
    with pytest.raises(ValueError, match="expected 0 to 5"):
        gpu_masks(5, [1], 6, "prefix")
    with pytest.raises(ValueError, match="expected one of prefix, uniform, frequency"):
        gpu_masks(5, [1], 2, "random")


def test_gpu_expert_count():
    assert gpu_expert_count(8) == 0
    assert gpu_expert_count(8, gpu_experts=3) == 3 and gpu_expert_count(8, gpu_experts=8) == 8
    assert gpu_expert_count(8, ratio=0.25) == 2 and gpu_expert_count(8, ratio=1.0) == 8
    assert gpu_expert_count(5, ratio=0.5) == 3 and gpu_expert_count(6, ratio=0.3) == 2  # 2.5 -> 3, 1.8 -> 2
    assert gpu_expert_count(8, ratio=0.0) == 0
    for kwargs, needle in [
        (dict(gpu_experts=2, ratio=0.5), "not both"),
        (dict(gpu_experts=9), "--gpu-experts 9: expected 0 to 8"),
        (dict(gpu_experts=-1), "--gpu-experts -1"),
        (dict(ratio=1.5), "--gpu-experts-ratio 1.5: expected 0 to 1"),
        (dict(ratio=-0.1), "--gpu-experts-ratio -0.1"),
    ]:
        with pytest.raises(ValueError, match=needle):
            gpu_expert_count(8, **kwargs)


def test_stats_round_trip_and_parse_placement(tmp_path):
    stats = RoutingStats("/models/x", 4, 7, {3: [5, 0, 6, 3], 1: [2, 2, 2, 8]})
    path = tmp_path / "sub" / "stats.json"
    stats.save(path)
    assert list(tmp_path.rglob("*")) == [tmp_path / "sub", path]  # no temporary file left
    data = json.loads(path.read_text())
    assert data["format"] == STATS_FORMAT and data["counts"] == {"1": [2, 2, 2, 8], "3": [5, 0, 6, 3]}
    back = RoutingStats.load(path)
    assert back == stats and back.counts[3] == [5, 0, 6, 3] and back.path == str(path)

    assert parse_placement("prefix") == ("prefix", None) and parse_placement("uniform") == ("uniform", None)
    strategy, loaded = parse_placement(str(path))
    assert strategy == "frequency" and loaded == stats
    with pytest.raises(ValueError, match="pass the routing stats JSON file.*expertlora profile"):
        parse_placement("frequency")
    with pytest.raises(ValueError, match="expected prefix, uniform or a routing stats JSON file"):
        parse_placement(str(tmp_path / "missing.json"))


def _bad(data) -> dict:
    good = {"format": STATS_FORMAT, "model": "m", "num_experts": 3, "tokens": 4, "counts": {"1": [1, 2, 5]}}
    return {**good, **data}


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not JSON"),
    (json.dumps(_bad({"format": "other/1"})), "format: expected 'expertlora-routing/1', found 'other/1'"),
    (json.dumps([1, 2]), "format: expected 'expertlora-routing/1', found list"),
    (json.dumps(_bad({"counts": {"1": [1, 2]}})), "counts.1: expected a list of 3 counts (num_experts), found 2 values"),
    (json.dumps(_bad({"counts": {"1": [1, 2, -1]}})), "counts.1: expected an integer >= 0, found -1"),
    (json.dumps(_bad({"counts": {"1": [1, 2, 1.5]}})), "counts.1: expected an integer >= 0, found 1.5"),
    (json.dumps(_bad({"counts": {"x": [1, 2, 3]}})), "counts.x: expected an integer >= 0, found 'x'"),
    (json.dumps(_bad({"counts": {}})), "counts: expected a map"),
    (json.dumps(_bad({"num_experts": 0})), "num_experts: expected an integer >= 1, found 0"),
    (json.dumps(_bad({"tokens": "4"})), "tokens: expected an integer >= 0, found '4'"),
])
def test_bad_stats_files(tmp_path, content, needle):
    path = tmp_path / "stats.json"
    path.write_text(content)
    with pytest.raises(AdapterError) as e:
        RoutingStats.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message


def test_missing_layer_in_loaded_stats_names_the_file(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(_bad({})))
    with pytest.raises(AdapterError, match=f"^{path}: counts.2: expected routing counts for MoE layer 2"):
        gpu_masks(3, [1, 2], 1, "frequency", RoutingStats.load(path))


def _router_recount(loaded, run) -> dict[int, list[int]]:
    """The experts each MoE layer picks, recomputed from its router's inputs by forward hooks
    (Qwen3-MoE router: top-k of softmax(x·Wᵀ), the same as top-k of the logits)."""
    config = loaded.model.config
    counts = {L: torch.zeros(config.num_experts, dtype=torch.int64) for L in loaded.checkpoint.config.moe_layers}

    def hook(layer):
        def count(gate, args, _output):
            logits = args[0].reshape(-1, gate.weight.shape[1]) @ gate.weight.T  # [T, E]
            counts[layer] += torch.bincount(logits.topk(config.num_experts_per_tok).indices.flatten(), minlength=config.num_experts)
        return count

    handles = [loaded.model.get_submodule(f"model.layers.{L}.mlp.gate").register_forward_hook(hook(L)) for L in counts]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {L: c.tolist() for L, c in counts.items()}


def test_record_routing_equals_a_recount_from_the_routers(model_dir):
    loaded = load_model(model_dir("qwen3_moe"), "fp32")
    prompts = [[5, 17, 33, 2, 40], [7, 8, 9]]
    stats_box = {}
    recount = _router_recount(loaded, lambda: stats_box.setdefault("s", profile(loaded, prompts, None, 3)))
    stats = stats_box["s"]
    assert stats.counts == recount and stats.num_experts == 6
    assert stats.tokens == 5 + 3 + 2 * (3 - 1)  # prompts, then each generated token but the last is fed back
    assert all(sum(c) == stats.tokens * 2 for c in stats.counts.values())  # top-2
    bindings = [loaded.model.get_submodule(f"model.layers.{L}.mlp.experts").expertlora for L in stats.counts]
    assert all(b.routing_counts is None for b in bindings)  # recording stops on exit

    with record_routing(loaded) as recorder, torch.no_grad():  # prefill only, by hand
        loaded.use([None])
        recount = _router_recount(loaded, lambda: loaded.model(input_ids=torch.tensor([prompts[0]])))
    assert recorder.counts() == recount and sum(recorder.counts()[0]) == 5 * 2


def profile_cli(*args):
    return runner.invoke(app, ["profile", *map(str, args), "--no-progress"])


def test_profile_cli_writes_stats(tmp_path, model_dir, fused_adapter):
    adapter_dir, _, base = fused_adapter("deepseek_v3")  # MoE layers 1 and 2: layer 0 is dense
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5,17,33,2,40\n\n 7, 8 ,9\n")
    out = tmp_path / "stats.json"
    result = profile_cli("--model", model_dir("deepseek_v3"), "--prompts", prompts, "-o", out,
                         "--adapter", f"math={adapter_dir}", "--max-new-tokens", 4, "--threads", 1)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["format"] == STATS_FORMAT and data["num_experts"] == 6 and data["model"] == str(model_dir("deepseek_v3"))
    assert list(data["counts"]) == [str(L) for L in base.moe_layers] == ["1", "2"]
    assert data["tokens"] == 5 + 3 + 2 * 3
    assert all(sum(c) == data["tokens"] * 2 for c in data["counts"].values())  # top-2
    assert f"{data['tokens']} tokens, 2 MoE layers, 6 experts" in result.stdout and "most used: layer" in result.stdout


def test_profile_cli_text_prompts(tmp_path, model_dir):
    import shutil

    from expertlora import tiny

    model = shutil.copytree(model_dir("qwen3_moe"), tmp_path / "model")
    tiny.save_tokenizer(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("t5 t17 t33\n1,2\n")
    out = tmp_path / "stats.json"
    result = profile_cli("--model", model, "--prompts", prompts, "-o", out, "--max-new-tokens", 0, "--method", "fp32")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["tokens"] == 3 + 2  # prefill only


def test_profile_cli_bad_input(tmp_path, model_dir):
    model = model_dir("qwen3_moe")
    empty, text, big = tmp_path / "empty.txt", tmp_path / "text.txt", tmp_path / "big.txt"
    empty.write_text("\n  \n")
    text.write_text("1,2\nhello world\n")
    big.write_text("1,2,500\n")
    out = tmp_path / "stats.json"
    cases = [
        (("--model", model, "--prompts", empty), f"{empty}: expected at least one prompt"),
        (("--model", model, "--prompts", text), f"{text}: line 2: expected comma-separated token ids"),
        (("--model", model, "--prompts", big), "prompt 1: expected token ids in 0..95, found 500"),
        (("--model", model, "--prompts", tmp_path / "missing.txt"), "no such file"),
        (("--model", tmp_path / "nomodel", "--prompts", big), "config.json"),
        (("--model", model, "--prompts", big, "--use", "other"), "--use 'other'"),
        (("--model", model, "--prompts", big, "--max-new-tokens", -1), "--max-new-tokens -1"),
    ]
    for args, needle in cases:
        result = profile_cli(*args, "-o", out)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, result.stderr)
        assert not out.exists()

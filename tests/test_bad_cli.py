"""The CLI's own part of the bad-input contract: outputs that would hit an input, file modes and
names, values that overflow the output dtype, run / profile options, adapters for modules the base
lacks, shapes kt-kernel cannot run, and errors that are not bad input (one line, exit 1, never a
traceback). Every refusal is one line on stderr and exit code 2, before anything is loaded or
written."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from expertlora import MoEConfig, load_adapter, tiny
from expertlora.cli import app
from expertlora.formats.canonical import FORMAT_TAG, tensor_key

from .conftest import rel_err

runner = CliRunner()
E, H, I, R, ALPHA = 6, 32, 64, 4, 8.0  # the qwen3_moe tiny model's experts
LAYERS = [0, 1]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *needles: str, code: int = 2) -> str:
    """One line on stderr starting with ``error:``, naming every needle, the exit code, no traceback."""
    assert not (result.exception and not isinstance(result.exception, SystemExit)), f"traceback: {result.exception!r}"
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def per_expert(tmp_path: Path, name: str = "adapter", **kw) -> Path:
    spec = dict(num_layers=LAYERS, num_experts=E, hidden_size=H, intermediate_size=I, r=R, alpha=ALPHA)
    return tiny.write_per_expert_adapter(tmp_path / name, **{**spec, **kw})


def canonical(path: Path, dtype: torch.dtype = torch.float32, big: float | None = None) -> Path:
    """Our expertlora/1 file with random factors in ``dtype``; ``big`` put into one of them."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for L in LAYERS:
        for proj in ("gate", "up", "down"):
            d_in, d_out = (I, H) if proj == "down" else (H, I)
            tensors[tensor_key(L, proj, "a")] = (torch.randn(E, R, d_in, generator=g) * 0.2).to(dtype)
            tensors[tensor_key(L, proj, "b")] = (torch.randn(E, d_out, R, generator=g) * 0.2).to(dtype)
    if big is not None:
        tensors[tensor_key(1, "up", "b")][2, 3, 1] = big
    spec = {"rank": R, "alpha": ALPHA, "scaling": ALPHA / R}
    meta = {"format": FORMAT_TAG, "num_experts": str(E), "hidden_size": str(H), "intermediate_size": str(I),
            "layers": json.dumps({str(L): {p: spec for p in ("gate", "up", "down")} for L in LAYERS}),
            "use_rslora": "false", "source_format": "peft-per-expert"}
    save_file(tensors, str(path), metadata=meta)
    return path


# ---- outputs ----------------------------------------------------------------------------------


def test_output_equal_to_or_inside_an_input_is_refused(tmp_path):
    src = per_expert(tmp_path)
    (src / "README.md").write_text("the user's notes")
    before = tree(tmp_path)
    cases = [
        (("convert", src, "-o", src / "adapter_model.safetensors"), "inside the input"),
        (("convert", src / "adapter_model.safetensors", "-o", src / "adapter_model.safetensors"), "the input"),
        (("export-peft", src, "-o", src), "the input"),
        (("export-peft", src, "-o", tmp_path), "holds the input"),
        (("export-peft", src, "-o", src / "sub"), "inside the input"),
        (("convert", src, "-o", src / ".." / "adapter" / "x.safetensors"), "inside the input"),  # the same folder, spelt otherwise
    ]
    for args, needle in cases:
        refused(cli(*args, "--no-progress"), "-o", needle)
        assert tree(tmp_path) == before, args  # the adapter and its README untouched


def test_export_replaces_only_an_adapter_folder(tmp_path):
    src = per_expert(tmp_path)
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(cli("export-peft", src, "-o", mine, "--no-progress"), str(mine), "a folder that also holds 'thesis.tex'")
    assert (mine / "thesis.tex").read_text() == "years of work"
    earlier = tmp_path / "peft"
    for _ in range(2):  # an earlier export is replaced
        assert cli("export-peft", src, "-o", earlier, "--no-progress").exit_code == 0
    assert sorted(p.name for p in earlier.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_output_inside_the_base_model_is_refused(tmp_path, model_dir):
    src, base = per_expert(tmp_path), model_dir("qwen3_moe")
    before = tree(base)
    refused(cli("convert", src, "-o", base / "model.safetensors", "--base", base, "--no-progress"), "-o", "the input")
    refused(cli("export-peft", src, "-o", base / "peft", "--base", base, "--no-progress"), "-o", "inside the input")
    assert tree(base) == before


def test_output_files_get_the_usual_mode(tmp_path, fused_adapter, model_dir):
    path, _, _ = fused_adapter("qwen2_moe")  # with non-expert LoRA: convert writes a PEFT sidecar
    base = model_dir("qwen2_moe")
    old = os.umask(0o022)
    try:
        assert cli("convert", path, "-o", tmp_path / "c.safetensors", "--base", base, "--no-progress").exit_code == 0
        assert cli("export-peft", path, "-o", tmp_path / "peft", "--base", base, "--no-progress").exit_code == 0
    finally:
        os.umask(old)
    written = [tmp_path / "c.safetensors", *(tmp_path / "c.non_expert").iterdir(), *(tmp_path / "peft").iterdir()]
    assert len(written) == 5
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p, oct(p.stat().st_mode))
    for d in (tmp_path / "c.non_expert", tmp_path / "peft"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


def test_output_name_decides_the_format(tmp_path):
    src = per_expert(tmp_path)
    out = tmp_path / "seed.pt"
    result = cli("convert", src, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    obj = torch.load(out, weights_only=True)  # the seed layout, not a safetensors file under a .pt name
    assert obj["metadata"]["lora_rank"] == R and set(obj) == {"metadata", "layer_0", "layer_1"}
    ours, back = load_adapter(src), load_adapter(out)
    for L in LAYERS:
        for proj, lora in ours.layers[L].projections().items():
            assert torch.equal(back.layers[L].projections()[proj].delta(), lora.delta())
    for name, args, needle in [
        ("x.bin", (), "never writes pickle files"),
        ("x.pkl", ("--output-format", "pt"), "never writes pickle files"),
        ("x.pt", ("--output-format", "safetensors"), "read as seed .pt files"),
        ("x.safetensors", ("--output-format", "npz"), "--output-format"),
    ]:
        refused(cli("convert", src, "-o", tmp_path / name, *args, "--no-progress"), name, needle)
        assert not (tmp_path / name).exists()


def test_unwritable_output_names_the_path_given(tmp_path):
    src = per_expert(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [("convert", blocker / "x.safetensors"), ("export-peft", blocker / "peft"),
             ("convert", tmp_path / ("a" * 300 + ".safetensors")), ("export-peft", tmp_path / "new" / ("p" * 300))]
    if Path("/proc").is_dir():  # a file system where nothing new can be created
        cases += [("convert", Path("/proc/x.safetensors")), ("export-peft", Path("/proc/x_peft"))]
    for cmd, out in cases:
        line = refused(cli(cmd, src, "-o", out, "--no-progress"), str(out), "an output path that can be written")
        assert ".tmp-" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "adapter"]  # no temporary, no folder made


def test_disk_full_is_one_line_exit_1_naming_the_output(tmp_path, monkeypatch):
    import expertlora.formats.canonical as canonical

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    src, out = per_expert(tmp_path), tmp_path / "out" / "x.safetensors"
    monkeypatch.setattr(canonical.os, "fsync", full)
    line = refused(cli("convert", src, "-o", out, "--no-progress"), str(out), "No space left on device", code=1)
    assert ".tmp-" not in line and not (tmp_path / "out").exists()


def test_per_expert_export_of_a_fused_adapter(tmp_path, fused_adapter, model_dir):
    """transformers 5's fused layout has gate and up share one A: the per-expert export slices it
    (safetensors refused the shared memory)."""
    path, peft_model, _ = fused_adapter("qwen3_moe")
    out = tmp_path / "per_expert"
    result = cli("export-peft", path, "-o", out, "--layout", "per-expert", "--base", model_dir("qwen3_moe"), "--no-progress")
    assert result.exit_code == 0, result.output
    back = load_adapter(out)
    assert back.info.format == "peft-per-expert"
    assert tiny.max_rel_error(tiny.canonical_expert_deltas(back), tiny.peft_expert_deltas(peft_model)) < 1e-6


@pytest.mark.parametrize(("src_dtype", "big", "out_dtype"), [
    (torch.float32, 3.4e38, "bf16"),  # finite in fp32, past bf16's largest (3.39e38)
    (torch.float32, -3.399e38, "bf16"),  # rounds past bf16's largest, to -inf
    (torch.float64, 1e39, "fp32"),
    (torch.float64, 1e300, "bf16"),
])
@pytest.mark.parametrize("cmd", ["convert", "export-peft"])
def test_narrowing_that_overflows_is_refused(tmp_path, src_dtype, big, out_dtype, cmd):
    src = canonical(tmp_path / "a.safetensors", src_dtype, big)
    out = tmp_path / "out" / ("x.safetensors" if cmd == "convert" else "peft")
    key = tensor_key(1, "up", "b") if cmd == "convert" else "layers.1.mlp.experts.2.up_proj.lora_B.weight"
    layout = ("--layout", "per-expert") if cmd == "export-peft" else ()
    refused(cli(cmd, src, "-o", out, "--dtype", out_dtype, *layout, "--no-progress"), key, "which becomes inf")
    assert not (tmp_path / "out").exists()
    # the same file with the value in range converts
    ok = canonical(tmp_path / "b.safetensors", src_dtype, 1e30)
    result = cli(cmd, ok, "-o", out, "--dtype", out_dtype, *layout, "--no-progress")
    assert result.exit_code == 0, result.output


def test_nonfinite_lora_alpha_is_refused(tmp_path):
    kt = tmp_path / "kt"
    kt.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({tensor_key(0, "gate", "a"): torch.randn(E, R, H, generator=g), tensor_key(0, "gate", "b"): torch.randn(E, I, R, generator=g)},
              str(kt / "fused_expert_lora.safetensors"))
    assert cli("inspect", kt, "--lora-alpha", "16").exit_code == 0
    for value in ("nan", "inf", "-inf"):
        for cmd, out in (("inspect", ()), ("convert", ("-o", tmp_path / "x.safetensors")), ("export-peft", ("-o", tmp_path / "p"))):
            refused(cli(cmd, kt, *out, "--lora-alpha", value), "--lora-alpha", "finite")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "p").exists()


# ---- run and profile options -------------------------------------------------------------------


def run(*args):
    return cli("run", *args, "--no-progress")


def test_run_options_refused_before_loading(tmp_path, model_dir, monkeypatch):
    import expertlora.integration as integration

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(integration, "load_model", never)
    model, adapter = model_dir("qwen3_moe"), per_expert(tmp_path)
    stats = tmp_path / "notes.txt"
    stats.write_text("prefix")
    m = ("--model", model)
    cases = [
        (("--prompt-ids", "1,-1"), "expected token ids in 0..95, found -1"),
        (("--prompt-ids", "5,96"), "expected token ids in 0..95, found 96"),
        (("--prompt-ids", "1,2", "--max-new-tokens", 0), "--max-new-tokens 0: expected at least 1"),
        (("--prompt-ids", "1,2", "--max-new-tokens", 32767), "--max-new-tokens 32767: expected at most 32766"),
        (("--prompt-ids", "1,2", "--threads", 0), "--threads 0"),
        (("--prompt-ids", "1,2", "--threads", 10**6), "--threads 1000000"),
        (("--prompt-ids", "1", "--temperature", "nan"), "--temperature nan"),
        (("--prompt-ids", "1", "--temperature", "inf"), "--temperature inf"),
        (("--prompt-ids", "1", "--temperature", -0.5), "--temperature -0.5"),
        (("--prompt-ids", "1", "--temperature", 1, "--top-p", 0), "--top-p 0.0: expected a number in (0, 1]"),
        (("--prompt-ids", "1", "--temperature", 1, "--top-p", 1.5), "--top-p 1.5"),
        (("--prompt-ids", "1", "--temperature", 1, "--top-p", "nan"), "--top-p nan"),
        (("--prompt-ids", "1", "--temperature", 1, "--top-k", -1), "--top-k -1"),
        (("--prompt-ids", "1", "--top-p", 0.9), "--top-p 0.9: only sampling uses it"),
        (("--prompt-ids", "1", "--top-k", 5), "--top-k 5: only sampling uses it"),
        (("--prompt-ids", "1", "--seed", 3), "--seed 3: only sampling uses it"),
        (("--prompt-ids", "1", "--temperature", 1, "--seed", -1), "--seed -1"),
        (("--prompt-ids", "1", "--placement", "prefx"), "placement 'prefx': expected prefix, uniform or a routing stats JSON file"),
        (("--prompt-ids", "1", "--placement", tmp_path / "missing.json"), "no such file"),
        (("--prompt-ids", "1", "--placement", stats), "neither a strategy nor a .json file"),
        (("--prompt-ids", "1", "--kt-moe-lora-rank", 4), "--kt-moe-lora-rank 4: it states the adapter's rank, but no --adapter"),
        (("--prompt-ids", "1", "--kt-moe-lora-alpha", 8), "no --adapter"),
        (("--prompt-ids", "1", "--adapter", f"none={adapter}"), "the name none is reserved"),
        (("--prompt-ids", "1", "--adapter", tmp_path / "none"), "the name none is reserved"),
        (("--prompt-ids", "1", "--gpu-experts", -1), "--gpu-experts -1: expected 0 to 6"),
        (("--prompt-ids", "1", "--gpu-experts", 7), "--gpu-experts 7: expected 0 to 6"),
        (("--prompt-ids", "1", "--gpu-experts-ratio", "nan"), "--gpu-experts-ratio nan"),
        (("--prompt-ids", "1", "--gpu-experts-ratio", 1.5), "--gpu-experts-ratio 1.5"),
        (("--prompt-ids", "1", "--group-size", 64), "--group-size 64: only our int4 storage"),
        (("--prompt-ids", "1", "--method", "int4", "--group-size", 48), "--group-size 48: expected one of 128, 64, 32"),
        (("--prompt-ids", "1", "--method", "int4", "--group-size", 64), "--group-size 64: expected one of 128, 64, 32 dividing the hidden size 32"),
        (("--prompt-ids", "1", "--device", "cuda:x"), "--device 'cuda:x'"),
        (("--prompt-ids", "1", "--backend", "gpu"), "--backend 'gpu'"),
        (("--prompt-ids", "1", "--max-new-tokens", "many"), "Invalid value for '--max-new-tokens'"),  # click's own parse error
        (("--prompt-ids", "1", "--no-such-option"), "No such option: --no-such-option"),
    ]
    for args, needle in cases:
        refused(run(*m, *args), needle)
    for command in ("run", "profile", "serve"):
        given = {"run": ("--prompt-ids", "1"), "profile": ("--prompts", stats, "-o", tmp_path / "o.json"), "serve": ()}[command]
        refused(cli(command, *given), f"missing the model directory: expertlora {command} MODEL")
    refused(run(*m, "--prompt-ids", "1", tmp_path), "the model is given twice", str(tmp_path))


def test_the_model_as_vllm_takes_it_or_as_sglang_names_it(model_dir):
    model = model_dir("qwen3_moe")
    outputs = [cli("run", *where, "--prompt-ids", "1,2", "--max-new-tokens", 3, "--json") for where in
               ((model,), ("--model", model), ("--model-path", model), (model, "--model", model))]
    assert all(r.exit_code == 0 for r in outputs), [r.stderr for r in outputs]
    assert len({json.loads(r.stdout)["token_ids"].__repr__() for r in outputs}) == 1


def test_profile_options(tmp_path, model_dir):
    model = model_dir("qwen3_moe")
    prompts = tmp_path / "p.txt"
    prompts.write_text("1,2,3\n4,5\n")
    out = tmp_path / "stats.json"
    for args, needle in [
        (("--threads", 0), "--threads 0"),
        (("--method", "int4", "--group-size", 48), "--group-size 48"),
        (("--max-new-tokens", 32767), "--max-new-tokens 32767: expected at most 32765"),
    ]:
        refused(cli("profile", "--model", model, "--prompts", prompts, "-o", out, *args, "--no-progress"), needle)
    refused(cli("profile", "--model", model, "--prompts", prompts, "-o", prompts, "--no-progress"), "-o", "the input")
    assert prompts.read_text() == "1,2,3\n4,5\n" and not out.exists()


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """qwen3_moe with H = 64, I = 48: 48 is a multiple of none of 128 / 64 / 32."""
    model = tiny.tiny_model("qwen3_moe", seed=3, hidden_size=64, moe_intermediate_size=48, head_dim=16)
    return tiny.save_checkpoint(model, tmp_path_factory.mktemp("odd")), model


def test_int4_runs_where_no_group_divides_every_input(odd_model):
    """gate_up's groups are 64 wide (H = 64), down's one per row (I = 48): int4 runs, and its
    logits stay near the fp32 model's."""
    from expertlora.integration import load_model

    path, _ = odd_model
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    lms = {m: load_model(path, m, torch.float32, threads=2) for m in ("fp32", "int4")}
    layer = next(iter(lms["int4"].engine.layers.values()))
    assert layer.group_sizes == (64, 48)
    with torch.no_grad():
        logits = {m: lm.model(input_ids=ids).logits for m, lm in lms.items()}
    assert rel_err(logits["int4"], logits["fp32"]) < 0.1
    result = run("--model", path, "--prompt-ids", "1,2,3", "--method", "int4", "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["token_ids"]) <= 2
    refused(run("--model", path, "--prompt-ids", "1", "--method", "int4", "--group-size", 32), "--group-size 32", "intermediate size 48")


def test_kt_backend_refuses_shapes_kt_kernel_cannot_run(odd_model):
    """kt-kernel segfaulted on I = 48 (bf16) and failed inside its constructor for int4 sizes not
    divisible by 128: refused before it is called. In a subprocess: a crash must not take pytest."""
    import importlib.util

    # not imported here: kt-kernel's library sets flush-to-zero for the whole process (-ffast-math)
    if importlib.util.find_spec("kt_kernel") is None:
        pytest.skip("kt-kernel is not installed")
    from expertlora.kt_backend import KtUnavailable, check_kt_shapes

    check_kt_shapes("AMXBF16_SFT", 64, 96)
    check_kt_shapes("AMXINT4_SFT", 256, 384)
    for method, h, i in (("AMXBF16_SFT", 64, 48), ("AMXBF16_SFT", 16, 32), ("AMXINT4_SFT", 64, 128), ("AMXINT8_SFT", 96, 64)):
        with pytest.raises(KtUnavailable, match="--backend cpu"):
            check_kt_shapes(method, h, i)
    path, _ = odd_model
    for method in ("bf16", "int4"):
        proc = subprocess.run([sys.executable, "-m", "expertlora.cli", "run", "--model", str(path), "--prompt-ids", "1,2", "--backend", "kt",
                               "--method", method, "--max-new-tokens", "1", "--threads", "1", "--no-progress"],
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
        assert "kt-kernel's" in lines[0] and "intermediate 48" in lines[0] and "--backend cpu" in lines[0], lines[0]


# ---- adapters for modules the base does not have -----------------------------------------------


def _with_bogus_module(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(8)
    module = "base_model.model.model.layers.0.self_attn.bogus_proj"
    extra = {f"{module}.lora_A.weight": torch.randn(R, H, generator=g), f"{module}.lora_B.weight": torch.randn(H, R, generator=g)}
    return per_expert(tmp_path, "bogus", extra_tensors=extra,
                      extra_config={"target_modules": r".*experts\.\d+\.(gate|up|down)_proj|.*bogus_proj"})


def test_adapter_for_modules_the_base_lacks(tmp_path, fused_adapter, model_dir):
    qwen2_adapter, _, _ = fused_adapter("qwen2_moe")  # LoRA on shared_expert, which Qwen3-MoE has not
    qwen3 = model_dir("qwen3_moe")
    assert load_adapter(qwen2_adapter, MoEConfig.from_model_dir(qwen3)).info.num_experts == E  # its experts fit
    for src, needle in ((qwen2_adapter, "shared_expert"), (_with_bogus_module(tmp_path), "bogus_proj")):
        for args in (("inspect", src, "--base", qwen3), ("inspect", src, "--base", qwen3, "--quick"),
                     ("convert", src, "-o", tmp_path / "out" / "x.safetensors", "--base", qwen3),
                     ("export-peft", src, "-o", tmp_path / "out" / "peft", "--base", qwen3)):
            refused(cli(*args, "--no-progress"), needle, "a linear module of")
        refused(run("--model", qwen3, "--adapter", src, "--prompt-ids", "1,2", "--method", "fp32"), needle, "a linear module of")
        assert not (tmp_path / "out").exists()
    assert cli("inspect", qwen2_adapter, "--base", model_dir("qwen2_moe")).exit_code == 0  # on its own base it is fine
    # a model type transformers cannot build (remote code): not checked, and said so on one line
    custom = tmp_path / "custom"
    custom.mkdir()
    config = json.loads((qwen3 / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "remote_code_moe"}))
    with pytest.warns(UserWarning, match="model_type 'remote_code_moe' is not one transformers builds; the adapter's 9 non-expert modules are not checked"):
        result = cli("inspect", qwen2_adapter, "--base", custom, "--quick")
    assert result.exit_code == 0, result.output


def test_load_model_takes_adapter_paths(tmp_path, fused_adapter, model_dir):
    from expertlora.integration import load_model

    path, _, base = fused_adapter("qwen3_moe")
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(6))
    out = {}
    for key, adapter in (("object", load_adapter(path, base)), ("str", str(path)), ("path", Path(path))):
        lm = load_model(model_dir("qwen3_moe"), "fp32", adapters={"a": adapter}, threads=2)
        lm.use(["a", None])
        with torch.no_grad():
            out[key] = lm.model(input_ids=ids).logits
    assert torch.equal(out["str"], out["object"]) and torch.equal(out["path"], out["object"])
    with pytest.raises(ValueError, match="no such file"):
        load_model(model_dir("qwen3_moe"), "fp32", adapters={"a": tmp_path / "missing"})


# ---- the top level, and errors that are not bad input -------------------------------------------


def test_version_and_help():
    from expertlora import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"expertlora {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        words = (command.callback.__doc__ or "").split()[:3]
        assert len(words) == 3, f"{name} has no help text"
        row = next((line for line in lines if line.startswith(f"│ {name} ")), "")
        assert " ".join(words) in row, (name, row)
    summary = result.stdout.split("Options")[0]
    for command in ("inspect", "convert", "export", "run", "profile"):
        assert command in summary


def test_unexpected_errors_are_one_line_not_a_traceback(tmp_path, monkeypatch):
    import expertlora.report as report

    src = per_expert(tmp_path)

    def broken(reader):
        raise KeyError("a bug")

    monkeypatch.setattr(report, "describe", broken)
    line = refused(cli("inspect", src), "inspect: internal error (KeyError", "a bug in expertlora", code=1)
    assert "not a problem with the input" in line
    monkeypatch.setenv("EXPERTLORA_TRACEBACK", "1")
    assert isinstance(cli("inspect", src).exception, KeyError)  # the traceback, on request


def test_library_value_errors_are_bad_input(tmp_path, monkeypatch):
    import expertlora.report as report

    def bad(reader):
        raise ValueError("a value\nover two lines \x1b[31mcoloured\x1b[0m")

    monkeypatch.setattr(report, "describe", bad)
    line = refused(cli("inspect", per_expert(tmp_path)), "a value\\nover two lines coloured")
    assert "\x1b" not in line

"""The error policy, through the CLI: every bad adapter (or bad option) gives exit code 2 and ONE line
on stderr, ``error: PATH: KEY: expected X, found Y``, naming the file and the key; and nothing new is
left in the output folder (no output, no sidecar, no ``.NAME.tmp-PID``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from expertlora import MoEConfig, load_adapter, tiny
from expertlora.cli import app
from expertlora.formats.canonical import FORMAT_TAG, KT_FILE_NAME, tensor_key

runner = CliRunner()

COMMANDS = ("inspect", "convert", "export-peft")
# The per-expert adapter used throughout: qwen3_moe / deepseek_v3 tiny sizes, MoE layers of both.
E, H, I, R, ALPHA = 6, 32, 64, 4, 8.0
LAYERS = [1, 2]
WEIGHTS = "adapter_model.safetensors"


# ---- helpers -----------------------------------------------------------------------------------


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> set[str]:
    """Every path under ``folder``, hidden ones included."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def assert_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one line on stderr, naming every needle."""
    assert not (result.exception and not isinstance(result.exception, SystemExit)), f"traceback: {result.exception!r}"
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def run_refused(cmd: str, src, out_folder: Path, *needles: str, args=()) -> str:
    """Run one command on a bad source; the output folder must hold nothing new afterwards."""
    out_folder.mkdir(parents=True, exist_ok=True)
    before = snapshot(out_folder)
    argv = [cmd, src, *args]
    if cmd == "convert":
        argv += ["-o", out_folder / "converted.safetensors"]
    elif cmd == "export-peft":
        argv += ["-o", out_folder / "exported"]
    line = assert_error(cli(*argv), *needles)
    assert snapshot(out_folder) == before, f"{cmd} left {sorted(snapshot(out_folder) - before)}"
    return line


def all_refused(src, tmp_path: Path, *needles: str, args=(), commands=COMMANDS) -> None:
    for cmd in commands:
        run_refused(cmd, src, tmp_path / "out", *needles, args=args)


def per_expert(tmp_path: Path, name: str = "adapter", layers=LAYERS, **kw) -> Path:
    spec = dict(num_layers=list(layers), num_experts=E, hidden_size=H, intermediate_size=I, r=R, alpha=ALPHA)
    return tiny.write_per_expert_adapter(tmp_path / name, **{**spec, **kw})


def pe_key(L: int, e: int, proj: str, ab: str) -> str:
    return f"base_model.model.model.layers.{L}.mlp.experts.{e}.{proj}.lora_{ab}.weight"


def edit_tensors(file: Path, fn) -> None:
    """Rewrite a safetensors file through ``fn(tensors)``, keeping its metadata."""
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, str(file), metadata=meta)


def edit_config(adapter_dir: Path, fn) -> None:
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def stacked_tensors(layers=LAYERS, e=E, h=H, i=I, r=R, seed=3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for L in layers:
        for proj in ("gate", "up", "down"):
            d_in, d_out = (i, h) if proj == "down" else (h, i)
            out[tensor_key(L, proj, "a")] = torch.randn(e, r, d_in, generator=g) * 0.2
            out[tensor_key(L, proj, "b")] = torch.randn(e, d_out, r, generator=g) * 0.2
    return out


def write_canonical(path: Path, tensors=None, layer_ids=LAYERS, **meta_overrides) -> Path:
    """Our ``expertlora/1`` file, written by hand (gate / up / down order, one rank)."""
    spec = {"rank": R, "alpha": ALPHA, "scaling": ALPHA / R}
    meta = {
        "format": FORMAT_TAG, "num_experts": str(E), "hidden_size": str(H), "intermediate_size": str(I),
        "layers": json.dumps({str(L): {p: spec for p in ("gate", "up", "down")} for L in layer_ids}),
        "use_rslora": "false", "source_format": "peft-per-expert", **meta_overrides,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(stacked_tensors(layer_ids) if tensors is None else tensors, str(path), metadata=meta)
    return path


def write_seed_pt(path: Path, layers=LAYERS, mutate=None) -> Path:
    obj = {"metadata": {"lora_rank": R, "lora_alpha": ALPHA}}
    t = stacked_tensors(layers)
    for L in layers:
        obj[f"layer_{L}"] = {f"{p}_lora_{ab}": t[tensor_key(L, p, ab)] for p in ("gate", "up", "down") for ab in "ab"}
    if mutate:
        mutate(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def base_dir(tmp_path: Path, family: str = "qwen3_moe", name: str = "base", **overrides) -> Path:
    """A checkpoint directory holding only config.json, from the tiny config of a family."""
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    tiny.tiny_config(family, **overrides).to_json_file(str(d / "config.json"), use_diff=False)
    return d


@pytest.fixture
def fused_copy(fused_adapter, tmp_path):
    """A private copy of the session's qwen3_moe fused PEFT adapter (non-expert LoRA too), and its base dir."""
    src, _, base = fused_adapter("qwen3_moe")
    dst = tmp_path / "fused"
    shutil.copytree(src, dst)
    return dst, base.path.parent


# ---- the control: the unbroken sources all work ---------------------------------------------------


def test_good_sources_work(tmp_path):
    """Each bad input below is one of these with one thing broken; unbroken, every command succeeds."""
    sources = [per_expert(tmp_path), write_canonical(tmp_path / "canon.safetensors"), write_seed_pt(tmp_path / "seed.pt")]
    for i, src in enumerate(sources):
        for argv in (["inspect", src], ["convert", src, "-o", tmp_path / f"c{i}.safetensors"], ["export-peft", src, "-o", tmp_path / f"e{i}"]):
            result = cli(*argv, "--no-progress")
            assert result.exit_code == 0, (argv, result.stderr, result.exception)
            assert result.stderr == ""


# ---- 1. a missing expert -------------------------------------------------------------------------


def test_missing_expert_in_one_layer(tmp_path):
    src = per_expert(tmp_path)

    def drop(t):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for ab in "AB":
                del t[pe_key(2, 3, proj, ab)]

    edit_tensors(src / WEIGHTS, drop)
    all_refused(src, tmp_path, WEIGHTS, "layers.2.", "experts.3.", "lora_A.weight", f"all {E} experts of layer 2")


def test_missing_last_expert_in_one_layer(tmp_path):
    # The expert count comes from the other layer; the last expert of layer 1 is then missing.
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: [t.pop(pe_key(1, E - 1, "gate_proj", ab)) for ab in "AB"])
    all_refused(src, tmp_path, WEIGHTS, "layers.1.", f"experts.{E - 1}.", "lora_A.weight", f"all {E} experts of layer 1")


def test_missing_expert_message_names_the_real_key(tmp_path):
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: [t.pop(pe_key(1, E - 1, "gate_proj", ab)) for ab in "AB"])
    all_refused(src, tmp_path, WEIGHTS, f"model.layers.1.mlp.experts.{E - 1}.gate_proj.lora_A.weight", commands=("inspect",))


def test_missing_lora_b_of_one_expert(tmp_path):
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: t.pop(pe_key(2, 1, "up_proj", "B")))
    all_refused(src, tmp_path, WEIGHTS, "model.layers.2.mlp.experts.1.up_proj.lora_B.weight", "missing")


def test_missing_partner_in_canonical_file(tmp_path):
    t = stacked_tensors()
    del t[tensor_key(2, "up", "b")]
    src = write_canonical(tmp_path / "canon.safetensors", t)
    all_refused(src, tmp_path, "canon.safetensors", "layers.2.experts.up_lora_b", "missing")


# ---- 2. inconsistent shapes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        (pe_key(2, 2, "gate_proj", "A"), (R - 1, H), f"[{R}, {H}]"),  # another rank
        (pe_key(2, 2, "gate_proj", "A"), (R, H - 2), f"[{R}, {H}]"),  # another in-dim
        (pe_key(2, 2, "up_proj", "B"), (I, R - 1), f"[{I}, {R}]"),  # B does not match its A
        (pe_key(1, 4, "down_proj", "A"), (R, I + 1), f"[{R}, {I}]"),  # down: in-dim is I
        (pe_key(1, 0, "gate_proj", "A"), (R, H, 1), "a 2-D LoRA matrix"),  # not 2-D
    ],
    ids=["rank", "in-dim", "B-vs-A", "down-in-dim", "3-D"],
)
def test_inconsistent_expert_shapes(tmp_path, key, shape, expected):
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: t.__setitem__(key, torch.zeros(shape)))
    short = key.removeprefix("base_model.model.")
    all_refused(src, tmp_path, WEIGHTS, short, expected, args=("--no-progress",))


def test_whole_layer_with_other_hidden_size(tmp_path):
    # every expert of layer 2 agrees with itself, but not with layer 1
    src = per_expert(tmp_path)

    def widen(t):
        for e in range(E):
            t[pe_key(2, e, "gate_proj", "A")] = torch.zeros(R, H + 8)

    edit_tensors(src / WEIGHTS, widen)
    all_refused(src, tmp_path, WEIGHTS, "layers.2.mlp.experts.0.gate_proj.lora_A.weight", f"[{R}, {H}]", f"[{R}, {H + 8}]")


@pytest.mark.parametrize("ours", [True, False], ids=["expertlora", "kt"])
def test_inconsistent_stacked_shapes(tmp_path, ours):
    t = stacked_tensors()
    t[tensor_key(2, "down", "b")] = torch.zeros(E, H + 1, R)
    if ours:
        src = write_canonical(tmp_path / "canon.safetensors", t)
        name, args = "canon.safetensors", ()
    else:
        (tmp_path / "kt").mkdir()
        save_file(t, str(tmp_path / "kt" / KT_FILE_NAME))
        src, name, args = tmp_path / "kt", KT_FILE_NAME, ("--lora-alpha", "8")
    all_refused(src, tmp_path, name, "layers.2.experts.down_lora_b", f"[{E}, {H}, {R}]", f"[{E}, {H + 1}, {R}]", args=args)


def test_inconsistent_expert_count_in_stacked_file(tmp_path):
    t = stacked_tensors()
    t[tensor_key(2, "gate", "a")] = torch.zeros(E - 1, R, H)
    src = write_canonical(tmp_path / "canon.safetensors", t)
    all_refused(src, tmp_path, "canon.safetensors", "layers.2.experts.gate_lora_a", f"[{E}, {R}, {H}]")


def test_inconsistent_seed_pt_shapes(tmp_path):
    def bad(obj):
        obj["layer_2"]["up_lora_b"] = torch.zeros(E, I, R + 1)

    src = write_seed_pt(tmp_path / "seed.pt", mutate=bad)
    all_refused(src, tmp_path, "seed.pt", "layer_2.up_lora_b", f"[{E}, {I}, {R}]")


def test_seed_pt_with_2d_tensor(tmp_path):
    def bad(obj):
        obj[f"layer_{LAYERS[0]}"]["gate_lora_a"] = torch.zeros(R, H)

    src = write_seed_pt(tmp_path / "seed.pt", mutate=bad)
    all_refused(src, tmp_path, "seed.pt", f"layer_{LAYERS[0]}.gate_lora_a")


@pytest.mark.parametrize("layers", ["{not json", "[1, 2]", json.dumps({"1": {"gate": {"rank": R}}})], ids=["not-json", "not-object", "no-alpha"])
def test_canonical_with_corrupt_layers_metadata(tmp_path, layers):
    src = write_canonical(tmp_path / "canon.safetensors", layers=layers)
    all_refused(src, tmp_path, "canon.safetensors", "__metadata__.layers")


def test_canonical_with_non_integer_size_metadata(tmp_path):
    src = write_canonical(tmp_path / "canon.safetensors", num_experts="six")
    all_refused(src, tmp_path, "canon.safetensors", "__metadata__.num_experts")


def test_kt_file_with_rank_zero(tmp_path):
    (tmp_path / "kt").mkdir()
    t = stacked_tensors(r=0)
    save_file(t, str(tmp_path / "kt" / KT_FILE_NAME))
    all_refused(tmp_path / "kt", tmp_path, KT_FILE_NAME, "layers.1.experts", args=("--lora-alpha", "8"))


# ---- 3. NaN / Inf -----------------------------------------------------------------------------------

NONFINITE = pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])


def _poison(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


@NONFINITE
def test_nonfinite_per_expert(tmp_path, value):
    key = pe_key(LAYERS[0], 2, "up_proj", "A")
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: t.__setitem__(key, _poison(t[key], value)))
    all_refused(src, tmp_path, WEIGHTS, key, "finite values", "NaN/Inf")
    assert_error(cli("inspect", src, "--json"), key, "finite values")
    assert cli("inspect", src, "--quick").exit_code == 0  # --quick reads shapes only


@NONFINITE
def test_nonfinite_per_expert_last_layer(tmp_path, value):
    # convert has already written layer 1 into its temporary file when layer 2 fails
    key = pe_key(LAYERS[-1], 5, "down_proj", "B")
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: t.__setitem__(key, _poison(t[key], value)))
    all_refused(src, tmp_path, WEIGHTS, key, "finite values", "NaN/Inf")


@NONFINITE
@pytest.mark.parametrize("where", ["expert", "non-expert"])
def test_nonfinite_fused_peft(fused_copy, tmp_path, value, where):
    # convert writes the expert file and the non-expert sidecar: neither (nor their temporaries) may stay
    src, base = fused_copy
    with safe_open(src / WEIGHTS, framework="pt") as f:
        keys = list(f.keys())
    if where == "expert":
        key = next(k for k in keys if "layers.2.mlp.experts.base_layer.lora_B" in k)
    else:
        key = next(k for k in keys if "layers.2.self_attn.o_proj.lora_A" in k)
    edit_tensors(src / WEIGHTS, lambda t: t.__setitem__(key, _poison(t[key], value)))
    all_refused(src, tmp_path, WEIGHTS, key, "finite values", args=("--base", base))


@NONFINITE
def test_nonfinite_canonical_and_seed_pt(tmp_path, value):
    t = stacked_tensors()
    t[tensor_key(2, "down", "b")] = _poison(t[tensor_key(2, "down", "b")], value)
    src = write_canonical(tmp_path / "canon.safetensors", t)
    all_refused(src, tmp_path, "canon.safetensors", "layers.2.experts.down_lora_b", "finite values")

    def bad(obj):
        obj["layer_2"]["gate_lora_a"] = _poison(obj["layer_2"]["gate_lora_a"], value)

    seed = write_seed_pt(tmp_path / "seed.pt", mutate=bad)
    all_refused(seed, tmp_path, "seed.pt", "layer_2.gate_lora_a", "finite values")


# ---- 4. the adapter against --base MODEL_DIR ---------------------------------------------------------


def test_good_adapter_matches_base(tmp_path):
    # the control for the cases below: the same adapter and the unchanged base agree
    src = per_expert(tmp_path)
    for family in ("qwen3_moe", "deepseek_v3"):
        result = cli("inspect", src, "--base", base_dir(tmp_path, family, name=family), "--no-progress")
        assert result.exit_code == 0, result.stderr


BASE_MISMATCH = [
    # (config overrides, what the per-expert reader says, what check_against_base says for a stacked file)
    (dict(num_experts=8), ("layers.1.", "experts.6.", "lora_A.weight", "all 8 experts of layer 1"), ("num_experts", "expected 8", f"found {E}")),
    (dict(num_experts=4), ("model.layers.1.mlp.experts.4.gate_proj.lora_A.weight", "expert ids below 4"), ("num_experts", "expected 4", f"found {E}")),
    (dict(hidden_size=40), ("model.layers.1.mlp.experts.0.gate_proj.lora_A.weight", f"[{R}, 40]", f"[{R}, {H}]"), ("hidden_size", "expected 40", f"found {H}")),
    (dict(moe_intermediate_size=20), ("model.layers.1.mlp.experts.0.gate_proj.lora_B.weight", f"[20, {R}]", f"[{I}, {R}]"), ("moe_intermediate_size", "expected 20", f"found {I}")),
]


@pytest.mark.parametrize("overrides, pe_needles, stacked_needles", BASE_MISMATCH, ids=["more-experts", "fewer-experts", "hidden", "intermediate"])
def test_base_size_mismatch(tmp_path, overrides, pe_needles, stacked_needles):
    base = base_dir(tmp_path, **overrides)
    cfg = MoEConfig.from_model_dir(base)
    assert (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size) != (E, H, I)
    all_refused(per_expert(tmp_path), tmp_path, WEIGHTS, *pe_needles, args=("--base", base))
    canon = write_canonical(tmp_path / "canon.safetensors")
    all_refused(canon, tmp_path, "canon.safetensors", *stacked_needles, str(base / "config.json"), args=("--base", base))


@pytest.mark.parametrize("overrides", [dict(num_experts=8), dict(hidden_size=40), dict(moe_intermediate_size=20)], ids=["experts", "hidden", "intermediate"])
def test_base_size_mismatch_fused(fused_copy, tmp_path, overrides):
    src, _ = fused_copy
    base = base_dir(tmp_path, **overrides)
    all_refused(src, tmp_path, WEIGHTS, "model.layers.0.mlp.experts.", args=("--base", base))


DENSE_OR_BEYOND = [
    ("deepseek_v3", dict(first_k_dense_replace=2), (2,), "layers.1", "a dense layer"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), (0, 2), "layers.1", "a dense layer"),
    ("qwen3_moe", dict(decoder_sparse_step=2), (1,), "layers.2", "a dense layer"),
    ("qwen3_moe", dict(num_layers=2), (0, 1), "layers.2", "beyond the model's 2 layers"),
]


@pytest.mark.parametrize("family, overrides, moe_layers, key, found", DENSE_OR_BEYOND, ids=["deepseek-first-k-dense", "qwen-mlp-only", "qwen-sparse-step", "beyond"])
def test_adapter_layer_not_a_moe_layer_of_base(tmp_path, family, overrides, moe_layers, key, found):
    base = base_dir(tmp_path, family, **overrides)
    assert MoEConfig.from_model_dir(base).moe_layers == moe_layers
    all_refused(per_expert(tmp_path), tmp_path, WEIGHTS, f"{key}: ", found, str(base / "config.json"), args=("--base", base))
    canon = write_canonical(tmp_path / "canon.safetensors")
    all_refused(canon, tmp_path, "canon.safetensors", f"{key}: ", found, args=("--base", base))


def test_deepseek_layer_zero_is_dense(tmp_path):
    base = base_dir(tmp_path, "deepseek_v3")  # first_k_dense_replace=1
    src = per_expert(tmp_path, layers=[0, 1])
    all_refused(src, tmp_path, WEIGHTS, "layers.0: ", "a dense layer", "MoE layers: 1-2", args=("--base", base))


def test_layer_beyond_the_model(tmp_path):
    base = base_dir(tmp_path, "qwen3_moe")  # 3 layers
    src = per_expert(tmp_path, layers=[1, 5])
    all_refused(src, tmp_path, WEIGHTS, "layers.5: ", "beyond the model's 3 layers", args=("--base", base))


def test_bad_base_config(tmp_path):
    src = per_expert(tmp_path)
    empty = tmp_path / "empty_base"
    empty.mkdir()
    all_refused(src, tmp_path, str(empty / "config.json"), "no such file", args=("--base", empty))
    dense = tmp_path / "dense_base"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}))
    all_refused(src, tmp_path, str(dense / "config.json"), "num_experts", args=("--base", dense))
    broken = tmp_path / "broken_base"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    all_refused(src, tmp_path, str(broken / "config.json"), "valid JSON", args=("--base", broken))


# ---- 5. a fused adapter whose shapes fit both orientations --------------------------------------------


@pytest.fixture(scope="module")
def ambiguous(tmp_path_factory):
    """qwen3_moe with H == 2I and LoRA on gate_up_proj only: the new and old PEFT layouts have the same shapes."""
    root = tmp_path_factory.mktemp("ambiguous")
    model = tiny.tiny_model("qwen3_moe", hidden_size=48, moe_intermediate_size=24, num_attention_heads=4, head_dim=12)
    base = root / "base"
    base.mkdir()
    model.config.to_json_file(str(base / "config.json"))
    peft_model = tiny.peft_fused_adapter(model, root / "adapter", family="qwen3_moe", experts=("gate_up_proj",), non_expert=False)
    edit_config(root / "adapter", lambda cfg: cfg.pop("peft_version"))
    return root / "adapter", base, peft_model


def test_ambiguous_orientation_is_refused(ambiguous, tmp_path):
    src, base, _ = ambiguous
    cfg = MoEConfig.from_model_dir(base)
    assert cfg.hidden_size == 2 * cfg.intermediate_size
    all_refused(src, tmp_path, "adapter_config.json", "peft_version", "--orientation", args=("--base", base))


def test_ambiguous_orientation_forced_new_matches_peft(ambiguous, tmp_path):
    src, base, peft_model = ambiguous
    out = tmp_path / "out" / "canon.safetensors"
    result = cli("convert", src, "--base", base, "--orientation", "new", "-o", out, "--no-progress")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    adapter = load_adapter(out)
    assert adapter.info.orientation == "new"
    assert tiny.max_rel_error(tiny.canonical_expert_deltas(adapter), tiny.peft_expert_deltas(peft_model)) < 1e-6
    assert cli("inspect", src, "--base", base, "--orientation", "new").exit_code == 0


# ---- 6. a fused adapter without a base ---------------------------------------------------------------


@pytest.mark.parametrize("base_model", [None, "Qwen/Qwen3-30B-A3B", "missing-local-dir"])
def test_fused_without_base(fused_copy, tmp_path, base_model):
    src, _ = fused_copy
    if base_model == "missing-local-dir":
        base_model = str(tmp_path / "no_such_model")
    edit_config(src, lambda cfg: cfg.__setitem__("base_model_name_or_path", base_model))
    all_refused(src, tmp_path, WEIGHTS, "--base", "num_experts")


# ---- 7. pickles are never loaded ----------------------------------------------------------------------

def _unpickled(path: str):
    """Run only if a pickle is really unpickled: leaves a marker file."""
    Path(path).write_text("unpickled")
    return {}


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_unpickled, (self.marker,))


class Plain:
    def __init__(self):
        self.tensor = torch.zeros(2)


def test_pickle_bin_directory_refused(tmp_path):
    src = tmp_path / "bin_adapter"
    src.mkdir()
    torch.save({pe_key(1, 0, "gate_proj", "A"): torch.zeros(R, H)}, src / "adapter_model.bin")
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": R, "lora_alpha": ALPHA}))
    all_refused(src, tmp_path, "adapter_model.bin", "pickle")


def test_bin_file_refused(tmp_path):
    marker = tmp_path / "marker"
    src = tmp_path / "weights.bin"
    torch.save(Payload(str(marker)), src)
    all_refused(src, tmp_path, "weights.bin", ".bin")
    assert not marker.exists()


def test_pt_with_python_object_refused_without_unpickling(tmp_path):
    marker = tmp_path / "marker"
    src = tmp_path / "evil.pt"
    torch.save({"metadata": Payload(str(marker))}, src)
    all_refused(src, tmp_path, "evil.pt", "weights_only")
    assert not marker.exists(), "the .pt file was unpickled"
    plain = tmp_path / "plain.pt"
    torch.save(Plain(), plain)
    all_refused(plain, tmp_path, "plain.pt", "weights_only")


def test_pt_with_wrong_layout_refused(tmp_path):
    src = tmp_path / "tensors.pt"
    torch.save({"a": torch.zeros(2)}, src)
    all_refused(src, tmp_path, "tensors.pt", "metadata")


# ---- 8. the PEFT config and foreign tensors ----------------------------------------------------------


@pytest.mark.parametrize("as_file", [False, True], ids=["dir", "file"])
def test_missing_adapter_config(tmp_path, as_file):
    src = per_expert(tmp_path)
    (src / "adapter_config.json").unlink()
    all_refused(src / WEIGHTS if as_file else src, tmp_path, str(src / "adapter_config.json"), "no such file")


def test_invalid_adapter_config_json(tmp_path):
    src = per_expert(tmp_path)
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,,}')
    all_refused(src, tmp_path, str(src / "adapter_config.json"), "valid JSON")


def test_adapter_config_not_an_object(tmp_path):
    src = per_expert(tmp_path)
    (src / "adapter_config.json").write_text("[1, 2]")
    all_refused(src, tmp_path, "adapter_config.json")


def test_adapter_config_bad_rank_pattern(tmp_path):
    src = per_expert(tmp_path, extra_config={"rank_pattern": {"layers.(1": 8}})
    all_refused(src, tmp_path, "adapter_config.json", "rank_pattern")


@pytest.mark.parametrize(
    "key, value",
    [("use_dora", True), ("fan_in_fan_out", True), ("lora_bias", True), ("peft_type", "IA3"), ("r", 0), ("lora_alpha", "8")],
)
def test_unsupported_adapter_config(tmp_path, key, value):
    src = per_expert(tmp_path, extra_config={key: value})
    all_refused(src, tmp_path, "adapter_config.json", f": {key}: ")


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.lm_head.modules_to_save.default.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
    ],
    ids=["dora-magnitude", "modules_to_save", "embedding"],
)
def test_non_lora_tensor_refused(tmp_path, key):
    src = per_expert(tmp_path, extra_tensors={key: torch.zeros(H)})
    all_refused(src, tmp_path, WEIGHTS, key, "lora_A / lora_B")


def test_not_a_safetensors_file(tmp_path):
    src = tmp_path / "junk.safetensors"
    src.write_bytes(b"\x00\x01 definitely not safetensors")
    all_refused(src, tmp_path, "junk.safetensors", "a safetensors file")


def test_empty_safetensors_file(tmp_path):
    src = tmp_path / "empty.safetensors"
    save_file({}, str(src))
    all_refused(src, tmp_path, "empty.safetensors", "an empty file")


def test_fused_adapter_without_target_parameters(fused_copy, tmp_path):
    src, base = fused_copy
    edit_config(src, lambda cfg: cfg.__setitem__("target_parameters", None))
    all_refused(src, tmp_path, "adapter_config.json", "target_parameters", args=("--base", base))


def test_directory_without_adapter(tmp_path):
    src = tmp_path / "nothing_here"
    src.mkdir()
    all_refused(src, tmp_path, "nothing_here", WEIGHTS, KT_FILE_NAME)


# ---- 9. a nonexistent path, bad option values -----------------------------------------------------


def test_nonexistent_path(tmp_path):
    all_refused(tmp_path / "no_such_adapter", tmp_path, "no_such_adapter", "no such file")


def test_nonexistent_base(tmp_path):
    all_refused(per_expert(tmp_path), tmp_path, "no_such_model", args=("--base", tmp_path / "no_such_model"))


@pytest.mark.parametrize(
    "cmd, option, value",
    [
        ("convert", "--output-format", "gguf"),
        ("convert", "--dtype", "fp8"),
        ("export-peft", "--dtype", "float16"),
        ("export-peft", "--layout", "stacked"),
        ("inspect", "--orientation", "sideways"),
        ("convert", "--orientation", "sideways"),
        ("export-peft", "--orientation", "sideways"),
    ],
)
def test_bad_option_value(tmp_path, cmd, option, value):
    src = per_expert(tmp_path)
    run_refused(cmd, src, tmp_path / "out", option, repr(value), args=(option, value))


# ---- 10. the seed .pt holds one rank ------------------------------------------------------------------


def test_pt_output_refuses_ranks_differing_between_layers(tmp_path):
    src = per_expert(
        tmp_path,
        rank_of=lambda L, name: 8 if L == 2 else R,
        extra_config={"rank_pattern": {r"layers\.2\.mlp\.experts\.\d+\.(gate|up|down)_proj": 8}},
    )
    assert {L: s["gate"].rank for L, s in load_adapter(src).info.layers.items()} == {1: R, 2: 8}
    out = tmp_path / "out"
    line = run_refused("convert", src, out, WEIGHTS, "one rank", "found 2", args=("--output-format", "pt"))
    assert "use safetensors" in line


def test_pt_output_refuses_fused_with_rank_pattern(fused_copy, tmp_path):
    # the session's fused adapter has rank 8 on layer 0 down_proj: no .pt, and no non-expert sidecar either
    src, base = fused_copy
    run_refused("convert", src, tmp_path / "out", WEIGHTS, "one rank", args=("--base", base, "--output-format", "pt"))


# ---- the output path ------------------------------------------------------------------------------


def _nan_adapter(tmp_path: Path) -> Path:
    key = pe_key(LAYERS[0], 0, "gate_proj", "A")
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: t.__setitem__(key, _poison(t[key], float("nan"))))
    return src


@pytest.mark.parametrize("cmd", ["convert", "export-peft"])
def test_failed_run_creates_no_output_parents(tmp_path, cmd):
    src = _nan_adapter(tmp_path)
    out = tmp_path / "new_folder" / "deeper" / ("x.safetensors" if cmd == "convert" else "peft")
    assert_error(cli(cmd, src, "-o", out), "finite values")
    assert not (tmp_path / "new_folder").exists()


def test_failed_run_keeps_an_existing_output(tmp_path):
    src = _nan_adapter(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "converted.safetensors").write_bytes(b"previous")
    (out / "exported").mkdir()
    (out / "exported" / "adapter_config.json").write_text("{}")
    run_refused("convert", src, out, "finite values")
    run_refused("export-peft", src, out, "finite values")
    assert (out / "converted.safetensors").read_bytes() == b"previous"
    assert (out / "exported" / "adapter_config.json").read_text() == "{}"


def test_convert_onto_existing_directory_is_refused(fused_copy, tmp_path):
    src, base = fused_copy
    target = tmp_path / "models"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = cli("convert", src, "--base", base, "-o", target, "--no-progress")
    assert (target / "keep.txt").is_file(), "convert deleted the directory given as -o"
    assert_error(result, str(target))


def test_export_onto_existing_file_leaves_nothing(fused_copy, tmp_path):
    src, base = fused_copy
    out = tmp_path / "out"
    out.mkdir()
    (out / "exported").write_text("a file")
    before = snapshot(out)
    result = cli("export-peft", src, "--base", base, "-o", out / "exported", "--no-progress")
    assert snapshot(out) == before, f"left {sorted(snapshot(out) - before)}"
    assert_error(result, "exported")

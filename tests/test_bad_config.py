"""The bad-input contract for what the readers take from files: adapter_config.json, config.json,
index.json, safetensors headers and metadata, seed .pt files, rank / alpha patterns.

Through the CLI (``all_refused``: exit 2, one stderr line, nothing left in the output folder)
where a command reads the file; through the library (AdapterError, nothing else) for the
checkpoint and for the generated malformed variants at the end.
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from .test_bad_input import (  # noqa: F401 - fused_copy is a fixture
    ALPHA, E, H, I, LAYERS, R, WEIGHTS, all_refused, assert_error, base_dir, cli, edit_config, edit_tensors, fused_copy, pe_key,
    per_expert, stacked_tensors, write_canonical, write_seed_pt,
)

from expertlora import MoEConfig, load_adapter, open_adapter
from expertlora.checkpoint import Checkpoint
from expertlora.errors import AdapterError
from expertlora.formats.canonical import KT_FILE_NAME, tensor_key
from expertlora.linear_regex import MAX_STATES, PatternError, PatternSet
from expertlora.peft_config import PeftLoraConfig

CONFIG = "adapter_config.json"


def raw_config(adapter_dir: Path, text: str | bytes) -> None:
    path = adapter_dir / CONFIG
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def config_text(adapter_dir: Path) -> str:
    return (adapter_dir / CONFIG).read_text()


# ---- adapter_config.json: the file itself ---------------------------------------------------------


def test_config_invalid_utf8(tmp_path):
    src = per_expert(tmp_path)
    raw_config(src, config_text(src).replace('"LORA"', '"LO\xffRA"').encode("latin-1"))
    all_refused(src, tmp_path, CONFIG, "UTF-8", "0xff")


@pytest.mark.parametrize("depth", [40, 100_000], ids=["past-our-bound", "past-python-recursion"])
def test_config_deep_nesting(tmp_path, depth):
    src = per_expert(tmp_path)
    raw_config(src, config_text(src).rstrip().rstrip("}") + ', "deep": ' + "[" * depth + "]" * depth + "}")
    all_refused(src, tmp_path, CONFIG, "nested at most")


def test_config_too_large(tmp_path):
    src = per_expert(tmp_path)
    raw_config(src, config_text(src).rstrip().rstrip("}") + ', "pad": "' + "x" * (9 << 20) + '"}')
    all_refused(src, tmp_path, CONFIG, "at most 8 MiB", commands=("inspect",))


def test_config_duplicate_key(tmp_path):
    # json.loads keeps the last of two "r": the file says two things, refuse it
    src = per_expert(tmp_path)
    raw_config(src, config_text(src).rstrip().rstrip("}") + f', "r": {R * 2}}}')
    all_refused(src, tmp_path, CONFIG, "'r' twice")


# ---- adapter_config.json: field by field ------------------------------------------------------------

BAD_FIELDS = [
    ("r", 0), ("r", 4.0), ("r", "4"), ("r", True), ("r", None), ("r", -4), ("r", 10**9),
    ("lora_alpha", "NaN"), ("lora_alpha", "Infinity"), ("lora_alpha", "-Infinity"), ("lora_alpha", True),
    ("lora_alpha", 10**400), ("lora_alpha", "1e400"), ("lora_alpha", 0), ("lora_alpha", -8.0), ("lora_alpha", "8"),
    ("use_rslora", "false"), ("use_rslora", 1), ("use_dora", "false"), ("fan_in_fan_out", "no"),
    ("rank_pattern", []), ("rank_pattern", "q_proj"), ("alpha_pattern", [1]),
    ("peft_version", 0.21), ("peft_version", ["0.21.0"]), ("base_model_name_or_path", 5),
    ("target_parameters", "mlp.experts.gate_up_proj"), ("target_parameters", [1, 2]), ("peft_type", 7),
]


def _json_value(value) -> str:
    """JSON text for a value; the strings NaN / Infinity / 1e400 stand for those literals."""
    return value if value in ("NaN", "Infinity", "-Infinity", "1e400") else json.dumps(value)


@pytest.mark.parametrize("key, value", BAD_FIELDS, ids=[f"{k}={v!r}"[:40] for k, v in BAD_FIELDS])
def test_config_field_of_wrong_type_or_range(tmp_path, key, value):
    src = per_expert(tmp_path)
    cfg = json.loads(config_text(src))
    cfg[key] = "__VALUE__"
    raw_config(src, json.dumps(cfg).replace('"__VALUE__"', _json_value(value)))
    line = all_refused_line(src, tmp_path, CONFIG, f": {key}: ")
    assert len(line) < 400, line  # 10**400 is not printed whole


BAD_PATTERN_VALUES = [
    ("rank_pattern", 0), ("rank_pattern", 4.5), ("rank_pattern", "8"), ("rank_pattern", True), ("rank_pattern", 10**9),
    ("alpha_pattern", "NaN"), ("alpha_pattern", "Infinity"), ("alpha_pattern", -1), ("alpha_pattern", "x"), ("alpha_pattern", False),
]


@pytest.mark.parametrize("table, value", BAD_PATTERN_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_PATTERN_VALUES])
def test_pattern_values_must_be_positive_numbers(tmp_path, table, value):
    src = per_expert(tmp_path)
    cfg = json.loads(config_text(src))
    cfg[table] = {"q_proj": "__VALUE__"}
    raw_config(src, json.dumps(cfg).replace('"__VALUE__"', _json_value(value)))
    all_refused(src, tmp_path, CONFIG, f"{table}.q_proj")


def test_use_rslora_string_is_not_read_as_true(tmp_path):
    # the old reader took bool("false") == True and scaled by alpha / sqrt(r), silently
    src = per_expert(tmp_path)
    edit_config(src, lambda cfg: cfg.__setitem__("use_rslora", "false"))
    all_refused(src, tmp_path, CONFIG, "use_rslora", "JSON boolean", "'false'")


def all_refused_line(src, tmp_path, *needles) -> str:
    all_refused(src, tmp_path, *needles)
    return assert_error(cli("inspect", src), *needles)


# ---- rank / alpha patterns: bounded time, PEFT's meaning ---------------------------------------------


def test_catastrophic_pattern_finishes(tmp_path):
    # re.match(r"(.*\.)?((.+)+X)$", name) backtracks for hours on a 40-character name
    src = per_expert(tmp_path, extra_config={"rank_pattern": {"(.+)+X": 8}, "alpha_pattern": {"(a|aa)+$": 2.0}})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "expertlora.cli", "inspect", str(src), "--json", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 60
    report = json.loads(proc.stdout)
    assert json.dumps(report).count('"rank": 8') == 0  # the pattern matches nothing here: r applies


@pytest.mark.parametrize(
    "pattern, found",
    [(r"(a)\1", "backreference"), (r"(?=q)q_proj", "lookaround"), (r"(?i)Q_PROJ", "flags"), ("q_proj++", "possessive"),
     ("(", "missing )"), ("(a{1000}){1000}", "automaton states")],
)
def test_unsupported_patterns_refused_in_one_line(tmp_path, pattern, found):
    src = per_expert(tmp_path, extra_config={"rank_pattern": {pattern: 8}})
    all_refused(src, tmp_path, CONFIG, "rank_pattern", found)


def peft_rule(keys: list[str], name: str) -> int | None:
    """PEFT's get_pattern_key: the first key with re.match(rf"(.*\\.)?({key})$", name)."""
    return next((i for i, k in enumerate(keys) if re.match(rf"(.*\.)?({k})$", name)), None)


_atoms = st.sampled_from(["a)|(b", "a", "b", r"\.", ".", r"\d", r"\w", "[ab]", "[^a]", "[0-9]", "(?:a|b)", "(a|)", r"\b", r"\B", "^", "$"])


@st.composite
def _patterns(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if depth < 2 and draw(st.booleans()) and draw(st.booleans()):
            inner = draw(_patterns(depth=depth + 1))
            atom = draw(st.sampled_from([f"({inner})", f"(?:{inner})", f"(?:{inner}|b)"]))
        else:
            atom = draw(_atoms)
        if atom not in ("^", "$", r"\b", r"\B"):
            atom += draw(st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "*?", "+?", "{0,2}?"]))
        parts.append(atom)
    return "".join(parts)


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(_patterns(), min_size=1, max_size=3), names=st.lists(st.text("ab.1_\n", max_size=8), min_size=1, max_size=6))
def test_pattern_set_equals_peft_rule(keys, names):
    alone = PatternSet([rf"(.*\.)?({k})$" for k in keys])
    shared = PatternSet([rf"(.*\.)?({k})$" for k in keys], shared_prefix=r"(.*\.)?")  # as PeftLoraConfig runs them
    for name in names:
        assert alone.first_match(name) == shared.first_match(name) == peft_rule(keys, name), (keys, name)


def test_pattern_work_is_bounded(tmp_path, monkeypatch):
    # a pattern whose DFA grows with every character: past the work bound, one line, not minutes
    from expertlora import linear_regex

    src = per_expert(tmp_path, extra_config={"rank_pattern": {f"(.*[0-9].{{{k}}}x)": 8 for k in range(4, 30)}})
    assert cli("inspect", src).exit_code == 0  # within the real bound: these module names are short
    monkeypatch.setattr(linear_regex, "MAX_WORK", 500)
    all_refused(src, tmp_path, CONFIG, "rank_pattern", "automaton steps")


def test_pattern_set_on_real_module_names():
    keys = [r"layers\.2\.mlp\.experts\.\d+\.(gate|up|down)_proj", "q_proj", r"model\.layers\.1\.mlp\.experts\.down_proj", "experts.3.up_proj"]
    names = [f"model.layers.{L}.mlp.experts.{e}.{p}" for L in range(4) for e in range(12) for p in ("gate_proj", "up_proj", "down_proj")]
    names += ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    patterns = PatternSet([rf"(.*\.)?({k})$" for k in keys], shared_prefix=r"(.*\.)?")
    hits = [patterns.first_match(n) for n in names]
    assert hits == [peft_rule(keys, n) for n in names]
    assert set(hits) == {None, 0, 1, 2, 3}


def test_pattern_set_bounds():
    with pytest.raises(PatternError, match="automaton states"):
        PatternSet(["a{%d}" % (MAX_STATES + 1)])
    with pytest.raises(PatternError) as e:
        PatternSet(["ok", "(?P<x>a)(?P=x)"])
    assert e.value.index == 1


def test_config_spec_uses_the_first_matching_pattern(tmp_path):
    path = tmp_path / CONFIG
    path.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 8, r"layers\.1\..*": 16}, "alpha_pattern": {r"\d\.self_attn\.q_proj": 32}}))
    cfg = PeftLoraConfig.from_file(path)
    assert (cfg.spec("model.layers.1.self_attn.q_proj").rank, cfg.spec("model.layers.1.self_attn.q_proj").alpha) == (8, 32.0)
    assert cfg.spec("model.layers.1.self_attn.k_proj").rank == 16
    assert cfg.spec("model.layers.2.self_attn.k_proj").rank == 4
    assert cfg.rank_reason("model.layers.1.self_attn.k_proj") == f"{CONFIG} says rank_pattern 'layers\\\\.1\\\\..*': 16"


# ---- config.json of the base ------------------------------------------------------------------------

BAD_BASE = [
    ("num_hidden_layers", 10**9, "num_hidden_layers"),
    ("num_experts", 2**40, "num_experts"),
    ("hidden_size", "32", "hidden_size"),
    ("hidden_size", 32.0, "hidden_size"),
    ("hidden_size", -32, "hidden_size"),
    ("moe_intermediate_size", True, "moe_intermediate_size"),
    ("num_hidden_layers", 10**400, "num_hidden_layers"),
    ("text_config", [1, 2], "text_config"),
    ("mlp_only_layers", "1", "mlp_only_layers"),
    ("decoder_sparse_step", 0, "decoder_sparse_step"),
    ("model_type", 5, "model_type"),
    ("quantization_config", "fp8", "quantization_config"),
]


@pytest.mark.parametrize("key, value, needle", BAD_BASE, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_BASE])
def test_base_config_field(tmp_path, key, value, needle):
    base = base_dir(tmp_path)
    cfg = json.loads((base / "config.json").read_text())
    cfg[key] = value
    (base / "config.json").write_text(json.dumps(cfg))
    all_refused(per_expert(tmp_path), tmp_path, str(base / "config.json"), needle, args=("--base", base))


@pytest.mark.parametrize("key, value", [("first_k_dense_replace", -1), ("moe_layer_freq", 0), ("n_routed_experts", "8")])
def test_deepseek_base_config_field(tmp_path, key, value):
    base = base_dir(tmp_path, "deepseek_v3")
    cfg = json.loads((base / "config.json").read_text())
    cfg[key] = value
    (base / "config.json").write_text(json.dumps(cfg))
    all_refused(per_expert(tmp_path), tmp_path, str(base / "config.json"), key, args=("--base", base))


def test_base_config_invalid_utf8_and_nesting(tmp_path):
    base = base_dir(tmp_path)
    text = (base / "config.json").read_text()
    (base / "config.json").write_bytes(text.replace('"qwen3_moe"', '"qwen3\xfe"').encode("latin-1"))
    all_refused(per_expert(tmp_path), tmp_path, "config.json", "UTF-8", args=("--base", base))
    (base / "config.json").write_text(text.rstrip().rstrip("}") + ', "x": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_000 + "}")
    all_refused(per_expert(tmp_path, "a2"), tmp_path, "config.json", "nested at most", args=("--base", base))


def test_base_text_config_is_read(tmp_path):
    # the control for text_config: a multimodal config whose language model is the MoE
    base = base_dir(tmp_path)
    inner = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({"model_type": "wrapper", "text_config": inner}))
    assert MoEConfig.from_model_dir(base).num_experts == MoEConfig.from_dict(inner).num_experts == E


# ---- the checkpoint: index.json and shards ------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path, model_dir):
    """A copy of the tiny qwen3_moe checkpoint split in two shards with an index."""
    src = model_dir("qwen3_moe")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    d = tmp_path / "ckpt"
    d.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, d / file)
    (d / "config.json").write_text((src / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, index


def _write_index(d: Path, index) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(index) if not isinstance(index, str) else index)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda ix: ix.__setitem__("weight_map", [1]), "weight_map"),
        (lambda ix: ix["weight_map"].__setitem__(next(iter(ix["weight_map"])), 5), "a shard file name"),
        (lambda ix: ix["weight_map"].__setitem__(next(iter(ix["weight_map"])), "../outside.safetensors"), "inside the model directory"),
        (lambda ix: ix["weight_map"].__setitem__(next(iter(ix["weight_map"])), "/etc/passwd"), "inside the model directory"),
        (lambda ix: ix["weight_map"].__setitem__("model.no_such.weight", "model-00001-of-00002.safetensors"), "not in that file"),
        (lambda ix: ix.pop("weight_map"), "weight_map"),
    ],
    ids=["not-an-object", "not-a-string", "climbs-out", "absolute", "not-in-shard", "missing"],
)
def test_bad_index(sharded, mutate, needle):
    d, index = sharded
    assert Checkpoint(d).layout.fused is False  # the control
    mutate(index)
    _write_index(d, index)
    with pytest.raises(AdapterError, match=re.escape(needle)):
        Checkpoint(d)


def test_index_invalid_utf8_and_duplicate_keys(sharded):
    d, index = sharded
    text = json.dumps(index)
    (d / "model.safetensors.index.json").write_bytes(text[:-2].encode() + b', "x": "\xff"}}')
    with pytest.raises(AdapterError, match="UTF-8"):
        Checkpoint(d)
    key = next(iter(index["weight_map"]))
    _write_index(d, text[:-2] + f', "{key}": "model-00002-of-00002.safetensors"}}}}')
    with pytest.raises(AdapterError, match="twice"):
        Checkpoint(d)


def test_tensor_in_two_shards_refused(sharded):
    d, _ = sharded
    (d / "model.safetensors.index.json").unlink()
    t = load_file(d / "model-00001-of-00002.safetensors")
    key = next(iter(t))
    save_file({key: t[key]}, d / "model-extra.safetensors")
    with pytest.raises(AdapterError, match="each tensor in one shard"):
        Checkpoint(d)


def test_expert_shapes_checked_before_allocating(tmp_path, model_dir):
    # config.json claims 10x the experts: refused from the headers, before torch.empty(E, ...)
    src = model_dir("mixtral")
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").symlink_to(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_local_experts"] = 10_000
    cfg["intermediate_size"] = 200_000
    (d / "config.json").write_text(json.dumps(cfg))
    ckpt = Checkpoint(d)  # the allocation would be 10_000 x 400_000 x H floats
    with pytest.raises(AdapterError, match=r"\[200000, \d+\] \(from config.json\)"):
        ckpt.expert_tensors(ckpt.config.moe_layers[0])


def test_corrupt_shard_header(sharded):
    d, _ = sharded
    shard = d / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:8] + b"\x00" + data[9:])
    with pytest.raises(AdapterError, match="a safetensors file"):
        Checkpoint(d)


# ---- size bombs in keys and metadata -------------------------------------------------------------------


@pytest.mark.parametrize("expert, layer, needle", [(10**9, 1, "an expert id below"), (2, 10**9, "a layer id below"), (3, int("9" * 40), "a layer id below")])
def test_huge_ids_in_keys(tmp_path, expert, layer, needle):
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: t.update({pe_key(layer, expert, "gate_proj", ab): torch.randn(R, H) for ab in "AB"}))
    all_refused(src, tmp_path, WEIGHTS, needle)


def test_expert_count_bounded_by_the_keys_present(tmp_path):
    # without a base, E = highest id + 1: the experts below it must all be there
    src = per_expert(tmp_path)
    edit_tensors(src / WEIGHTS, lambda t: t.update({pe_key(1, 9000, "gate_proj", "A"): torch.randn(R, H), pe_key(1, 9000, "gate_proj", "B"): torch.randn(I, R)}))
    all_refused(src, tmp_path, WEIGHTS, f"experts.{E}.", "all 9001 experts of layer 1")


@pytest.mark.parametrize("key, value, needle", [
    ("num_experts", str(10**12), "__metadata__.num_experts"),
    ("num_experts", str(E + 2), f"__metadata__.num_experts = {E + 2}"),
    ("hidden_size", "\u0663\u0662", "__metadata__.hidden_size"),  # Arabic-Indic digits pass str.isdigit()
    ("intermediate_size", str(I * 2), f"__metadata__.intermediate_size = {I * 2}"),
    ("use_rslora", "yes", "__metadata__.use_rslora"),
    ("orientation", "sideways", "__metadata__.orientation"),
    ("non_expert_adapter", "../elsewhere", "__metadata__.non_expert_adapter"),
])
def test_canonical_metadata_claims(tmp_path, key, value, needle):
    src = write_canonical(tmp_path / "canon.safetensors", **{key: value})
    all_refused(src, tmp_path, "canon.safetensors", needle)


def test_canonical_sidecar_without_config(tmp_path):
    src = write_canonical(tmp_path / "c" / "canon.safetensors", non_expert_adapter="side")
    side = tmp_path / "c" / "side"
    side.mkdir()
    a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    save_file({a: torch.randn(R, H), a.replace("lora_A", "lora_B"): torch.randn(H, R)}, side / WEIGHTS)
    all_refused(src, tmp_path, str(side / CONFIG), "No such file")


BAD_SPECS = [
    {"rank": R, "alpha": "NaN", "scaling": 2.0}, {"rank": R, "alpha": ALPHA, "scaling": "Infinity"}, {"rank": 0, "alpha": ALPHA, "scaling": 2.0},
    {"rank": "4", "alpha": ALPHA, "scaling": 2.0}, {"rank": R, "alpha": ALPHA, "scaling": -2.0}, {"rank": True, "alpha": ALPHA, "scaling": 2.0},
]


@pytest.mark.parametrize("spec", BAD_SPECS, ids=range(len(BAD_SPECS)))
def test_canonical_nonfinite_or_bad_specs(tmp_path, spec):
    layers = json.dumps({str(L): {p: {"rank": R, "alpha": ALPHA, "scaling": ALPHA / R} for p in ("gate", "up", "down")} for L in LAYERS})
    bad = json.dumps(spec)
    layers = layers.replace(json.dumps({"rank": R, "alpha": ALPHA, "scaling": ALPHA / R}), bad, 1)
    layers = layers.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    src = write_canonical(tmp_path / "canon.safetensors", layers=layers)
    all_refused(src, tmp_path, "canon.safetensors", f"__metadata__.layers.{LAYERS[0]}.gate.")


@pytest.mark.parametrize("mutate, needle", [
    (lambda m: m.__setitem__("lora_alpha", float("nan")), "metadata.lora_alpha"),
    (lambda m: m.__setitem__("lora_alpha", float("inf")), "metadata.lora_alpha"),
    (lambda m: m.__setitem__("lora_alpha", True), "metadata.lora_alpha"),
    (lambda m: m.__setitem__("lora_rank", 4.7), "metadata.lora_rank"),
    (lambda m: m.__setitem__("num_experts", E + 1), "metadata.num_experts"),
    (lambda m: m.__setitem__("hidden_size", torch.tensor(H)), "metadata.hidden_size"),
    (lambda m: m.__setitem__("num_layers", 10**9), "metadata.num_layers"),
], ids=["alpha-nan", "alpha-inf", "alpha-bool", "rank-float", "experts", "tensor-size", "layers"])
def test_seed_pt_metadata(tmp_path, mutate, needle):
    src = write_seed_pt(tmp_path / "seed.pt", mutate=lambda obj: mutate(obj["metadata"]))
    all_refused(src, tmp_path, "seed.pt", needle)


def test_seed_pt_stride_tricks_refused(tmp_path):
    # a few bytes viewed as a big tensor (stride 0): refused before anything reads it whole
    def expand(obj):
        obj[f"layer_{LAYERS[0]}"]["gate_lora_a"] = torch.randn(1, 1, 1).expand(E, R, H)

    src = write_seed_pt(tmp_path / "seed.pt", mutate=expand)
    all_refused(src, tmp_path, "seed.pt", f"layer_{LAYERS[0]}.gate_lora_a", "contiguous")


@pytest.mark.parametrize("mutate, needle", [
    (lambda obj: obj.__setitem__("extra", torch.zeros(2)), "'extra'"),
    (lambda obj: obj.__setitem__("layer_x", {}), "'layer_x'"),
    (lambda obj: obj[f"layer_{LAYERS[0]}"].__setitem__("gate_lora_c", torch.zeros(2)), "gate_lora_c"),
    (lambda obj: obj[f"layer_{LAYERS[0]}"].__setitem__("up_lora_a", obj[f"layer_{LAYERS[0]}"]["up_lora_a"].to(torch.int32)), "float"),
    (lambda obj: obj[f"layer_{LAYERS[0]}"].__setitem__("up_lora_a", obj[f"layer_{LAYERS[0]}"]["up_lora_a"].double()), "torch.float32"),
], ids=["extra-entry", "bad-layer-name", "extra-tensor", "int-tensor", "mixed-dtypes"])
def test_seed_pt_layout(tmp_path, mutate, needle):
    src = write_seed_pt(tmp_path / "seed.pt", mutate=mutate)
    all_refused(src, tmp_path, "seed.pt", needle)


# ---- two names for one tensor ------------------------------------------------------------------------


def _add_alias(src: Path, alias) -> tuple[str, str]:
    key = pe_key(LAYERS[0], 3, "up_proj", "A")
    other = alias(key)
    edit_tensors(src / WEIGHTS, lambda t: t.__setitem__(other, torch.randn(R, H)))
    return key, other


@pytest.mark.parametrize("alias", [
    lambda k: k.removeprefix("base_model.model."),
    lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight"),
    lambda k: k.replace(".experts.3.", ".experts.03."),
    lambda k: k.replace(f".layers.{LAYERS[0]}.", f".layers.0{LAYERS[0]}."),
    lambda k: k.replace(".mlp.experts.", ".mlp.original_moe.experts."),
], ids=["prefix", "default", "expert-03", "layer-01", "original_moe"])
def test_two_names_for_one_tensor(tmp_path, alias):
    src = per_expert(tmp_path)
    key, other = _add_alias(src, alias)
    all_refused(src, tmp_path, WEIGHTS, "same tensor", key, other)


def test_two_names_for_one_non_expert_module(tmp_path):
    a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    src = per_expert(tmp_path, extra_tensors={a: torch.randn(R, H), a.replace("lora_A", "lora_B"): torch.randn(H, R),
                                              a.replace(".lora_A.", ".lora_A.default."): torch.randn(R, H)})
    all_refused(src, tmp_path, WEIGHTS, "same tensor", "q_proj")


def test_two_names_in_canonical_and_seed(tmp_path):
    t = stacked_tensors()
    t[tensor_key(1, "gate", "a").replace("layers.1.", "layers.01.")] = t[tensor_key(1, "gate", "a")].clone()
    src = write_canonical(tmp_path / "canon.safetensors", t)
    all_refused(src, tmp_path, "canon.safetensors", "layers.01.experts.gate_lora_a", "layers.1.experts.gate_lora_a", "same tensor")
    layers = json.dumps({L: {p: {"rank": R, "alpha": ALPHA, "scaling": ALPHA / R} for p in ("gate", "up", "down")} for L in ("1", "2", "01")})
    src = write_canonical(tmp_path / "canon2.safetensors", layers=layers)
    all_refused(src, tmp_path, "canon2.safetensors", "__metadata__.layers.01", "same tensor")

    def alias(obj):
        obj[f"layer_0{LAYERS[0]}"] = obj[f"layer_{LAYERS[0]}"]

    seed = write_seed_pt(tmp_path / "seed.pt", mutate=alias)
    all_refused(seed, tmp_path, "seed.pt", f"layer_0{LAYERS[0]}", f"also layer_{LAYERS[0]}")


def test_fused_module_twice_in_one_layer(fused_copy, tmp_path):
    src, base = fused_copy
    with safe_open(src / WEIGHTS, framework="pt") as f:
        key = next(k for k in f.keys() if ".layers.1.mlp.experts.lora_A" in k)
    edit_tensors(src / WEIGHTS, lambda t: t.update({key.replace(".mlp.experts.", ".mlp.original_moe.experts."): t[key].clone(),
                                                    key.replace(".mlp.experts.", ".mlp.original_moe.experts.").replace("lora_A", "lora_B"): t[key.replace("lora_A", "lora_B")].clone()}))
    all_refused(src, tmp_path, WEIGHTS, "one expert LoRA per layer", args=("--base", base))


# ---- messages: the user's terms, one line whatever the file holds ---------------------------------------


def test_rank_message_names_the_config(tmp_path):
    src = per_expert(tmp_path)
    edit_config(src, lambda cfg: cfg.__setitem__("r", R * 2))
    all_refused(src, tmp_path, WEIGHTS, f"{CONFIG} says r={R * 2}", f"[{R}, {H}]", "lora_A.weight")


def test_fused_rank_message_per_expert(fused_copy, tmp_path):
    src, base = fused_copy
    edit_config(src, lambda cfg: cfg.__setitem__("r", 2))
    all_refused(src, tmp_path, WEIGHTS, f"{CONFIG} says r=2", "per expert", args=("--base", base))


def test_expert_count_message(tmp_path):
    base = base_dir(tmp_path, num_experts=16)
    src = write_canonical(tmp_path / "canon.safetensors")
    all_refused(src, tmp_path, "num_experts", "16 experts as in", f"{E} experts in the adapter", args=("--base", base))
    all_refused(per_expert(tmp_path), tmp_path, "all 16 experts", f"the base has 16 experts, the adapter {E}", args=("--base", base))


@pytest.mark.parametrize("evil", ["q_proj\nerror: fake second line", "q_proj\x1b[31mred\x1b[0m", "q\u2028proj", "q\rproj", "q\u202eproj"])
def test_control_characters_in_names_are_escaped(tmp_path, evil):
    key = f"base_model.model.model.layers.1.self_attn.{evil}.weird"
    src = per_expert(tmp_path, extra_tensors={key: torch.zeros(2)})
    for cmd in ("inspect", "convert", "export-peft"):
        args = [cmd, src] + (["-o", tmp_path / f"out_{cmd}"] if cmd != "inspect" else [])
        line = assert_error(cli(*args), "printable characters")
        assert "\x1b" not in line and "\u202e" not in line and "\r" not in line
        assert "\\n" in line or "\\x1b" in line or "\\u2028" in line or "\\r" in line or "\\u202e" in line


def test_name_with_a_final_newline(tmp_path):
    # "$" in a key regex matches before a final "\n": "layers.1.experts.down_lora_a\n" was read as the real key
    t = stacked_tensors()
    t[tensor_key(1, "down", "a") + "\n"] = t.pop(tensor_key(1, "down", "a"))
    src = write_canonical(tmp_path / "canon.safetensors", t)
    all_refused(src, tmp_path, "canon.safetensors", "layers.1.experts.down_lora_a\\n", "printable characters")


def test_control_characters_in_config_values(tmp_path):
    src = per_expert(tmp_path)
    edit_config(src, lambda cfg: cfg.__setitem__("peft_type", "LORA\nerror: injected"))
    line = assert_error(cli("inspect", src), "peft_type")
    assert "\\n" in line


def test_weights_only_refusal_in_one_line(tmp_path):
    class OpensFiles:
        def __reduce__(self):
            return (io.open, ("/etc/hostname",))

    src = tmp_path / "evil.pt"
    torch.save({"metadata": OpensFiles()}, src)
    line = assert_error(cli("inspect", src), "refusing a pickle that needs io.open, which is not a tensor type")
    assert "\x1b" not in line and "weights_only" in line
    all_refused(src, tmp_path, "io.open")


def test_pt_that_is_not_a_zip(tmp_path):
    src = tmp_path / "legacy.pt"
    torch.save({"metadata": {}}, src, _use_new_zipfile_serialization=False)
    all_refused(src, tmp_path, "legacy.pt", "not a zip archive")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    all_refused(junk, tmp_path, "junk.pt", "not a zip archive")


@pytest.mark.parametrize("cut", [3, 8, 20, -10], ids=["in-length", "after-length", "in-header", "in-data"])
def test_truncated_safetensors(tmp_path, cut):
    src = per_expert(tmp_path)
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[:cut])
    all_refused(src, tmp_path, WEIGHTS, "a safetensors file")


def test_header_claiming_more_bytes_than_the_file(tmp_path):
    src = write_canonical(tmp_path / "canon.safetensors")
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    key = tensor_key(1, "gate", "a")
    header[key]["shape"] = [E * 1000, R, H]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    src.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    all_refused(src, tmp_path, "canon.safetensors", "a safetensors file")


# ---- value checks on options a reader takes -----------------------------------------------------------


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0.0, -1.0, 1e300])
def test_kt_lora_alpha_checked(tmp_path, alpha):
    (tmp_path / "kt").mkdir()
    save_file(stacked_tensors(), str(tmp_path / "kt" / KT_FILE_NAME))
    with pytest.raises(AdapterError, match="--lora-alpha"):
        open_adapter(tmp_path / "kt", lora_alpha=alpha)
    assert open_adapter(tmp_path / "kt", lora_alpha=8.0).info.layers[1]["gate"].scaling == 8.0 / R


# ---- generated malformed variants: nothing but AdapterError escapes -------------------------------------

JUNK = [None, True, False, 0, -1, 1.5, 10**400, "x", "", [], {}, [1, "a"], {"a": {"b": None}}, float("nan"), float("inf")]


def _variants_of_bytes(data: bytes, rng: random.Random, n: int) -> list[bytes]:
    out = [data[: rng.randrange(len(data))] for _ in range(n)]
    header_end = 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else len(data)
    for _ in range(n):
        d = bytearray(data)
        for _ in range(rng.randint(1, 4)):  # mostly in the header, where the structure is
            i = rng.randrange(min(len(d), header_end + 64)) if rng.random() < 0.8 else rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
        out.append(bytes(d))
    return out


def _expect_adapter_error_or_success(src, **kw) -> str:
    try:
        load_adapter(src, **kw)
    except AdapterError as e:
        assert "\n" not in str(e) and "\r" not in str(e), str(e)
        return "refused"
    return "read"


def test_malformed_safetensors_variants(tmp_path):
    rng = random.Random(12)
    outcomes = []
    sources = [per_expert(tmp_path / "pe") / WEIGHTS, write_canonical(tmp_path / "canon" / "canon.safetensors")]
    for src in sources:
        good = src.read_bytes()
        for i, data in enumerate(_variants_of_bytes(good, rng, 40)):
            src.write_bytes(data)
            outcomes.append(_expect_adapter_error_or_success(src.parent if src.name == WEIGHTS else src))
        src.write_bytes(good)
    assert outcomes.count("refused") > len(outcomes) // 2


def test_malformed_seed_pt_variants(tmp_path):
    rng = random.Random(5)
    src = write_seed_pt(tmp_path / "seed.pt")
    good = src.read_bytes()
    outcomes = []
    for data in [good[: rng.randrange(len(good))] for _ in range(30)] + [_flip(good, rng) for _ in range(60)]:
        src.write_bytes(data)
        outcomes.append(_expect_adapter_error_or_success(src))
    assert "refused" in outcomes


def _flip(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    return bytes(d)


def _set_path(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def test_malformed_config_variants(tmp_path, fused_copy):
    """Every field of a real PEFT adapter_config.json (and one level down) replaced by junk of
    every JSON type: the reader gives a result or an AdapterError, never another exception."""
    src, base = fused_copy
    good = json.loads(config_text(src))
    base_cfg = MoEConfig.from_model_dir(base)
    paths = [(k,) for k in good] + [(k, k2) for k, v in good.items() if isinstance(v, dict) for k2 in v]
    outcomes = []
    for path in paths:
        for junk in JUNK:
            cfg = json.loads(json.dumps(good))
            _set_path(cfg, path, junk)
            (src / CONFIG).write_text(json.dumps(cfg))
            outcomes.append(_expect_adapter_error_or_success(src, base=base_cfg))
    (src / CONFIG).write_text(json.dumps(good))
    assert outcomes.count("refused") > 50


def test_malformed_base_config_variants(tmp_path):
    for family in ("qwen3_moe", "deepseek_v3"):
        base = base_dir(tmp_path, family, name=f"base_{family}")
        good = json.loads((base / "config.json").read_text())
        for key in good:
            for junk in JUNK:
                cfg = dict(good, **{key: junk})
                (base / "config.json").write_text(json.dumps(cfg))
                try:
                    MoEConfig.from_model_dir(base)
                except AdapterError as e:
                    assert "\n" not in str(e)


def test_malformed_canonical_metadata_variants(tmp_path):
    good_meta = {"format": "expertlora/1", "num_experts": str(E), "hidden_size": str(H), "intermediate_size": str(I), "use_rslora": "false"}
    layers = {str(L): {p: {"rank": R, "alpha": ALPHA, "scaling": ALPHA / R} for p in ("gate", "up", "down")} for L in LAYERS}
    junk_strings = ["", "-1", "0", "1e3", " 6", "6\n", "nan", "\u0666", "9" * 50, "[]", "{}", "null", "true", '{"a": 1}']
    outcomes = []
    for key in list(good_meta) + ["layers", "non_expert_adapter", "orientation", "expert_naming"]:
        for junk in junk_strings:
            meta = {**good_meta, "layers": json.dumps(layers), key: junk}
            outcomes.append(_expect_adapter_error_or_success(write_canonical(tmp_path / "c.safetensors", **meta)))
    for path in [(L, p, f) for L in layers for p in ("gate", "down") for f in ("rank", "alpha", "scaling")] + [(L,) for L in layers]:
        for junk in JUNK:
            lay = json.loads(json.dumps(layers))
            _set_path(lay, path, junk)
            outcomes.append(_expect_adapter_error_or_success(write_canonical(tmp_path / "c.safetensors", layers=json.dumps(lay, allow_nan=True))))
    assert outcomes.count("refused") > 100

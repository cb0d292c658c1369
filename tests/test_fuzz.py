"""Property-based fuzz suite of the bad-input contract (issue 12), over the readers and the CLI.

Every example starts from a valid adapter or model directory (built once per module) and breaks
one or two things in it: safetensors headers, adapter_config.json / config.json /
model.safetensors.index.json fields and whole files, seed ``.pt`` layouts and pickles, keys that
normalise to the same tensor, claimed sizes, regexes, command-line options and output paths.
The property, for `inspect`, `convert`, `export-peft` and `run` (and the library readers):

- an invalid input gives exit code 2 and exactly one line on stderr starting with ``error: ``
  (no traceback, no control characters), and leaves nothing new in the output folder;
- a valid input succeeds (output files 0644, temporaries gone, the output reads back);
- inputs are never modified; each call finishes within CALL_SECONDS with its peak RSS within
  MEM_MB (tests/fuzz_inputs.py's sandbox kills hangs and caps the address space).

Some generated inputs are neither clearly valid nor invalid (EITHER): then either outcome must
follow its half of the contract. The examples are derandomized (CI is reproducible);
``EXPERTLORA_FUZZ_PROFILE=expertlora-fuzz-explore`` draws fresh ones, five times as many;
``EXPERTLORA_FUZZ_SCALE=F`` multiplies the example counts; ``EXPERTLORA_FUZZ_RECORD=FILE`` lists
every violation in FILE (JSON lines) instead of failing at the first.
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from expertlora import tiny
from expertlora.formats.canonical import KT_FILE_NAME, tensor_key

from .fuzz_inputs import (
    EITHER, INVALID, VALID, Expect, Raw, Sandbox, check_api, check_cli, dump_json, nested, read_safetensors,
    safetensors_bytes,
)
from .test_bad_input import (
    ALPHA, E, H, I, LAYERS, R, WEIGHTS, Payload, Plain, edit_tensors, pe_key, per_expert, stacked_tensors, write_canonical, write_seed_pt,
)

settings.register_profile(
    "expertlora-fuzz",
    derandomize=True,
    database=None,
    deadline=10_000,  # ms per example; each call is also bounded by the sandbox (CALL_SECONDS, HARD_TIMEOUT)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("expertlora-fuzz-explore", parent=settings.get_profile("expertlora-fuzz"), derandomize=False)
PROFILE = os.environ.get("EXPERTLORA_FUZZ_PROFILE", "expertlora-fuzz")
SCALE = float(os.environ.get("EXPERTLORA_FUZZ_SCALE", 5 if PROFILE.endswith("explore") else 1))


def fuzz(examples: int, shrink: bool = True):
    """This file's settings with ``examples`` examples; no shrinking where an example may hang."""
    phases = list(Phase) if shrink else [Phase.explicit, Phase.generate]
    recording = {"deadline": None} if os.environ.get("EXPERTLORA_FUZZ_RECORD") else {}  # cataloguing: nothing fails
    return settings(settings.get_profile(PROFILE), max_examples=max(1, round(examples * SCALE)), phases=phases, **recording)


DELETE = object()  # a field value meaning: remove the field
NAN, INF = float("nan"), float("inf")
RUN_ARGS = ("--prompt-ids", "5,17,33", "--max-new-tokens", "2", "--method", "fp32", "--no-progress")
COMMANDS = ("inspect", "convert", "export-peft", "run")


# ---- the valid starting points and the sandbox ------------------------------------------------------


@dataclass
class Seeds:
    root: Path
    per_expert: Path  # PEFT per-expert adapter dir: E, H, I = 6, 32, 64, layers 1, 2, r 4, alpha 8
    canonical: Path  # our expertlora/1 file of the same adapter shape
    seed_pt: Path  # the seed's .pt
    kt: Path  # KTransformers dir: fused_expert_lora.safetensors + adapter_config.json
    fused: Path  # PEFT fused adapter (transformers 5) of the qwen3_moe tiny model; needs --base
    model: Path  # the qwen3_moe tiny checkpoint (E, H, I = 6, 32, 64, 3 MoE layers, vocab 96)
    sharded: Path  # the same model, sharded with model.safetensors.index.json
    work: Path


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, model_dir, fused_adapter) -> Seeds:
    root = tmp_path_factory.mktemp("fuzz")
    kt = root / "kt"
    kt.mkdir()
    save_file(stacked_tensors(), str(kt / KT_FILE_NAME))
    pe = per_expert(root)
    shutil.copy(pe / "adapter_config.json", kt / "adapter_config.json")
    sharded = root / "sharded"
    tiny.tiny_model("qwen3_moe", seed=0).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    (root / "work").mkdir()
    return Seeds(root, pe, write_canonical(root / "canon.safetensors"), write_seed_pt(root / "seed.pt"), kt,
                 fused_adapter("qwen3_moe")[0], model_dir("qwen3_moe"), sharded, root / "work")


@pytest.fixture(scope="module")
def sandbox(seeds):
    warm = seeds.root / "warm"
    warmup = [["inspect", seeds.per_expert, "--no-progress"], ["convert", seeds.per_expert, "-o", warm / "c.safetensors", "--no-progress"],
              ["export-peft", seeds.fused, "--base", seeds.model, "-o", warm / "e", "--no-progress"]]
    warmup += [["run", "--model", seeds.model, "--adapter", seeds.per_expert, *RUN_ARGS[:-3], "--method", m, "--no-progress"]
               for m in ("fp32", "bf16", "int8", "int4")]
    box = Sandbox(warmup)
    box.start()
    yield box
    box.stop()


@contextmanager
def workspace(seeds: Seeds):
    """A fresh folder per example (hypothesis runs many examples in one test call)."""
    w = Path(tempfile.mkdtemp(dir=seeds.work))
    try:
        yield w
    finally:
        shutil.rmtree(w, ignore_errors=True)


def copy_source(seeds: Seeds, kind: str, w: Path) -> Path:
    src = {"per-expert": seeds.per_expert, "canonical": seeds.canonical, "seed-pt": seeds.seed_pt, "kt": seeds.kt,
           "kt-noconfig": seeds.kt, "fused": seeds.fused}[kind]
    dst = w / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
        if kind == "kt-noconfig":
            (dst / "adapter_config.json").unlink()
    else:
        shutil.copy2(src, dst)
    return dst


def command(cmd: str, src: Path, w: Path, seeds: Seeds, outcome: str, note: str, *, base: bool = False,
            extra=(), model: Path | None = None, needles=()) -> tuple[list, Expect]:
    """argv and expectations of one command on ``src``; ``base`` adds --base (the tiny model)."""
    out = w / "out"
    out.mkdir(exist_ok=True)
    model = model or seeds.model
    inputs = (src, model) if base or cmd == "run" else (src,)
    if cmd == "run":
        argv = ["run", "--model", model, "--adapter", src, *RUN_ARGS, *extra]
        return argv, Expect(outcome, note, inputs, needles=needles)
    target = {"convert": out / "converted.safetensors", "export-peft": out / "exported"}.get(cmd)
    argv = [cmd, src, *(["-o", target] if target else []), *(["--base", model] if base else []), "--no-progress", *extra]
    readback = ("--base", model) if cmd == "export-peft" else ()  # a fused PEFT directory needs the base
    return argv, Expect(outcome, note, inputs, out_folder=out, output=target, needles=needles, readback=readback)


def values(valid=(), invalid=(), either=()):
    """(value, outcome) pairs drawn from three lists."""
    parts = [st.sampled_from(list(vs)).map(lambda v, o=o: (v, o)) for o, vs in ((VALID, valid), (INVALID, invalid), (EITHER, either)) if vs]
    return st.one_of(parts)


def worst(*outcomes: str) -> str:
    """Combine outcomes of several changes: one invalid change makes the input invalid."""
    return INVALID if INVALID in outcomes else EITHER if EITHER in outcomes else VALID


def edit_json(path: Path, key: str, value) -> None:
    cfg = json.loads(path.read_text())
    if value is DELETE:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    path.write_text(dump_json(cfg))


def show(v) -> str:
    return "DELETE" if v is DELETE else repr(v)[:120]


# ---- 0. the control: every seed, unbroken, passes every command -----------------------------------------


def test_seeds_are_valid(seeds, sandbox):
    """The starting points are valid: each command on each succeeds (else the oracles below are wrong)."""
    for kind in ("per-expert", "canonical", "seed-pt", "kt", "fused"):
        for cmd in COMMANDS:
            with workspace(seeds) as w:
                src = copy_source(seeds, kind, w)
                argv, expect = command(cmd, src, w, seeds, VALID, f"unchanged {kind}", base=kind == "fused")
                check_cli(sandbox, argv, expect, test="seeds")
    with workspace(seeds) as w:
        argv, expect = command("run", seeds.per_expert, w, seeds, VALID, "sharded model", model=seeds.sharded)
        check_cli(sandbox, argv, expect, test="seeds")
    check_api(sandbox, "checkpoint", [seeds.sharded], Expect(VALID, "sharded checkpoint"), test="seeds")


# ---- 1. safetensors headers -------------------------------------------------------------------------------

DTYPES = ["F16", "BF16", "F64", "I32", "U32", "I64", "U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "F4", "E8M0", "f32", "float32", "", 5, None, ["F32"]]


@st.composite
def mutated_safetensors(draw, header: dict, data: bytes, canonical: bool):
    """(file bytes, what was done, outcome) for one or two changes to a valid safetensors file."""
    keys = sorted(k for k in header if k != "__metadata__")
    blob = safetensors_bytes(header, data)
    n = len(blob) - 8 - len(data)
    kind = draw(st.sampled_from(["prefix", "text", "entry", "drop", "entry-type", "metadata", "truncate", "append", "rename", "overlap", "pad"]))
    h = json.loads(json.dumps(header))
    key = draw(st.sampled_from(keys))
    entry = h[key]
    if kind == "prefix":
        length = draw(st.one_of(st.sampled_from([0, 1, 7, n - 1, n + 1, n + 8, len(blob) - 8, len(blob), 2**32, 2**63 - 1, 2**64 - 1]),
                                st.integers(0, 2**64 - 1)).filter(lambda x: x != n))
        return safetensors_bytes(h, data, length=length), f"length prefix {length} (header is {n} bytes)", INVALID
    if kind == "text":
        text = dump_json(h).encode()
        how = draw(st.sampled_from(["utf8", "not-object", "truncated", "nesting", "duplicate", "leading-space"]))
        if how == "utf8":
            i = draw(st.integers(0, len(text) - 1))
            bad = draw(st.sampled_from([b"\xff", b"\xc0", b"\x80", b"\xed\xa0\x80"]))
            return safetensors_bytes(text[:i] + bad + text[i + 1:], data), f"invalid UTF-8 {bad!r} at header byte {i}", INVALID
        if how == "not-object":
            t = draw(st.sampled_from([b"[]", b"null", b"1", b'"x"', b"[{}]", b"{"]))
            return safetensors_bytes(t, data), f"header {t!r}", INVALID
        if how == "truncated":
            i = draw(st.integers(0, len(text) - 1))
            return safetensors_bytes(text[:i], data), f"header cut at byte {i} of {len(text)}", INVALID
        if how == "nesting":
            depth = draw(st.integers(200, 20000))
            h["zz_nested"] = nested(depth)
            return safetensors_bytes(h, data), f"an entry nested {depth} deep", INVALID
        if how == "duplicate":
            other = draw(st.sampled_from([k for k in keys if k != key] or keys))
            dup = dump_json({key: h[other]})[1:-1].encode()
            return safetensors_bytes(text[:-1] + b"," + dup + b"}", data), f"{key!r} twice in the header (second with {other!r}'s entry)", INVALID
        return safetensors_bytes(b"  " + text, data), "header with leading spaces", EITHER
    if kind == "entry":
        fld = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        s, e = entry["data_offsets"]
        shape = entry["shape"]
        if fld == "dtype":
            v = draw(st.sampled_from([d for d in DTYPES if d != entry["dtype"]]))
        elif fld == "shape":
            numel = math.prod(shape)
            v = draw(st.sampled_from([shape[::-1], [numel], [*shape, 1], [1, *shape], [2**40] * 3, [-1, *shape[1:]], [], [0, *shape[1:]],
                                      [str(d) for d in shape], [float(d) for d in shape], [shape], [2**64, 1], shape[:-1]]).filter(lambda x: x != shape))
        else:
            others = [h[k]["data_offsets"] for k in keys if k != key]
            v = draw(st.sampled_from([[e, s], [s, e + 1], [s + 1, e + 1], [s, s], [0, 2**63], [-1, e], [s], [str(s), e], [s, e, 0],
                                      [s, 2**64 - 1], *others[:3]]).filter(lambda x: x != [s, e]))
        entry[fld] = v
        return safetensors_bytes(h, data), f"{key!r}.{fld} = {v!r}"[:200], INVALID
    if kind == "drop":
        fld = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        del entry[fld]
        return safetensors_bytes(h, data), f"{key!r} without {fld}", INVALID
    if kind == "entry-type":
        v = draw(st.sampled_from([[], "x", 5, None, True]))
        h[key] = v
        return safetensors_bytes(h, data), f"{key!r} entry = {v!r}", INVALID
    if kind == "metadata":
        if canonical and draw(st.booleans()):
            return draw(canonical_metadata(h, data))
        # (our canonical file's own "format" tag is not to be replaced: {"format": "pt"} is valid elsewhere)
        valid = [{"note": "x"}] if canonical else [{"format": "pt"}, {"note": "x"}]
        v, outcome = draw(values(valid=valid, invalid=[[], "x", 5, {"k": 5}, {"k": None}, {"k": ["x"]}, {"k": {"a": "b"}}]))
        meta = {**h.get("__metadata__", {}), **v} if isinstance(v, dict) else v
        h["__metadata__"] = meta
        return safetensors_bytes(h, data), f"__metadata__ = {show(meta)}", outcome
    if kind == "truncate":
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i], f"file cut at byte {i} of {len(blob)}", INVALID
    if kind == "append":
        junk = draw(st.binary(min_size=1, max_size=64))
        return blob + junk, f"{len(junk)} bytes appended", EITHER
    if kind == "rename":
        new = draw(st.sampled_from([key + "\n", key + "\x00", key + " ", "\n" + key, key.replace(".", "\n", 1), "", key + ".x", key.upper(),
                                    "\x1b[31m" + key, key + "\r", key.replace(".", "\t", 1),
                                    key.replace("1", "\u0661", 1), "x" * 5000]).filter(lambda k: k != key and k not in h))
        h[new] = h.pop(key)
        outcome = EITHER if "\u0661" in new else INVALID
        return safetensors_bytes(h, data), f"{key!r} renamed {new[:60]!r}", outcome
    if kind == "overlap":
        same = [k for k in keys if k != key and h[k]["data_offsets"][1] - h[k]["data_offsets"][0] == entry["data_offsets"][1] - entry["data_offsets"][0]]
        if not same:
            return blob[:-1], "file cut by one byte", INVALID
        other = draw(st.sampled_from(same))
        entry["data_offsets"] = list(h[other]["data_offsets"])
        return safetensors_bytes(h, data), f"{key!r} and {other!r} share their bytes", INVALID
    pad = draw(st.integers(1, 64))
    return safetensors_bytes(dump_json(h).encode() + b" " * pad, data), f"header padded with {pad} spaces", VALID


def canonical_metadata(h: dict, data: bytes):
    """One field of our canonical file's __metadata__ broken."""
    meta = h["__metadata__"]
    layers = json.loads(meta["layers"])
    spec = {"rank": R, "alpha": ALPHA, "scaling": ALPHA / R}

    def with_layers(new_layers, what, outcome):
        return st.just((safetensors_bytes({**h, "__metadata__": {**meta, "layers": dump_json(new_layers) if not isinstance(new_layers, str) else new_layers}}, data),
                        f"__metadata__.layers {what}", outcome))

    def with_meta(k, v, outcome):
        m = {**meta}
        if v is DELETE:
            del m[k]
        else:
            m[k] = v
        return st.just((safetensors_bytes({**h, "__metadata__": m}, data), f"__metadata__.{k} = {show(v)}", outcome))

    size_values = ["0", "-6", "6.0", "six", "\u00b2", "", " 6", "6 ", "+6", "0x6", "1000000000", "5", "7", DELETE]
    spec_field = st.sampled_from(["rank", "alpha", "scaling"])
    return st.one_of(
        st.tuples(st.sampled_from(["num_experts", "hidden_size", "intermediate_size"]), st.sampled_from(size_values)).flatmap(
            lambda kv: with_meta(kv[0], kv[1], INVALID)),
        st.sampled_from(["\u0666"]).flatmap(lambda v: with_meta("num_experts", v, EITHER)),  # an Arabic-Indic six
        st.sampled_from(["True", "yes", "1", ""]).flatmap(lambda v: with_meta("use_rslora", v, EITHER)),
        st.sampled_from(["expertlora/2", "", DELETE]).flatmap(lambda v: with_meta("format", v, INVALID)),
        st.sampled_from(["nonexistent", "../..", "/etc", "."]).flatmap(lambda v: with_meta("non_expert_adapter", v, INVALID)),
        st.sampled_from(["{", "[]", "null", '"x"', dump_json(nested(5000)), "{}"]).flatmap(lambda v: with_layers(v, f"= {v[:30]!r}", INVALID)),
        st.tuples(spec_field, st.sampled_from([0, -4, "4", 4.5, True, None, NAN, INF, Raw("1e400"), 10**400, [4], 8])).flatmap(
            lambda fv: with_layers({L: {p: {**spec, fv[0]: fv[1]} for p in d} for L, d in layers.items()}, f"{fv[0]} = {show(fv[1])} everywhere",
                                   _spec_outcome(*fv))),
        st.sampled_from([("01", EITHER), (" 1", EITHER), ("x", INVALID), ("-1", INVALID), ("1.0", INVALID)]).flatmap(
            lambda ko: with_layers({**{L: d for L, d in layers.items() if L != "1"}, ko[0]: layers["1"]}, f"layer key {ko[0]!r} for '1'", ko[1])),
        with_layers({L: {**d, "bogus": spec} for L, d in layers.items()}, "with a projection 'bogus'", INVALID),
        with_layers({L: {p: {"rank": R, "alpha": ALPHA} for p in d} for L, d in layers.items()}, "without scaling", EITHER),
    )


def _spec_outcome(field: str, value) -> str:
    """A canonical spec with one field changed: another rank contradicts the shapes; alpha and scaling
    must be finite numbers (the scaling is authoritative, so an odd finite alpha may be accepted)."""
    if field == "rank":
        return INVALID
    if value == 8 and not isinstance(value, bool):
        return VALID if field == "alpha" else EITHER
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and abs(value) < 1e6
    return EITHER if finite else INVALID


SAFETENSORS_TARGETS = ["canonical", "per-expert", "kt", "fused", "checkpoint"]


@fuzz(120)
@given(data=st.data())
def test_safetensors_header(seeds, sandbox, data):
    target = data.draw(st.sampled_from(SAFETENSORS_TARGETS), label="target")
    with workspace(seeds) as w:
        if target == "checkpoint":
            src = w / "model"
            shutil.copytree(seeds.model, src)
            file = src / "model.safetensors"
        else:
            src = copy_source(seeds, target, w)
            file = src if src.is_file() else src / (KT_FILE_NAME if target == "kt" else WEIGHTS)
        header, payload = read_safetensors(file)
        blob, note, outcome = data.draw(mutated_safetensors(header, payload, target == "canonical"), label="mutation")
        file.write_bytes(blob)
        note = f"{target} {file.name}: {note}"
        if target == "checkpoint":
            argv = ["run", "--model", src, *RUN_ARGS] if data.draw(st.booleans()) else ["run", "--model", src, "--adapter", seeds.per_expert, *RUN_ARGS]
            check_cli(sandbox, argv, Expect(outcome, note, (src,)), test="safetensors")
            check_api(sandbox, "checkpoint", [src], Expect(EITHER if outcome == INVALID else outcome, note), test="safetensors-api")
            return
        cmd = data.draw(st.sampled_from(COMMANDS), label="command")
        argv, expect = command(cmd, src, w, seeds, outcome, note, base=target == "fused")
        check_cli(sandbox, argv, expect, test="safetensors")
        check_api(sandbox, "load_adapter", [src, seeds.model if target == "fused" else None], Expect(outcome, note), test="safetensors-api")


# ---- 2. adapter_config.json: one field, every wrong type and value class ----------------------------------

WRONG_TYPES = [None, True, False, "4", "", "a\nb", [], {}, [4], {"a": 4}]
NON_FINITE = [NAN, INF, -INF, Raw("1e400"), Raw("-1e400"), 10**400, -(10**400)]


def alpha_class(x) -> tuple:
    """lora_alpha (and alpha_pattern values): finite positive is fine; 0, negative or huge may be refused."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x, INVALID
    if isinstance(x, float) and not math.isfinite(x):
        return x, INVALID
    if abs(x) > 1e300 * 10:
        return x, INVALID
    return x, VALID if 1e-3 <= x <= 1000 else EITHER


ALPHA_VALUES = st.one_of(
    values(invalid=[*NON_FINITE, True, False, "8", None, [], {}, [8], "nan"], either=[0, -8, 0.0, 1e6, 1e300, -1e300, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True).map(alpha_class),
    st.integers(-(10**6), 10**6).map(alpha_class),
)
RANK_VALUES = values(valid=[R], invalid=[0, -R, float(R), 4.5, 8, 2, 2**63, *NON_FINITE, *WRONG_TYPES])
# patterns and the (layer, proj) modules of the per-expert seed they match, by PEFT's rule
PATTERNS_NONE = ["nomatch", r"layers\.9\..*", "q_proj", "experts", "", "gate_proj\n", "mlp"]
PATTERNS_ALL = ["gate_proj", r"layers\.1\..*", r"experts\.\d+\.down_proj", ".*_proj", r"model\.layers\.2\.mlp\.experts\.\d\.up_proj"]
PATTERNS_PART = [r"experts\.0\.gate_proj", r"layers\.1\.mlp\.experts\.[0-2]\.up_proj"]
PATTERNS_BAD = ["layers.(1", "[", "*", "(?P<x", "\\", "a{2,1}", "(?<=a+)b"]


def _rank_class(kind: str, value) -> str:
    # a matched module gets this rank; the tensors have rank R
    return VALID if kind == "none" or value == R else INVALID


def _alpha_class(kind: str, value) -> str:
    # a partial match gives some experts of a layer another alpha: refused (one spec per layer/proj)
    return INVALID if kind == "part" and value != ALPHA else VALID


def _alpha_class_kt(kind: str, value) -> str:
    # the KT reader resolves a layer by its expert 0 (every PATTERNS_PART pattern matches expert 0)
    return VALID


PATTERN_VALUES = {
    _rank_class: values(valid=[R, 8, 16], invalid=[0, -1, 1.5, "8", True, None, NAN, 10**400, [], float(R)]),
    _alpha_class: values(valid=[ALPHA, 3.0, 16], invalid=[NAN, INF, -INF, True, None, "8", [], Raw("1e400"), 10**400], either=[0, -2.0, 1e6]),
}
PATTERN_VALUES[_alpha_class_kt] = PATTERN_VALUES[_alpha_class]


def pattern_dict(value_class):
    """rank_pattern / alpha_pattern as (dict, outcome): a pattern of a known match kind and a value."""

    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(["none", "all", "part", "bad"]))
        pattern = draw(st.sampled_from({"none": PATTERNS_NONE, "all": PATTERNS_ALL, "part": PATTERNS_PART, "bad": PATTERNS_BAD}[kind]))
        value, vclass = draw(PATTERN_VALUES[value_class])
        if kind == "bad":
            return {pattern: value}, INVALID
        return {pattern: value}, vclass if vclass != VALID else value_class(kind, value)

    return build()


CONFIG_FIELDS = {
    "r": RANK_VALUES,
    "lora_alpha": ALPHA_VALUES,
    "use_rslora": values(valid=[True, False], invalid=["false", "true", "False", "no", [], {}, NAN, "", 2], either=[None, 0, 1, DELETE]),
    "peft_version": values(valid=["0.15.2", "0.21.0", "0.18.0.dev0@abc123", None, DELETE], invalid=[0.15, 15, True, [], {"v": 1}, ["0.15.2"]],
                           either=["banana", "", "0" * 5000, "1.2.3\n"]),
    "peft_type": values(valid=["LORA"], invalid=["IA3", "LOHA", "ADALORA", 1, [], True, {"t": 1}], either=["lora", "Lora", None, DELETE, " LORA"]),
    "use_dora": values(valid=[False, None, DELETE], invalid=[True], either=["false", "true", 0, 1, [], "", {}]),
    "fan_in_fan_out": values(valid=[False, None, DELETE], invalid=[True], either=["false", 0, 1, []]),
    "lora_bias": values(valid=[False, None, DELETE], invalid=[True], either=["false", 0, 1]),
    "rank_pattern": st.one_of(values(valid=[{}, None, DELETE], invalid=[[], "x", 5, True, [["gate_proj", 4]]]), pattern_dict(_rank_class)),
    "alpha_pattern": st.one_of(values(valid=[{}, None, DELETE], invalid=[[], "x", 5, True]), pattern_dict(_alpha_class)),
    "target_parameters": values(valid=[None, [], DELETE], invalid=[5, True, {"a": 1}, [5], [None]], either=["mlp.experts.x", ["mlp.experts.x"], ""]),
    "target_modules": values(valid=[None, ["gate_proj"], "all-linear", DELETE], either=[5, True, {}, [5], []]),
    "base_model_name_or_path": values(valid=[None, "Qwen/Qwen3-30B-A3B", "/nonexistent/dir", DELETE], either=[5, True, [], {}, "", "\n"]),
    "x_unknown_field": values(valid=[1, "x", None, [1, 2], {"a": {"b": [1]}}, nested(10)]),
}
KT_FIELDS = {**CONFIG_FIELDS, "alpha_pattern": st.one_of(values(valid=[{}, None, DELETE], invalid=[[], "x", 5, True]), pattern_dict(_alpha_class_kt))}
FUSED_FIELDS = {
    "r": values(invalid=[0, -R, float(R), 8, "4", True, None, NAN, 10**400]),
    "lora_alpha": ALPHA_VALUES,
    "use_rslora": CONFIG_FIELDS["use_rslora"],
    "peft_version": values(valid=["0.21.0", "0.19.1"], invalid=["0.18.0", "0.17.1", 0.21, 21, True, [], {"v": 1}], either=["banana", "", None, DELETE]),
    "target_parameters": values(invalid=[None, [], DELETE, 5, True, "mlp.experts.gate_up_proj", [5], ["mlp.experts.nothing"]],
                                either=[["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]]),
    "base_model_name_or_path": values(valid=[None, "/nonexistent/dir"], either=[5, True, [], {}, ""]),
}


@fuzz(120)
@given(data=st.data())
def test_adapter_config_field(seeds, sandbox, data):
    kind = data.draw(st.sampled_from(["per-expert", "per-expert", "kt", "fused"]), label="source")
    table = {"fused": FUSED_FIELDS, "kt": KT_FIELDS}.get(kind, CONFIG_FIELDS)
    n = data.draw(st.integers(1, 2), label="fields")
    keys = data.draw(st.lists(st.sampled_from(sorted(table)), min_size=n, max_size=n, unique=True), label="keys")
    with workspace(seeds) as w:
        src = copy_source(seeds, kind, w)
        changes, outcomes = [], []
        for key in keys:
            value, outcome = data.draw(table[key], label=key)
            edit_json(src / "adapter_config.json", key, value)
            changes.append(f"{key} = {show(value)}")
            outcomes.append(outcome)
        if kind == "kt" and "target_parameters" in keys:
            outcomes.append(EITHER)  # the KT reader names modules in the fused style then: patterns may not match
        outcome = worst(*outcomes)
        cmd = data.draw(st.sampled_from(COMMANDS), label="command")
        argv, expect = command(cmd, src, w, seeds, outcome, f"{kind} adapter_config.json: " + ", ".join(changes), base=kind == "fused")
        check_cli(sandbox, argv, expect, test="adapter_config")
        check_api(sandbox, "load_adapter", [src, seeds.model if kind == "fused" else None], Expect(outcome, expect.note), test="adapter_config-api")


# ---- 3. JSON files broken as a whole: adapter_config.json, config.json, model.safetensors.index.json ------

JSON_FILE_BREAKS = {
    # name: (how to rewrite the original text, outcome)
    "invalid UTF-8 byte": (lambda t, rnd: t[: rnd % len(t)] + b"\xff" + t[rnd % len(t) + 1 :], INVALID),
    "UTF-16": (lambda t, rnd: t.decode().encode("utf-16"), INVALID),
    "BOM": (lambda t, rnd: b"\xef\xbb\xbf" + t, EITHER),
    "empty": (lambda t, rnd: b"", INVALID),
    "whitespace": (lambda t, rnd: b" \n\t ", INVALID),
    "null": (lambda t, rnd: b"null", INVALID),
    "array": (lambda t, rnd: b"[" + t + b"]", INVALID),
    "string": (lambda t, rnd: json.dumps(t.decode()).encode(), INVALID),
    "number": (lambda t, rnd: b"1e400", INVALID),
    "NaN": (lambda t, rnd: b"NaN", INVALID),
    "truncated": (lambda t, rnd: t[: rnd % len(t)], INVALID),
    "trailing comma": (lambda t, rnd: t.rstrip()[:-1] + b",}", INVALID),
    "trailing garbage": (lambda t, rnd: t + b"}", INVALID),
    "deep nesting": (lambda t, rnd: t.rstrip()[:-1] + b', "x_deep": ' + nested(1000 + rnd % 100000).text.encode() + b"}", INVALID),
    "shallow nesting": (lambda t, rnd: t.rstrip()[:-1] + b', "x_deep": ' + nested(1 + rnd % 8).text.encode() + b"}", VALID),
    "5000-digit integer": (lambda t, rnd: t.rstrip()[:-1] + b', "x_big": ' + b"9" * 5000 + b"}", EITHER),
    "duplicate key, other value": (None, INVALID),  # built below: the file's first key again with another value
    "duplicate key, same value": (None, EITHER),
    "NUL byte": (lambda t, rnd: t[: rnd % len(t)] + b"\x00" + t[rnd % len(t) :], INVALID),
}
JSON_TARGETS = ["adapter_config.json of per-expert", "adapter_config.json of kt", "adapter_config.json of fused", "config.json", "index"]


def duplicate_first_key(text: bytes, same: bool) -> bytes:
    """The file's first key once more at the end, with its value or another one."""
    cfg = json.loads(text)
    key = next(iter(cfg))
    value = cfg[key] if same else {"x": 1} if isinstance(cfg[key], dict) else [cfg[key]]
    return text.rstrip()[:-1] + b", " + json.dumps(key).encode() + b": " + json.dumps(value).encode() + b"}"


@fuzz(60)
@given(data=st.data())
def test_json_file_broken(seeds, sandbox, data):
    target = data.draw(st.sampled_from(JSON_TARGETS), label="target")
    name = data.draw(st.sampled_from(sorted(JSON_FILE_BREAKS)), label="break")
    rnd = data.draw(st.integers(0, 2**32), label="position")
    with workspace(seeds) as w:
        if target.startswith("adapter_config"):
            kind = target.split()[-1]
            src = copy_source(seeds, kind, w)
            file = src / "adapter_config.json"
        else:
            src = w / "model"
            shutil.copytree(seeds.model if target == "config.json" else seeds.sharded, src)
            file = src / ("config.json" if target == "config.json" else "model.safetensors.index.json")
        text, (fn, outcome) = file.read_bytes(), JSON_FILE_BREAKS[name]
        file.write_bytes(duplicate_first_key(text, name.endswith("same value")) if fn is None else fn(text, rnd))
        note = f"{file.name} ({target}): {name}"
        if target.startswith("adapter_config"):
            cmd = data.draw(st.sampled_from(COMMANDS), label="command")
            argv, expect = command(cmd, src, w, seeds, outcome, note, base=kind == "fused")
            check_cli(sandbox, argv, expect, test="json_file")
            check_api(sandbox, "peft_config", [file], Expect(outcome, note), test="json_file-api")
        elif target == "config.json":
            cmd = data.draw(st.sampled_from(["inspect", "convert", "export-peft", "run"]), label="command")
            if cmd == "run":
                argv, expect = ["run", "--model", src, *RUN_ARGS], Expect(outcome, note, (src,))
            else:
                argv, expect = command(cmd, seeds.per_expert, w, seeds, outcome, note, base=True, model=src)
            check_cli(sandbox, argv, expect, test="json_file")
            check_api(sandbox, "moe_config", [src], Expect(outcome, note), test="json_file-api")
        else:
            check_cli(sandbox, ["run", "--model", src, "--adapter", seeds.per_expert, *RUN_ARGS], Expect(outcome, note, (src,)), test="json_file")
            check_api(sandbox, "checkpoint", [src], Expect(outcome, note), test="json_file-api")


# ---- 4. config.json of the base model: one field --------------------------------------------------------
# Each value: (value, codes) with codes for inspect --base / run --model / MoEConfig alone:
# V valid, I invalid, E either. The adapter is the per-expert seed (E 6, H 32, I 64, layers 1 and 2).

_CODES = {"V": VALID, "I": INVALID, "E": EITHER}
_SIZE_JUNK = [(0, "III"), ("6", "III"), (True, "III"), (None, "III"), ([6], "III"), (NAN, "III"), (Raw("1e400"), "III"), (DELETE, "III"), (6.5, "III")]
BASE_FIELDS = {
    "num_local_experts": [(6, "VVV"), (8, "IIV"), (5, "IIV"), (-6, "III"), (6.0, "EEE"), *_SIZE_JUNK],
    # an alias of num_local_experts beside it: agreeing, or null / 0 ("not this one"), or refused
    "num_experts": [(None, "EEE"), (0, "EEE"), (6, "VVV"), (8, "IIE"), ("6", "III"), (True, "III"), (-1, "III"), (6.5, "III")],
    "hidden_size": [(32, "VVV"), (64, "IIV"), (-32, "III"), (32.0, "EEE"), *_SIZE_JUNK],
    "moe_intermediate_size": [(64, "VVV"), (48, "IIV"), (0, "IIE"), (None, "IIE"), (DELETE, "IIE"), (-64, "III"), (64.5, "III"), ("64", "III"),
                              (True, "III"), ([], "III"), (NAN, "III")],
    "num_hidden_layers": [(3, "VVV"), (4, "VIV"), (5, "VIV"), (100, "VIV"), (2, "IIV"), (1, "IIV"), (0, "III"), (-3, "III"), (3.0, "EEE"),
                          (3.5, "III"), ("3", "III"), (True, "III"), (None, "III"), (DELETE, "III"), (NAN, "III")],
    "decoder_sparse_step": [(1, "VVV"), (DELETE, "VVV"), (None, "VEV"), (0, "EIE"), (2, "IIV"), (-1, "EEE"), (1.5, "III"), ("1", "III"),
                            (True, "EEE"), ([], "EIE")],
    "mlp_only_layers": [([], "VVV"), (DELETE, "VVV"), (None, "VVV"), ([0], "VIV"), ([1], "IIV"), ([2], "IIV"), ([-1], "EEE"), ([99], "EEE"),
                        ("1", "III"), (5, "III"), ({"1": 1}, "III"), ([1.0], "IIE"), ([True], "IIE"), (["1"], "III")],
    "first_k_dense_replace": [(0, "VVV"), (1, "VIV"), (2, "IIV"), ("1", "III"), (None, "EEE"), (-1, "EEE"), (1.5, "III")],
    "text_config": [({}, "VEV"), ({"num_experts": 8}, "EEE"), ([], "III"), ("x", "III"), (5, "III"), (None, "EEE"), (True, "III")],
    "model_type": [("qwen3_moe", "VVV"), ("bogus", "EIE"), (5, "EIE"), ("", "EIE"), (None, "EIE"), ("mixtral", "EIE"), (DELETE, "EIE")],
    "num_experts_per_tok": [(2, "VVV"), (1, "VVV"), (6, "VVV"), (0, "VIV"), (7, "VIV"), (-1, "VIV"), ("2", "VIV"), (None, "VIV"), (2.5, "VIV")],
    "vocab_size": [(96, "VVV"), (95, "VIV"), (0, "VIV"), (-1, "VIV"), ("96", "VIV"), (None, "VEV"), (96.0, "VEV")],
    "quantization_config": [(None, "VVV"), ({"quant_method": "fp8"}, "EIE"), ("x", "EIE"), ({}, "EEE"), ([], "EEE"), (5, "EIE")],
    "hidden_act": [("silu", "VVV"), ("bogus", "VIV"), ("gelu", "VEV"), (5, "VIV"), (None, "VIV")],
    "max_position_embeddings": [(32768, "VVV"), (5, "VVV"), (4, "VIV"), (1, "VIV"), (0, "VIV"), (-1, "VIV"), ("x", "VIV"), (None, "VEV")],
    "x_unknown_field": [(1, "VVV"), ({"a": [1]}, "VVV")],
}


@fuzz(100)
@given(data=st.data())
def test_base_config_field(seeds, sandbox, data):
    n = data.draw(st.integers(1, 2), label="fields")
    keys = data.draw(st.lists(st.sampled_from(sorted(BASE_FIELDS)), min_size=n, max_size=n, unique=True)
                     .filter(lambda ks: not ("first_k_dense_replace" in ks and {"decoder_sparse_step", "mlp_only_layers"} & set(ks))), label="keys")
    with workspace(seeds) as w:  # (first_k_dense_replace switches to DeepSeek's rule, where the Qwen keys mean nothing)
        model = w / "model"
        model.mkdir()
        for f in seeds.model.iterdir():
            (shutil.copy(f, model / f.name) if f.name == "config.json" else (model / f.name).symlink_to(f))
        changes, codes = [], []
        for key in keys:
            value, code = data.draw(st.sampled_from(BASE_FIELDS[key]), label=key)
            edit_json(model / "config.json", key, value)
            changes.append(f"{key} = {show(value)}")
            codes.append(code)
        inspect_o, run_o, alone_o = (worst(*(_CODES[c[i]] for c in codes)) for i in range(3))
        note = "config.json: " + ", ".join(changes)
        cmd = data.draw(st.sampled_from(["inspect", "run", "convert"]), label="command")
        if cmd == "run":
            argv, expect = ["run", "--model", model, *(["--adapter", seeds.per_expert] if data.draw(st.booleans()) else []), *RUN_ARGS], Expect(run_o, note, (model,))
        else:
            argv, expect = command(cmd, seeds.per_expert, w, seeds, inspect_o, note, base=True, model=model)
        check_cli(sandbox, argv, expect, test="base_config")
        check_api(sandbox, "moe_config", [model], Expect(alone_o, note), test="base_config-api")


# Other families' own fields, through `run` (the outcome of run; MoEConfig alone judges only its own keys).
FAMILY_FIELDS = {
    "deepseek_v3": {
        "n_group": [(1, "V"), (2, "V"), (3, "V"), (4, "I"), (7, "I"), (0, "I"), (-1, "I"), ("1", "I"), (None, "E")],
        "topk_group": [(1, "V"), (0, "I"), (2, "I"), (-1, "I"), ("1", "I")],
        "num_experts_per_tok": [(2, "V"), (6, "V"), (7, "I"), (0, "I"), (-1, "I")],
        "routed_scaling_factor": [(2.5, "V"), (1.0, "V"), (NAN, "I"), (INF, "I"), ("x", "I"), (-1.0, "E"), (0.0, "E")],
        "n_routed_experts": [(6, "V"), (8, "I"), (4, "I"), (0, "I"), ("6", "I")],
        "moe_layer_freq": [(1, "V"), (0, "I"), (2, "I"), ("1", "I")],
        "first_k_dense_replace": [(1, "V"), (0, "I"), (2, "I"), (3, "I"), ("1", "I"), (-1, "I")],
        "kv_lora_rank": [(16, "V"), (8, "I"), (0, "I")],
        "qk_rope_head_dim": [(4, "V"), (3, "I"), (0, "I")],
        "rope_parameters": [({"rope_theta": 10000.0, "rope_type": "default"}, "V"), ({"rope_type": "bogus"}, "I"), ("x", "I")],
        "hidden_act": [("silu", "V"), ("bogus", "I")],
    },
    "mixtral": {
        "num_local_experts": [(4, "V"), (5, "I"), (3, "I"), (0, "I")],
        "num_experts_per_tok": [(2, "V"), (4, "V"), (5, "I"), (0, "I"), (-1, "I")],
        "sliding_window": [(None, "V"), (4096, "V"), ("x", "I"), (0, "E"), (-1, "E")],
        "router_jitter_noise": [(0.0, "V"), (NAN, "E"), ("x", "I")],
    },
    "qwen2_moe": {
        "shared_expert_intermediate_size": [(40, "V"), (48, "I"), (0, "I"), ("40", "I")],
        "num_experts": [(6, "V"), (7, "I"), (0, "I")],
        "norm_topk_prob": [(False, "V"), (True, "V"), ("x", "E")],
        "decoder_sparse_step": [(1, "V"), (2, "I"), (0, "I")],
    },
}
_OWN_KEYS = {"n_routed_experts", "num_local_experts", "num_experts", "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step"}


@fuzz(60)
@given(data=st.data())
def test_family_config_field(seeds, sandbox, model_dir, data):
    family = data.draw(st.sampled_from(sorted(FAMILY_FIELDS)), label="family")
    key = data.draw(st.sampled_from(sorted(FAMILY_FIELDS[family])), label="key")
    value, code = data.draw(st.sampled_from(FAMILY_FIELDS[family][key]), label="value")
    with workspace(seeds) as w:
        model = w / "model"
        model.mkdir()
        for f in model_dir(family).iterdir():
            (shutil.copy(f, model / f.name) if f.name == "config.json" else (model / f.name).symlink_to(f))
        edit_json(model / "config.json", key, value)
        note = f"{family} config.json: {key} = {show(value)}"
        # the per-expert seed fits deepseek_v3's tiny model (E 6, H 32, I 64, MoE layers 1 and 2)
        adapter = ["--adapter", seeds.per_expert] if family == "deepseek_v3" and data.draw(st.booleans(), label="adapter") else []
        check_cli(sandbox, ["run", "--model", model, *adapter, *RUN_ARGS], Expect(_CODES[code], note, (model,)), test="family_config")
        own = key in _OWN_KEYS and _CODES[code] == INVALID and not isinstance(value, int)
        check_api(sandbox, "moe_config", [model], Expect(INVALID if own else EITHER, note), test="family_config-api")


# LoRA on modules the base model does not have (or not as a linear layer of that shape): refused once the base is known.
FOREIGN_MODULES = {
    "self_attn.bogus_proj": ("model.layers.1.self_attn.bogus_proj", (R, H), (H, R), INVALID),
    "a Qwen2-MoE shared expert": ("model.layers.1.mlp.shared_expert.gate_proj", (R, H), (40, R), INVALID),
    "a layer beyond the model": ("model.layers.7.self_attn.q_proj", (R, H), (H, R), INVALID),
    "q_proj of another shape": ("model.layers.1.self_attn.q_proj", (R, H + 8), (H, R), INVALID),
    "an RMSNorm": ("model.layers.1.self_attn.q_norm", (R, 8), (8, R), INVALID),
    "the embedding": ("model.embed_tokens", (R, 96), (H, R), INVALID),
    "the router": ("model.layers.1.mlp.gate", (R, H), (E, R), EITHER),
    "lm_head": ("lm_head", (R, H), (96, R), EITHER),
    "q_proj (a module it has)": ("model.layers.1.self_attn.q_proj", (R, H), (H, R), VALID),
}


@pytest.mark.parametrize("case", list(FOREIGN_MODULES))
@fuzz(2, shrink=False)
@given(cmd=st.sampled_from(COMMANDS), base=st.booleans())
def test_foreign_module(seeds, sandbox, case, cmd, base):
    module, a_shape, b_shape, outcome = FOREIGN_MODULES[case]
    g = torch.Generator().manual_seed(5)
    with workspace(seeds) as w:
        src = copy_source(seeds, "per-expert", w)
        extra = {f"base_model.model.{module}.lora_A.weight": torch.randn(a_shape, generator=g) * 0.2,
                 f"base_model.model.{module}.lora_B.weight": torch.randn(b_shape, generator=g) * 0.2}
        edit_tensors(src / WEIGHTS, lambda t: t.update(extra))
        known = base or cmd == "run"  # without the base, nothing says the module is foreign
        argv, expect = command(cmd, src, w, seeds, outcome if known or outcome == VALID else EITHER, f"LoRA on {case} ({module})", base=base)
        if not base:
            expect.readback = None  # reading the output back needs the base (fused), which then refuses the module
        check_cli(sandbox, argv, expect, test="foreign_module")


# ---- 5. model.safetensors.index.json: the weight map -----------------------------------------------------


@fuzz(50)
@given(data=st.data())
def test_index_json(seeds, sandbox, data):
    with workspace(seeds) as w:
        model = w / "model"
        model.mkdir()
        for f in seeds.sharded.iterdir():
            (shutil.copy(f, model / f.name) if f.suffix == ".json" else (model / f.name).symlink_to(f))
        index_path = model / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        wm = index["weight_map"]
        key = data.draw(st.sampled_from(sorted(wm)), label="key")
        shards = sorted(set(wm.values()))
        other = next(s for s in shards if s != wm[key])
        how = data.draw(st.sampled_from(["weight_map", "value", "drop", "add", "rename", "metadata", "extra"]), label="change")
        if how == "weight_map":
            v, outcome = data.draw(values(invalid=[[], "x", 5, None, True, DELETE, [[key, wm[key]]]]))
            index.pop("weight_map") if v is DELETE else index.__setitem__("weight_map", v)
            note = f"weight_map = {show(v)}"
        elif how == "value":
            v, outcome = data.draw(values(
                invalid=[5, None, [], {}, "", "missing.safetensors", "/etc/hostname", "config.json", other, wm[key] + "\n", "/dev/zero"],
                either=[f"../{seeds.sharded.name}/{wm[key]}", f"./{wm[key]}", str(seeds.sharded / wm[key])]))
            wm[key] = v
            note = f"weight_map[{key!r}] = {show(v)}"
        elif how == "drop":
            del wm[key]
            outcome, note = INVALID, f"weight_map without {key!r}"
        elif how == "add":
            new = data.draw(st.sampled_from(["model.bogus.weight", key + ".x", "model.layers.9.mlp.gate.weight", ""]))
            wm[new] = wm[key]
            outcome, note = INVALID, f"weight_map with {new!r} (in no shard)"
        elif how == "rename":
            wm[key + "_"] = wm.pop(key)
            outcome, note = INVALID, f"weight_map key {key!r} renamed"
        elif how == "metadata":
            v, outcome = data.draw(values(either=["x", 5, {"total_size": "big"}, {"total_size": -1}, {"total_size": 10**30}, None, DELETE]))
            index.pop("metadata", None) if v is DELETE else index.__setitem__("metadata", v)
            note = f"metadata = {show(v)}"
        else:
            index["x_extra"], outcome, note = {"a": 1}, VALID, "an extra top-level key"
        index_path.write_text(dump_json(index))
        argv = ["run", "--model", model, *(["--adapter", seeds.per_expert] if data.draw(st.booleans()) else []), *RUN_ARGS]
        check_cli(sandbox, argv, Expect(outcome, "index: " + note, (model,)), test="index")
        # Checkpoint alone does not know which tensors the model needs: only a broken map or shard path is its to refuse
        structural = how == "weight_map" or (how == "value" and outcome == INVALID and v != other)
        check_api(sandbox, "checkpoint", [model], Expect(INVALID if structural else EITHER, "index: " + note), test="index-api")


# ---- 6. seed .pt files: the layout broken ----------------------------------------------------------------


def _seed_obj(seeds: Seeds) -> dict:
    return torch.load(seeds.seed_pt, weights_only=True)  # our own file


@st.composite
def mutated_seed_pt(draw, obj: dict):
    """(object to torch.save or raw bytes, what was done, outcome)."""
    meta, L = obj["metadata"], draw(st.sampled_from(LAYERS))
    lk, name = f"layer_{L}", draw(st.sampled_from(sorted(obj[f"layer_{L}"])))
    t = obj[lk][name]
    kind = draw(st.sampled_from(["top", "metadata", "rank", "alpha", "sizes", "extra-meta", "layer-key", "layer-value", "tensor", "drop",
                                 "extra-tensor", "extra-key", "bytes"]))
    if kind == "top":
        v = draw(st.sampled_from([[obj], t, 5, None, "x", {k: v for k, v in obj.items() if k != "metadata"}]))
        return v, f"the whole object is {type(v).__name__}" + (" without metadata" if isinstance(v, dict) else ""), INVALID
    if kind == "metadata":
        v = draw(st.sampled_from([[], "x", None, 5, torch.tensor([4.0])]))
        return {**obj, "metadata": v}, f"metadata = {show(v)}", INVALID
    if kind in ("rank", "alpha"):
        key = "lora_rank" if kind == "rank" else "lora_alpha"
        v, outcome = draw(values(valid=[R], invalid=[0, -R, 8, 4.5, float(R), "4", True, None, NAN, INF, 10**400, torch.tensor(R), DELETE])
                          if kind == "rank" else
                          values(valid=[ALPHA, 8, 16.0, 0.5], invalid=[NAN, INF, -INF, True, "8", None, 10**400, torch.tensor(ALPHA), [ALPHA], DELETE],
                                 either=[0, -8, 1e300, 0.0]))
        m = {k: x for k, x in meta.items() if k != key} if v is DELETE else {**meta, key: v}
        return {**obj, "metadata": m}, f"metadata.{key} = {show(v)}", outcome
    if kind == "sizes":
        key, right = draw(st.sampled_from([("num_experts", E), ("hidden_size", H), ("intermediate_size", I)]))
        v, outcome = draw(values(valid=[right], invalid=[right + 1, str(right), True, -right, None], either=[float(right)]))
        return {**obj, "metadata": {**meta, key: v}}, f"metadata.{key} = {show(v)}", outcome
    if kind == "extra-meta":
        v = draw(st.sampled_from([{"num_layers": 2}, {"foo": "bar"}, {"nested": {"a": [1]}}]))
        return {**obj, "metadata": {**meta, **v}}, f"metadata plus {v}", VALID
    if kind == "layer-key":
        new, outcome = draw(values(invalid=["layer_x", "layer_", "layer_-1", f"layer_{L}.0", f"LAYER_{L}", f"layer{L}", L, (L,)],
                                   either=[f"layer_0{L}", f"layer_ {L}", f"layer_0_{L}", f"layer_{chr(0x660 + L)}", f"layer_+{L}"]))
        out = {k: v for k, v in obj.items() if k != lk}
        out[new] = obj[lk]
        return out, f"{lk} renamed {new!r}", outcome
    if kind == "layer-value":
        v = draw(st.sampled_from([[], None, t, "x", 5, [obj[lk]]]))
        return {**obj, lk: v}, f"{lk} = {type(v).__name__}", INVALID
    if kind == "tensor":
        how = draw(st.sampled_from(["not-tensor", "2-D", "4-D", "rank", "int64", "int32", "bool", "uint8", "complex64", "float16", "bfloat16",
                                    "float64", "nan", "inf", "strides", "requires-grad", "parameter", "no-experts", "sparse"]))
        e, r, d = t.shape
        v = {
            "not-tensor": lambda: draw(st.sampled_from([5, "x", [1.0], None, {}])), "2-D": lambda: t[0], "4-D": lambda: t[None],
            "rank": lambda: torch.randn(e, r + 1, d) if name.endswith("_a") else torch.randn(e, r, d + 1),
            "no-experts": lambda: t[:0], "nan": lambda: t.clone().index_put_((torch.tensor([1]),), torch.tensor(NAN)),
            "inf": lambda: t.clone().index_put_((torch.tensor([0]),), torch.tensor(INF)),
            "strides": lambda: t.transpose(1, 2).contiguous().transpose(1, 2), "requires-grad": lambda: t.clone().requires_grad_(),
            "parameter": lambda: torch.nn.Parameter(t.clone()), "sparse": lambda: t.to_sparse(),
        }.get(how, lambda: (t * 10).to(getattr(torch, how)))()
        outcome = {"strides": EITHER, "requires-grad": VALID, "parameter": EITHER, "float16": EITHER, "bfloat16": EITHER, "float64": EITHER}.get(how, INVALID)
        return {**obj, lk: {**obj[lk], name: v}}, f"{lk}.{name}: {how}", outcome
    if kind == "drop":
        return {**obj, lk: {k: v for k, v in obj[lk].items() if k != name}}, f"{lk} without {name}", INVALID
    if kind == "extra-tensor":
        return {**obj, lk: {**obj[lk], "bias": torch.randn(4)}}, f"{lk} with an extra tensor 'bias'", EITHER
    if kind == "extra-key":
        v, outcome = draw(values(invalid=[("layers_3", dict(obj[lk])), ("LAYER_3", dict(obj[lk]))], either=[("optimizer", {}), ("step", 5)]))
        return {**obj, v[0]: v[1]}, f"an extra top-level key {v[0]!r}", outcome
    how = draw(st.sampled_from(["truncated", "random", "empty", "legacy", "extra-member"]))
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=how != "legacy")
    b = buf.getvalue()
    if how == "truncated":
        i = draw(st.integers(0, len(b) - 1))
        return b[:i], f"file cut at byte {i} of {len(b)}", INVALID
    if how == "random":
        return draw(st.binary(min_size=1, max_size=256)), "random bytes", INVALID
    if how == "empty":
        return b"", "an empty file", INVALID
    if how == "legacy":
        return b, "torch.save's legacy (non-zip) format", EITHER
    out = io.BytesIO(b)
    with zipfile.ZipFile(out, "a") as z:
        z.writestr("archive/extra.bin", b"hello")
    return out.getvalue(), "an extra member in the zip", EITHER


@fuzz(80)
@given(data=st.data())
def test_seed_pt(seeds, sandbox, data):
    with workspace(seeds) as w:
        obj, note, outcome = data.draw(mutated_seed_pt(_seed_obj(seeds)), label="mutation")
        src = w / "seed.pt"
        if isinstance(obj, bytes):
            src.write_bytes(obj)
        else:
            torch.save(obj, src)
        cmd = data.draw(st.sampled_from(COMMANDS), label="command")
        argv, expect = command(cmd, src, w, seeds, outcome, "seed .pt: " + note)
        check_cli(sandbox, argv, expect, test="seed_pt")
        check_api(sandbox, "load_adapter", [src, None], Expect(outcome, expect.note), test="seed_pt-api")


# ---- 7. pickles that need a non-tensor global: refused, never run -------------------------------------------


def _pickles(obj: dict, marker: Path) -> dict:
    meta = obj["metadata"]
    layers = {k: v for k, v in obj.items() if k != "metadata"}
    import numpy as np

    return {
        "Payload in metadata": ({"metadata": Payload(str(marker)), **layers}, INVALID),
        "Payload at the top": (Payload(str(marker)), INVALID),
        "functools.partial(os.system)": ({"metadata": {**meta, "x": functools.partial(os.system, f"touch {marker}")}, **layers}, INVALID),
        "io.open": ({"metadata": {**meta, "open": io.open}, **layers}, INVALID),
        "datetime.date": ({"metadata": {**meta, "when": datetime.date(2024, 1, 1)}, **layers}, INVALID),
        "a plain object": (Plain(), INVALID),
        "pathlib path": ({"metadata": {**meta, "path": pathlib.PurePosixPath("x")}, **layers}, INVALID),
        "torch.nn.Linear": ({"metadata": meta, "module": torch.nn.Linear(2, 2), **layers}, INVALID),
        "OrderedDict": (OrderedDict([("metadata", meta), *layers.items()]), VALID),
        "a set": ({"metadata": {**meta, "s": {1, 2}}, **layers}, EITHER),
        "a complex number": ({"metadata": {**meta, "c": 1j}, **layers}, EITHER),
        "a numpy array": ({"metadata": {**meta, "a": np.ones(2)}, **layers}, EITHER),
    }


@pytest.mark.parametrize("case", list(_pickles({"metadata": {}}, Path("m"))))
def test_pickle_with_globals(seeds, sandbox, case):
    with workspace(seeds) as w:
        marker = w / "marker"
        obj, outcome = _pickles(_seed_obj(seeds), marker)[case]
        src = w / "evil.pt"
        torch.save(obj, src)
        for cmd in COMMANDS:
            argv, expect = command(cmd, src, w, seeds, outcome, f"seed .pt with {case}")
            check_cli(sandbox, argv, expect, test="pickle")
            assert not marker.exists(), f"{case}: the pickle was run"


# ---- 8. keys that normalise to the same tensor --------------------------------------------------------------

# per-expert PEFT key -> another spelling of the same tensor
PE_SPELLINGS = {
    "without base_model.model.": lambda k: k.removeprefix("base_model.model."),
    ".default": lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"),
    "experts.0N": lambda k: re.sub(r"experts\.(\d+)\.", r"experts.0\1.", k),
    "layers.0N": lambda k: re.sub(r"layers\.(\d+)\.", r"layers.0\1.", k),
    "base_model.model. twice": lambda k: "base_model.model." + k,
    "original_moe.": lambda k: k.replace(".mlp.experts.", ".mlp.original_moe.experts."),
    "Arabic-Indic digits": lambda k: re.sub(r"experts\.(\d)\.", lambda m: f"experts.{chr(0x660 + int(m[1]))}.", k),
}
CANON_SPELLINGS = {"layers.0N": lambda k: re.sub(r"layers\.(\d+)\.", r"layers.0\1.", k)}
SEED_SPELLINGS = {"layer_0N": "layer_0{L}", "layer_+N": "layer_+{L}", "layer_ N": "layer_ {L}", "layer_0_N": "layer_0_{L}"}


@fuzz(40)
@given(data=st.data())
def test_keys_normalising_to_one_tensor(seeds, sandbox, data):
    kind = data.draw(st.sampled_from(["per-expert", "per-expert-module", "fused", "canonical", "seed-pt", "per-expert-renamed"]), label="kind")
    cmd = data.draw(st.sampled_from(COMMANDS), label="command")
    with workspace(seeds) as w:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="seed"))
        if kind == "seed-pt":
            L = data.draw(st.sampled_from(LAYERS))
            spelling = data.draw(st.sampled_from(sorted(SEED_SPELLINGS)))
            obj = _seed_obj(seeds)
            obj[SEED_SPELLINGS[spelling].format(L=L)] = {k: torch.randn(v.shape, generator=g) for k, v in obj[f"layer_{L}"].items()}
            src = w / "seed.pt"
            torch.save(obj, src)
            note, outcome = f"seed .pt: layer_{L} and {SEED_SPELLINGS[spelling].format(L=L)!r}", INVALID
        else:
            src = copy_source(seeds, {"per-expert-module": "per-expert", "per-expert-renamed": "per-expert"}.get(kind, kind), w)
            file = src if src.is_file() else src / WEIGHTS
            header, payload = read_safetensors(file)
            from safetensors.torch import load_file

            tensors = load_file(file)
            meta = header.get("__metadata__")
            if kind == "per-expert-module":
                q = "base_model.model.model.layers.1.self_attn.q_proj"
                tensors[f"{q}.lora_A.weight"], tensors[f"{q}.lora_B.weight"] = torch.randn(R, H, generator=g), torch.randn(H, R, generator=g)
            spellings = CANON_SPELLINGS if kind == "canonical" else PE_SPELLINGS if kind != "fused" else {k: PE_SPELLINGS[k] for k in ("without base_model.model.", ".default", "layers.0N", "base_model.model. twice")}
            spelling = data.draw(st.sampled_from(sorted(spellings)), label="spelling")
            pool = sorted(k for k in tensors if ("self_attn" in k) == (kind == "per-expert-module"))
            if kind == "per-expert-renamed":  # every key respelt, no duplicate: the same adapter
                spelling = data.draw(st.sampled_from(["without base_model.model.", ".default"]), label="renaming")
                tensors = {spellings[spelling](k): v for k, v in tensors.items()}
                note, outcome = f"every key respelt: {spelling}", VALID
            else:
                key = data.draw(st.sampled_from(pool), label="key")
                new = spellings[spelling](key)
                if new == key or new in tensors:
                    new = "base_model.model." + key  # a spelling that does not apply to this key
                tensors[new] = torch.randn(tensors[key].shape, generator=g)
                note, outcome = f"{kind}: {key!r} and {new!r}", INVALID
            save_file(tensors, str(file), metadata=meta)
        argv, expect = command(cmd, src, w, seeds, outcome, note, base=kind == "fused")
        check_cli(sandbox, argv, expect, test="duplicates")


# ---- 9. size bombs: claimed sizes far beyond the files ------------------------------------------------------


def _bomb(case: str, seeds: Seeds, w: Path, n: int) -> list[tuple[list, Expect]]:
    """The calls of one size-bomb case with claimed size ``n``."""
    note = f"{case} (N = {n})"
    out = []

    def cmds(src, outcome, *, base=False, commands=("inspect", "convert", "export-peft"), model=None):
        for c in commands:
            out.append(command(c, src, w, seeds, outcome, note, base=base, model=model))

    def model_with(key, value):
        m = w / "model"
        shutil.copytree(seeds.model, m)
        edit_json(m / "config.json", key, value)
        return m

    if case == "expert id N in a per-expert key":
        src = copy_source(seeds, "per-expert", w)
        edit_tensors(src / WEIGHTS, lambda t: t.update({pe_key(1, n, "gate_proj", ab): t[pe_key(1, 0, "gate_proj", ab)].clone() for ab in "AB"}))
        cmds(src, INVALID)
        cmds(src, INVALID, base=True, commands=("inspect", "run"))
    elif case == "layer id N in a per-expert key":
        src = copy_source(seeds, "per-expert", w)
        edit_tensors(src / WEIGHTS, lambda t: t.update({pe_key(n, 0, "gate_proj", ab): t[pe_key(1, 0, "gate_proj", ab)].clone() for ab in "AB"}))
        cmds(src, INVALID, commands=("inspect", "convert", "run"))
    elif case in ("num_experts N in config.json", "hidden_size N in config.json", "moe_intermediate_size N in config.json"):
        m = model_with(case.split()[0], n)
        cmds(seeds.per_expert, INVALID, base=True, model=m, commands=("inspect", "run"))
        out.append((["run", "--model", m, *RUN_ARGS], Expect(INVALID, note, (m,))))
    elif case == "num_hidden_layers N in config.json":
        m = model_with("num_hidden_layers", n)
        cmds(seeds.per_expert, EITHER, base=True, model=m, commands=("inspect",))
        out.append((["run", "--model", m, *RUN_ARGS], Expect(INVALID, note, (m,))))
    elif case == "seed .pt tensors expanded to N experts":
        obj = _seed_obj(seeds)
        k = min(n, 2**50)
        for lk in (f"layer_{L}" for L in LAYERS):
            obj[lk] = {name: torch.ones(1, 1, 1).expand(k, *t.shape[1:]) for name, t in obj[lk].items()}
        src = w / "seed.pt"
        torch.save(obj, src)
        cmds(src, INVALID, commands=COMMANDS)
    elif case == "lora_rank N in seed .pt metadata":
        obj = _seed_obj(seeds)
        obj["metadata"]["lora_rank"] = n
        torch.save(obj, w / "seed.pt")
        cmds(w / "seed.pt", INVALID)
    elif case in ("num_experts N in canonical metadata", "rank N in canonical layers metadata"):
        src = copy_source(seeds, "canonical", w)
        h, d = read_safetensors(src)
        if case.startswith("num_experts"):
            h["__metadata__"]["num_experts"] = str(n)
        else:
            layers = json.loads(h["__metadata__"]["layers"])
            h["__metadata__"]["layers"] = json.dumps({L: {p: {**s, "rank": n} for p, s in ps.items()} for L, ps in layers.items()})
        src.write_bytes(safetensors_bytes(h, d))
        cmds(src, INVALID, commands=COMMANDS)
    elif case == "layer id N in a canonical key":
        src = copy_source(seeds, "canonical", w)
        h, d = read_safetensors(src)
        h = {re.sub(r"^layers\.2\.", f"layers.{n}.", k): v for k, v in h.items()}
        layers = json.loads(h["__metadata__"]["layers"])
        h["__metadata__"]["layers"] = json.dumps({("%d" % n if L == "2" else L): ps for L, ps in layers.items()})
        src.write_bytes(safetensors_bytes(h, d))
        cmds(src, EITHER, commands=("inspect", "convert"))
        cmds(src, INVALID, base=True, commands=("inspect", "run"))
    elif case in ("r N in adapter_config.json", "rank_pattern value N"):
        src = copy_source(seeds, "per-expert", w)
        edit_json(src / "adapter_config.json", *(("r", n) if case.startswith("r ") else ("rank_pattern", {"gate_proj": n})))
        cmds(src, INVALID, commands=COMMANDS)
    elif case == "adapter_config.json nested N deep":
        src = copy_source(seeds, "per-expert", w)
        edit_json(src / "adapter_config.json", "x_deep", nested(min(n, 10**6)))
        cmds(src, INVALID, commands=("inspect", "run"))
    elif case == "config.json is /dev/zero":
        m = w / "model"
        shutil.copytree(seeds.model, m)
        (m / "config.json").unlink()
        (m / "config.json").symlink_to("/dev/zero")
        cmds(seeds.per_expert, INVALID, base=True, model=m, commands=("inspect", "run"))
    elif case == "adapter_config.json is /dev/urandom":
        src = copy_source(seeds, "per-expert", w)
        (src / "adapter_config.json").unlink()
        (src / "adapter_config.json").symlink_to("/dev/urandom")
        cmds(src, INVALID, commands=("inspect", "run"))
    elif case == "adapter_config.json of 64 MiB":
        src = copy_source(seeds, "per-expert", w)
        cfg = (src / "adapter_config.json").read_bytes()
        (src / "adapter_config.json").write_bytes(b" " * (64 << 20) + cfg)
        cmds(src, EITHER, commands=("inspect",))
    elif case == "safetensors length prefix N":
        src = copy_source(seeds, "canonical", w)
        h, d = read_safetensors(src)
        src.write_bytes(safetensors_bytes(h, d, length=n % 2**64))
        cmds(src, INVALID, commands=("inspect",))
    else:  # run options
        opt = {"run --max-new-tokens N": ["--max-new-tokens", n], "run --prompt-ids N": ["--prompt-ids", f"1,{n}"],
               "run --threads N": ["--threads", n], "run --top-k N": ["--temperature", "0.7", "--top-k", n],
               "run --seed N": ["--temperature", "0.7", "--seed", n]}[case]
        outcome = EITHER if case in ("run --top-k N", "run --seed N") else INVALID
        out.append((["run", "--model", seeds.model, "--adapter", seeds.per_expert, *RUN_ARGS, *opt], Expect(outcome, note, (seeds.model,))))
    return out


BOMBS = [
    "expert id N in a per-expert key", "layer id N in a per-expert key", "num_experts N in config.json", "hidden_size N in config.json",
    "moe_intermediate_size N in config.json", "num_hidden_layers N in config.json", "seed .pt tensors expanded to N experts",
    "lora_rank N in seed .pt metadata", "num_experts N in canonical metadata", "rank N in canonical layers metadata", "layer id N in a canonical key",
    "r N in adapter_config.json", "rank_pattern value N", "adapter_config.json nested N deep", "config.json is /dev/zero",
    "adapter_config.json is /dev/urandom", "adapter_config.json of 64 MiB", "safetensors length prefix N", "run --max-new-tokens N",
    "run --prompt-ids N", "run --threads N", "run --top-k N", "run --seed N",
]


@pytest.mark.parametrize("case", BOMBS)
@fuzz(2, shrink=False)
@given(n=st.one_of(st.sampled_from([10**9, 2**40]), st.integers(10**8, 2**62)))
def test_size_bomb(seeds, sandbox, case, n):
    """Claimed sizes are checked against the base config and the bytes the files hold before anything is allocated."""
    with workspace(seeds) as w:
        for argv, expect in _bomb(case, seeds, w, n):
            check_cli(sandbox, argv, expect, test="size_bomb")


# ---- 10. rank_pattern / alpha_pattern: catastrophic regexes, and PEFT's rule ---------------------------------

CATASTROPHIC = ["({a}+)+X", "({a}*)*X", "({a}|{a})*X", r"({a}+)*\d{{3}}Z", "(.*{a})*X", "(({a}+)+)+!", r"model\.({a}+)+X"]


@pytest.mark.parametrize("shape", CATASTROPHIC)
@fuzz(1, shrink=False)
@given(atom=st.sampled_from([".", r"\w", "[a-z0-9._]", r"\S", "[^X]"]), field=st.sampled_from(["rank_pattern", "alpha_pattern"]),
       cmd=st.sampled_from(["inspect", "run", "convert"]))
def test_catastrophic_pattern(seeds, sandbox, shape, atom, field, cmd):
    """Patterns that backtrack exponentially in Python's re match nothing here: the default applies, in bounded time."""
    pattern = shape.format(a=atom)
    with workspace(seeds) as w:
        src = copy_source(seeds, "per-expert", w)
        edit_json(src / "adapter_config.json", field, {pattern: R if field == "rank_pattern" else 2.0})
        argv, expect = command(cmd, src, w, seeds, EITHER, f"{field} {{{pattern!r}: ...}}")
        check_cli(sandbox, argv, expect, test="catastrophic_pattern")


SEGMENTS = ["model", "layers", "{L}", "mlp", "experts", "{e}", "{p}"]
SEGMENT_CHOICES = {
    "{L}": ["1", "2", "[12]", r"\d+", r"\d", ".", "3"],
    "{e}": ["0", "3", r"\d+", "[0-2]", "[3-5]", ".", "7"],
    "{p}": ["gate_proj", "up_proj", "down_proj", "(gate|up)_proj", "(up|down)_proj", "[a-z]+_proj", ".*", "q_proj"],
}


@st.composite
def peft_pattern(draw):
    """A pattern over the per-expert module names (model.layers.L.mlp.experts.e.proj): a suffix of segments."""
    start = draw(st.integers(0, len(SEGMENTS) - 1))
    end = draw(st.integers(start + 1, len(SEGMENTS)))
    parts = [draw(st.sampled_from(SEGMENT_CHOICES.get(s, [s, s, ".*", "[a-z]+"]))) for s in SEGMENTS[start:end]]
    p = r"\.".join(parts)
    return draw(st.sampled_from([p, p, ".*" + p, p + ".*", "(" + p + ")"]))


def peft_rule(patterns: dict, name: str):
    """PEFT's resolution (peft.utils.other.get_pattern_key): the first pattern p with re.match(rf"(.*\\.)?({p})$", name)."""
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", name)), None)


@fuzz(40)
@given(alphas=st.dictionaries(peft_pattern(), st.sampled_from([2.0, 3.0, 16.0, ALPHA]), min_size=1, max_size=3),
       ranks=st.dictionaries(peft_pattern(), st.sampled_from([R, 8]), max_size=2), rslora=st.booleans())
def test_patterns_follow_peft_rule(seeds, sandbox, alphas, ranks, rslora):
    """Each layer and projection gets the rank / alpha PEFT's own rule gives its modules; disagreeing experts are refused."""
    names = {(L, p): [f"model.layers.{L}.mlp.experts.{e}.{p}_proj" for e in range(E)] for L in LAYERS for p in ("gate", "up", "down")}
    expected, outcome = {}, VALID
    for lp, modules in names.items():
        specs = {(peft_rule(ranks, m) or R, peft_rule(alphas, m) or ALPHA) for m in modules}
        if len(specs) > 1 or next(iter(specs))[0] != R:
            outcome = INVALID
        expected[lp] = next(iter(specs))[1]
    with workspace(seeds) as w:
        src = copy_source(seeds, "per-expert", w)
        for key, v in (("alpha_pattern", alphas), ("rank_pattern", ranks), ("use_rslora", rslora)):
            edit_json(src / "adapter_config.json", key, v)
        argv, expect = command("inspect", src, w, seeds, outcome, f"alpha_pattern {alphas}, rank_pattern {ranks}", extra=("--json",))
        call = check_cli(sandbox, argv, expect, test="peft_rule")
        if outcome == VALID and call.exit_code == 0:
            layers = json.loads(call.stdout)["layers"]
            for (L, p), alpha in expected.items():
                spec = layers[str(L)][p]
                assert spec["alpha"] == alpha, (L, p, spec, alpha)
                assert math.isclose(spec["scaling"], alpha / (math.sqrt(R) if rslora else R), rel_tol=1e-12), (L, p, spec)


# ---- 11. options of inspect / convert / export-peft ---------------------------------------------------------


def misspelt(choices: list[str]):
    """Near misses of the valid choices (case, a letter more or less, spaces), never a valid one."""
    near = st.sampled_from(choices).flatmap(lambda c: st.sampled_from([c.upper(), c.capitalize(), c + "s", c[:-1], " " + c, c + "\n", c[1:], c + c[-1]]))
    return st.one_of(near, st.sampled_from(["", "none", "gguf", "fp16", "float32", "stacked", "-", "\t"])).filter(lambda v: v not in choices)


FLOAT_OPTION = values(valid=["8", "0.5", "16"], invalid=["nan", "inf", "-inf", "1e400", "-1e400"], either=["0", "-8", "1e300", "1e-300"])


@fuzz(80)
@given(data=st.data())
def test_adapter_command_options(seeds, sandbox, data):
    cmd = data.draw(st.sampled_from(["inspect", "convert", "export-peft"]), label="command")
    kind = data.draw(st.sampled_from(["per-expert", "canonical", "seed-pt", "kt", "kt-noconfig", "fused", "f64-big", "f32-big"]), label="source")
    options = {"--orientation": ["auto", "new", "old"], "--lora-alpha": None, "--base": None}
    if cmd != "inspect":
        options["--dtype"] = ["keep", "bf16", "fp32"]
    if cmd == "convert":
        options["--output-format"] = ["safetensors", "pt"]
    if cmd == "export-peft":
        options["--layout"] = ["fused", "per-expert"]
    chosen = data.draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=2, unique=True), label="options")
    with workspace(seeds) as w:
        if kind in ("f64-big", "f32-big"):  # finite as stored, beyond fp32 / bf16: narrowing it must be refused
            t = {k: v.double() if kind == "f64-big" else v for k, v in stacked_tensors().items()}
            t[tensor_key(1, "gate", "a")][0, 0, 0] = 1e300 if kind == "f64-big" else 3.4e38
            src = write_canonical(w / f"{kind}.safetensors", t)
        else:
            src = copy_source(seeds, kind, w)
        extra, changes, outcomes = [], [], []
        for opt in chosen:
            if opt == "--lora-alpha":
                value, outcome = data.draw(FLOAT_OPTION, label=opt)
                if kind != "kt-noconfig":
                    outcome = EITHER if outcome != VALID else VALID  # alpha comes from the adapter then
            elif opt == "--base":
                value, outcome = data.draw(values(valid=[seeds.model, seeds.model / "config.json"],
                                                  invalid=[w / "nowhere", seeds.model / "model.safetensors", src, w]), label=opt)
            elif data.draw(st.booleans(), label=f"{opt} valid"):
                value, outcome = data.draw(st.sampled_from(options[opt]), label=opt), VALID
            else:
                value, outcome = data.draw(misspelt(options[opt]), label=opt), INVALID
            extra += [opt, value]
            changes.append(f"{opt} {str(value)!r}")
            outcomes.append(outcome)
        opts = dict(zip(extra[::2], extra[1::2]))
        # what the values mean for this source
        if kind == "kt-noconfig" and "--lora-alpha" not in opts:
            outcomes.append(INVALID)  # no alpha anywhere
        if kind == "fused":
            outcomes.append(INVALID if opts.get("--orientation") == "old" else VALID)
            if "--base" not in opts:
                extra += ["--base", seeds.model]
        if opts.get("--dtype") in {"f64-big": ("bf16", "fp32"), "f32-big": ("bf16",)}.get(kind, ()):
            outcomes.append(INVALID)
        if cmd == "convert" and opts.get("--output-format") == "pt" and kind == "fused":
            outcomes.append(INVALID)  # two ranks (the session's fused adapter has a rank_pattern)
        argv, expect = command(cmd, src, w, seeds, worst(*outcomes), f"{kind}: {cmd} " + " ".join(changes), extra=extra)
        if cmd == "convert" and opts.get("--output-format") == "pt":
            argv[argv.index("-o") + 1] = expect.output = w / "out" / "converted.pt"
        check_cli(sandbox, argv, expect, test="adapter_options")


# ---- 12. options of run ----------------------------------------------------------------------------------

RUN_OPTIONS = {
    "--max-new-tokens": st.integers(-3, 6).map(lambda v: (v, VALID if v >= 1 else INVALID)),
    "--threads": st.integers(-2, 3).map(lambda v: (v, VALID if 1 <= v <= (os.cpu_count() or 1) else EITHER if v > 0 else INVALID)),
    "--temperature": values(valid=["0", "0.5", "1.0", "2"], invalid=["nan", "inf", "-inf", "-0.5", "1e400"], either=["1e30", "-0"]),
    "--top-p": values(valid=["1.0", "0.9", "0.5"], invalid=["nan", "inf", "0", "-0.1", "1.5"]),
    "--top-k": values(valid=["0", "5", "50"], invalid=["-1", "-100"], either=["97", "1000000"]),
    "--seed": values(valid=["0", "123", str(2**32)], invalid=[str(2**70)], either=["-1"]),
    "--method": st.one_of(values(valid=["fp32", "bf16", "int8", "int4", "AMXBF16_SFT", "AMXINT8_SFT", "AMXINT4_SFT"]),
                          misspelt(["fp32", "bf16", "int8", "int4"]).map(lambda v: (v, INVALID))),
    "--dtype": st.one_of(values(valid=["auto", "bf16", "fp32"]), misspelt(["auto", "bf16", "fp32"]).map(lambda v: (v, INVALID))),
    "--device": values(valid=["cpu"], invalid=["cuda", "cuda:0", "cuda:99", "gpu", "mps", "", "cpu:0"], either=["CPU"]),
    "--gpu-experts": values(valid=["0"], invalid=["1", "6", "-1", "7"]),
    "--gpu-experts-ratio": values(valid=["0", "0.0"], invalid=["0.5", "1", "nan", "-0.5", "1.5", "inf"]),
    "--placement": st.one_of(values(valid=["prefix", "uniform"], invalid=["/nonexistent/stats.json"]), misspelt(["prefix", "uniform"]).map(lambda v: (v, INVALID))),
    "--backend": st.one_of(values(valid=["cpu"]), misspelt(["cpu", "kt"]).map(lambda v: (v, INVALID))),
    "--prompt-ids": values(valid=["5,17,33", "0", "95", "1, 2"], invalid=["96", "-1", "1000", "", ",", "x", "1.5", "0x10", "1;2"],
                           either=["1,,2", "\u0661", " 1", "+1"]),
    "--prompt": values(invalid=["hello", ""]),
    "--use": values(valid=["none", "NONE", "None"], invalid=["bogus", "", "none "]),
    "--kt-moe-lora-rank": values(valid=[str(R)], invalid=["8", "0", "-1"]),
    "--kt-moe-lora-alpha": values(valid=[str(ALPHA), "8"], invalid=["nan", "16", "inf"]),
    "--ignore-eos": st.just((None, VALID)),
    "--json": st.just((None, VALID)),
}
ADAPTER_SPELLINGS = values(valid=["{p}", "mine={p}"], invalid=["none={p}", "None={p}", "={p}", "mine=", "mine={p}x", "a=b={p}", "{p} {p}"])


def run_outcome(opts: dict, adapter: bool, classes: dict) -> str:
    """The outcome of a run with these options: each value's own class, then how they combine."""
    outcomes = list(classes.values())
    sampling = "--temperature" in opts and classes["--temperature"] != INVALID and float(opts["--temperature"]) > 0
    for opt, default in (("--top-p", "1.0"), ("--top-k", "0"), ("--seed", None)):
        if not sampling and opt in opts:  # only sampling uses them: refused unless they change nothing
            outcomes.append(EITHER if opts[opt] == default or opt == "--seed" else INVALID)
    if "--gpu-experts" in opts and "--gpu-experts-ratio" in opts:
        outcomes.append(INVALID)  # one or the other
    if not adapter and ("--kt-moe-lora-rank" in opts or "--kt-moe-lora-alpha" in opts):
        outcomes.append(INVALID)  # seed flags with nothing to check them against
    if not adapter and opts.get("--use", "none").lower() != "none":
        outcomes.append(INVALID)
    return worst(*outcomes)


@fuzz(100)
@given(data=st.data())
def test_run_options(seeds, sandbox, data):
    adapter = data.draw(st.booleans(), label="adapter")
    chosen = data.draw(st.lists(st.sampled_from(sorted(RUN_OPTIONS)), min_size=1, max_size=3, unique=True), label="options")
    opts, classes = {"--prompt-ids": "5,17,33", "--max-new-tokens": "2", "--method": "fp32"}, {}
    for opt in chosen:
        value, classes[opt] = data.draw(RUN_OPTIONS[opt], label=opt)
        opts[opt] = None if value is None else str(value)
    if "--prompt" in chosen and data.draw(st.booleans(), label="without --prompt-ids"):
        del opts["--prompt-ids"]
    argv = ["run", "--model", seeds.model, "--no-progress"]
    for opt, value in opts.items():
        argv += [opt] if value is None else [opt, value]
    outcome = run_outcome(opts, adapter, classes)
    note = "run " + " ".join(f"{k} {v!r}" if v is not None else k for k, v in opts.items())
    if adapter:
        spelling, aclass = data.draw(ADAPTER_SPELLINGS, label="--adapter")
        for part in spelling.format(p=seeds.per_expert).split(" "):
            argv += ["--adapter", part]
        outcome = worst(outcome, aclass)
        note += f" --adapter {spelling!r}"
    call = check_cli(sandbox, argv, Expect(outcome, note, (seeds.model, seeds.per_expert)), test="run_options")
    if call.exit_code == 0 and "--json" in opts:
        out = json.loads(call.stdout)
        assert len(out["token_ids"]) == int(opts["--max-new-tokens"]) and all(0 <= t < 96 for t in out["token_ids"]), out


# ---- 13. output paths ------------------------------------------------------------------------------------

OUTPUTS = [
    # (case, command, source kind, where -o goes (from the source path s, the workspace w), outcome)
    ("convert onto the adapter's own weights", "convert", "per-expert", lambda s, w: s / WEIGHTS, INVALID),
    ("convert onto the input file", "convert", "canonical", lambda s, w: s, INVALID),
    ("convert onto the input directory", "convert", "per-expert", lambda s, w: s, INVALID),
    ("convert into the input directory", "convert", "per-expert", lambda s, w: s / "new.safetensors", INVALID),
    ("convert into a new folder inside the input", "convert", "per-expert", lambda s, w: s / "sub" / "x.safetensors", INVALID),
    ("convert whose sidecar is the input", "convert", "fused", lambda s, w: s.with_name("adapter.safetensors"), INVALID),
    ("export-peft onto the input directory", "export-peft", "per-expert", lambda s, w: s, INVALID),
    ("export-peft into the input directory", "export-peft", "per-expert", lambda s, w: s / "sub", INVALID),
    ("export-peft onto the input file", "export-peft", "canonical", lambda s, w: s, INVALID),
    ("export-peft onto a folder holding the input", "export-peft", "canonical", lambda s, w: s.parent, INVALID),
    ("export-peft onto the base model", "export-peft", "fused", lambda s, w: w / "base", INVALID),
    ("convert -o x.pt", "convert", "per-expert", lambda s, w: w / "out" / "x.pt", EITHER),
    ("convert -o x.pth", "convert", "per-expert", lambda s, w: w / "out" / "x.pth", EITHER),
    ("convert -o x.bin", "convert", "per-expert", lambda s, w: w / "out" / "x.bin", EITHER),
    ("convert -o x.pt from a seed .pt", "convert", "seed-pt", lambda s, w: w / "out" / "x.pt", EITHER),
    ("convert -o under /proc", "convert", "per-expert", lambda s, w: Path("/proc/fuzz-out/x.safetensors"), INVALID),
    ("convert -o under a file", "convert", "per-expert", lambda s, w: s / "adapter_config.json" / "x.safetensors", INVALID),
    ("export-peft -o under a file", "export-peft", "canonical", lambda s, w: s / "x", INVALID),
    ("convert -o an existing directory", "convert", "per-expert", lambda s, w: w / "out", INVALID),
    ("convert -o a name with a newline", "convert", "per-expert", lambda s, w: w / "out" / "a\nb.safetensors", EITHER),
    ("convert -o a hidden temporary-looking name", "convert", "per-expert", lambda s, w: w / "out" / ".x.safetensors.tmp-1", EITHER),
    ("export-peft -o an existing empty directory", "export-peft", "per-expert", lambda s, w: w / "out" / "empty", EITHER),
]


@pytest.mark.parametrize("case, cmd, kind, where, outcome", OUTPUTS, ids=[o[0] for o in OUTPUTS])
@fuzz(2, shrink=False)
@given(layout=st.sampled_from(["fused", "per-expert"]), dtype=st.sampled_from(["keep", "bf16", "fp32"]))
def test_output_path(seeds, sandbox, case, cmd, kind, where, outcome, layout, dtype):
    """-o never replaces or lands inside an input; a .pt / .bin name never gets a safetensors file."""
    with workspace(seeds) as w:
        src = copy_source(seeds, kind, w)
        base = w / "base"
        shutil.copytree(seeds.model, base)
        (w / "out").mkdir()
        (w / "out" / "empty").mkdir()
        if "sidecar" in case:  # the fused source renamed so that OUT.non_expert is the input itself
            src = src.rename(src.with_name("adapter.non_expert"))
        out = where(src, w)
        argv = [cmd, src, "-o", out, "--base", base, "--dtype", dtype, "--no-progress", *(["--layout", layout] if cmd == "export-peft" else [])]
        # the whole workspace: a refusal leaves nothing anywhere in it
        expect = Expect(outcome, case, (src, base), out_folder=w, output=out, readback=("--base", base),
                        needles=(str(out),) if "/proc" in str(out) or "under a file" in case else (),
                        exit_codes=(1, 2) if "/proc" in str(out) or "under a file" in case else (2,))
        check_cli(sandbox, argv, expect, test="output_path")


# ---- 14. kt-kernel: shapes it does not handle are refused, not a crash -------------------------------------------


@pytest.mark.parametrize("inter", [48, 64])
def test_kt_backend_shapes(seeds, sandbox, tmp_path, inter):
    pytest.importorskip("kt_kernel")
    model = tiny.save_checkpoint(tiny.tiny_model("qwen3_moe", seed=0, moe_intermediate_size=inter), tmp_path / f"m{inter}")
    for method in ("bf16", "int4"):
        argv = ["run", "--model", model, "--backend", "kt", "--method", method, "--prompt-ids", "5,17,33", "--max-new-tokens", "2", "--no-progress"]
        check_cli(sandbox, argv, Expect(EITHER, f"run --backend kt --method {method}, I = {inter}", (model,)), test="kt")

"""PEFT LoRA adapters on MoE experts.

Two layouts (keys after ``base_model.model.`` and ``.default`` are stripped):

- per-expert (transformers 4.x): ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.lora_{A,B}.weight``,
  Mixtral ``block_sparse_moe.experts.E.{w1,w3,w2}``, optionally under ``original_moe.``;
  A [r, in], B [out, r].
- fused (transformers 5.x, ``target_parameters``): one pair per targeted 3D parameter of
  ``model.layers.L.mlp.experts``; parameters targeted on the same module nest, the first one
  innermost: ``experts.base_layer.lora_*`` (gate_up_proj) and ``experts.lora_*`` (down_proj).
  peft >= 0.19.1: A [E·r, in] expert-major, B [out, E·r] with column k·E + e for expert e.
  peft 0.17-0.19.0 read [E, out, in] as [E, in, out]: A [E·r, out], B [in, E·r] and the delta is
  the transpose.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from ..errors import AdapterError, shape_str
from ..lora import PROJECTIONS, AdapterInfo, LayerLoRA, LoRASpec, ModuleLoRA, ProjLoRA
from ..model_config import MAX_EXPERTS, MAX_LAYERS, MoEConfig
from ..peft_config import PeftLoraConfig
from .base import AdapterReader, check_dtypes, check_shape, duplicate, open_safetensors, parse_index, read_header, read_tensor

WEIGHTS_NAME = "adapter_model.safetensors"

_PER_EXPERT = re.compile(
    r"^(?P<module>(?:.*\.)?layers\.(?P<layer>[0-9]+)\.(?P<block>mlp|block_sparse_moe)\.(?:original_moe\.)?"
    r"experts\.(?P<expert>[0-9]+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2))\.lora_(?P<ab>[AB])\.weight\Z"
)
_FUSED = re.compile(
    r"^(?P<module>(?:.*\.)?layers\.(?P<layer>[0-9]+)\.mlp\.(?:original_moe\.)?experts)\."
    r"(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight\Z"
)
_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight\Z")
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
# The 3D expert parameters of transformers 5, in their definition order (which sets the nesting).
_FUSED_PARAMS = ("gate_up_proj", "down_proj")
# (A's input dim, B's output dim) of each fused parameter, per orientation; "2I" = gate and up stacked.
_FUSED_DIMS = {
    ("gate_up_proj", "new"): ("H", "2I"),
    ("down_proj", "new"): ("I", "H"),
    ("gate_up_proj", "old"): ("2I", "H"),
    ("down_proj", "old"): ("H", "I"),
}
_FIRST_NEW_ORIENTATION = "0.19.1"


def normalize_key(key: str) -> str:
    """Strip the PeftModel prefix and a ``.default`` adapter-name segment, and write numbers
    plainly (``layers.01`` is ``layers.1``), so that two names of one tensor compare equal."""
    key = key.removeprefix("base_model.model.")
    key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    if ".0" not in key and not key.startswith("0"):
        return key
    return ".".join(p.lstrip("0") or "0" if p.isascii() and p.isdigit() else p for p in key.split("."))


class _Scan:
    """The keys of a PEFT safetensors file, sorted into expert and non-expert LoRA."""

    def __init__(self, path: Path):
        self.path = path
        self.per_expert: dict[tuple[int, str, str], dict[int, str]] = defaultdict(dict)  # (L, proj, A|B) -> e -> key
        self.per_expert_module: dict[tuple[int, str], dict[int, str]] = defaultdict(dict)  # (L, proj) -> e -> module
        self.naming: set[str] = set()
        self.fused: dict[tuple[str, int], dict[tuple[int, str], str]] = defaultdict(dict)  # (module, L) -> (depth, A|B) -> key
        self.linear: dict[str, dict[str, str]] = defaultdict(dict)  # module -> A|B -> key
        meta, header = read_header(path)
        self.shapes: dict[str, tuple[int, ...]] = {k: shape for k, (_, shape) in header.items()}
        seen: dict[str, str] = {}  # normalized key -> the file's key
        for raw in header:
            key = normalize_key(raw)
            if key in seen:
                raise duplicate(path, raw, seen[key])
            seen[key] = raw
            if m := _PER_EXPERT.match(key):
                L = parse_index(path, raw, m["layer"], "layer", MAX_LAYERS)
                e = parse_index(path, raw, m["expert"], "expert", MAX_EXPERTS)
                slot = self.per_expert[(L, _PROJ[m["proj"]], m["ab"])]
                if e in slot:  # e.g. original_moe.experts.3 beside experts.3, or w1 beside gate_proj
                    raise duplicate(path, raw, slot[e])
                slot[e] = raw
                self.per_expert_module[(L, _PROJ[m["proj"]])][e] = m["module"]
                self.naming.add(m["block"])
            elif m := _FUSED.match(key):
                L = parse_index(path, raw, m["layer"], "layer", MAX_LAYERS)
                slot = self.fused[(m["module"], L)]
                nest = (m["nest"].count("base_layer."), m["ab"])
                if nest in slot:
                    raise duplicate(path, raw, slot[nest])
                slot[nest] = raw
            elif m := _LINEAR.match(key):
                self.linear[m["module"]][m["ab"]] = raw
            else:
                raise AdapterError(
                    path, raw, "a LoRA lora_A / lora_B weight (embedding LoRA, DoRA and modules_to_save are not supported)", "another tensor"
                )
        if not self.shapes:
            raise AdapterError(path, None, "LoRA tensors", "an empty file")
        self.dtype = check_dtypes(path, {dtype for dtype, _ in header.values()})
        if self.per_expert and self.fused:
            raise AdapterError(path, None, "either per-expert or fused expert LoRA", "both")

    def read_modules(self, config: PeftLoraConfig) -> dict[str, LoRASpec]:
        """Specs of the non-expert modules, checked against their shapes (tensors are read later)."""
        specs = {}
        for module, pair in sorted(self.linear.items()):
            for ab in "AB":
                if ab not in pair:
                    raise AdapterError(self.path, f"{module}.lora_{ab}.weight", "present (its partner is)", "missing")
            a, b = self.shapes[pair["A"]], self.shapes[pair["B"]]
            spec = config.spec(module)
            if len(a) != 2 or min(a) < 1:
                raise AdapterError(self.path, pair["A"], "a 2-D LoRA matrix [r, in]", shape_str(a))
            if a[0] != spec.rank:
                raise AdapterError(self.path, pair["A"], f"{spec.rank} rows ({config.rank_reason(module)})", f"{a[0]} rows, shape {shape_str(a)}")
            if len(b) != 2 or b[1] != a[0] or b[0] < 1:
                raise AdapterError(self.path, pair["B"], f"shape [out, {a[0]}] for A {shape_str(a)}", shape_str(b))
            specs[module] = spec
        return specs


def _config_for(path: Path) -> PeftLoraConfig:
    cfg_path = path.parent / "adapter_config.json"
    if cfg_path.is_file():
        return PeftLoraConfig.from_file(cfg_path)
    raise AdapterError(cfg_path, None, "the adapter's config beside its weights (rank, alpha, rsLoRA)", "no such file")


def open_peft(path: Path, base: MoEConfig | None, orientation: str = "auto") -> AdapterReader:
    """A PEFT adapter file (``adapter_config.json`` beside it), per-expert or fused."""
    scan = _Scan(path)
    config = _config_for(path)
    if scan.fused:
        return PeftFusedReader(scan, config, base, orientation)
    return PeftPerExpertReader(scan, config, base)


class PeftPerExpertReader(AdapterReader):
    def __init__(self, scan: _Scan, config: PeftLoraConfig, base: MoEConfig | None):
        self.scan, path = scan, scan.path
        if not scan.per_expert:
            raise AdapterError(path, None, "expert LoRA keys (mlp.experts.E.*_proj or experts.lora_*)", "none")
        if len(scan.naming) > 1:
            raise AdapterError(path, None, "one expert naming", " and ".join(sorted(scan.naming)))
        found_experts = {e for ids in scan.per_expert.values() for e in ids}
        # E is the base's, or one more than the highest id (below MAX_EXPERTS: parse_index);
        # every expert below it must be present, so E never exceeds the tensors in the file.
        E = base.num_experts if base else max(found_experts) + 1
        counts = f" (the base has {E} experts, the adapter {len(found_experts)})" if base and len(found_experts) != E else ""
        if base:
            dims = {"H": base.hidden_size, "I": base.intermediate_size}
            why = {d: f"{name} in {base.path or 'the base config'}" for d, name in (("H", "hidden_size"), ("I", "moe_intermediate_size"))}
        else:
            dims, why = {}, {}
        layers: dict[int, dict[str, LoRASpec]] = defaultdict(dict)
        self.keys: dict[tuple[int, str], tuple[list[str], list[str]]] = {}
        for (L, proj), modules in sorted(scan.per_expert_module.items(), key=lambda kv: (kv[0][0], PROJECTIONS.index(kv[0][1]))):
            a_keys, b_keys = scan.per_expert[(L, proj, "A")], scan.per_expert[(L, proj, "B")]
            for ab, keys in (("A", a_keys), ("B", b_keys)):
                extra = sorted(e for e in keys if e >= E)
                if extra:
                    raise AdapterError(path, keys[extra[0]], f"expert ids below {E}{counts}", str(extra[0]))
                if len(keys) < E:
                    first_missing = next(e for e in range(E) if e not in keys)
                    known = next(iter(modules.items()))  # a present expert's module name, renumbered
                    where = modules.get(first_missing) or known[1].replace(f".experts.{known[0]}.", f".experts.{first_missing}.")
                    raise AdapterError(path, f"{where}.lora_{ab}.weight", f"all {E} experts of layer {L} {proj}{counts}", "missing")
            specs = {config.spec(modules[e]) for e in range(E)}
            if len(specs) > 1:
                raise AdapterError(path, modules[0], f"one rank and alpha for every expert of layer {L} {proj}", str(sorted(specs, key=str)))
            spec = specs.pop()
            in_dim, out_dim = ("I", "H") if proj == "down" else ("H", "I")
            for e in range(E):
                a, b = scan.shapes[a_keys[e]], scan.shapes[b_keys[e]]
                for key, shape in ((a_keys[e], a), (b_keys[e], b)):
                    if len(shape) != 2 or min(shape) < 1:
                        raise AdapterError(path, key, "a 2-D LoRA matrix", shape_str(shape))
                dims.setdefault(in_dim, a[1])
                dims.setdefault(out_dim, b[0])
                why.setdefault(in_dim, f"as {a_keys[e]}")
                why.setdefault(out_dim, f"as {b_keys[e]}")
                rank_why = config.rank_reason(modules[e]) if (a[0], b[1]) != (spec.rank, spec.rank) else ""
                check_shape(path, a_keys[e], a, (spec.rank, dims[in_dim]), rank_why if a[0] != spec.rank else why[in_dim])
                check_shape(path, b_keys[e], b, (dims[out_dim], spec.rank), rank_why if b[1] != spec.rank else why[out_dim])
            layers[L][proj] = spec
            self.keys[(L, proj)] = ([a_keys[e] for e in range(E)], [b_keys[e] for e in range(E)])
        self.config = config
        self.info = AdapterInfo(
            path=path,
            format="peft-per-expert",
            num_experts=E,
            hidden_size=dims["H"],
            intermediate_size=dims["I"],
            layers=dict(layers),
            modules=scan.read_modules(config),
            dtype=scan.dtype,
            use_rslora=config.use_rslora,
            peft_version=config.peft_version,
            expert_naming=scan.naming.pop(),
            base_model=config.base_model,
        )

    def read_layer(self, layer: int) -> LayerLoRA:
        out = LayerLoRA(layer)
        # One open per layer: the file's mmap is released after, so RSS stays near one layer.
        with open_safetensors(self.scan.path) as f:
            for proj, spec in self.info.layers[layer].items():
                # sized by shapes checked on opening against tensors present in the file
                a_shape, b_shape = self.info.expert_shapes(layer, proj)
                a, b = torch.empty(a_shape, dtype=self.info.dtype), torch.empty(b_shape, dtype=self.info.dtype)
                for stacked, keys in zip((a, b), self.keys[(layer, proj)]):
                    for e, key in enumerate(keys):  # copied into place: no second copy of the layer
                        stacked[e] = read_tensor(f, self.info.path, key)
                setattr(out, proj, ProjLoRA(a, b, spec))
        return out

    def read_modules(self) -> dict[str, ModuleLoRA]:
        return _read_linear(self.scan, self.info)


def _read_linear(scan: _Scan, info: AdapterInfo) -> dict[str, ModuleLoRA]:
    out = {}
    with open_safetensors(scan.path) as f:
        for module, spec in info.modules.items():
            a_key, b_key = scan.linear[module]["A"], scan.linear[module]["B"]
            out[module] = ModuleLoRA(read_tensor(f, scan.path, a_key), read_tensor(f, scan.path, b_key), spec)
    return out


class PeftFusedReader(AdapterReader):
    def __init__(self, scan: _Scan, config: PeftLoraConfig, base: MoEConfig | None, orientation: str):
        self.scan, path = scan, scan.path
        if base is None and config.base_model and _is_local_model(config.base_model):
            base = MoEConfig.from_model_dir(config.base_model)
        if base is None:
            raise AdapterError(path, None, "a fused adapter's num_experts comes from the base model's config: pass --base MODEL_DIR", None)
        E = base.num_experts
        # (layer) -> param -> (A key, B key); and the raw observations for the orientation decision.
        self.params: dict[int, dict[str, tuple[str, str, str]]] = {}
        observations = []
        modules_of: dict[int, str] = {}
        for module, L in scan.fused:  # e.g. mlp.original_moe.experts beside mlp.experts
            if L in modules_of:
                raise AdapterError(path, f"{module}.lora_A.weight", f"one expert LoRA per layer (layer {L})", f"also {modules_of[L]}")
            modules_of[L] = module
        for (module, L), keys in sorted(scan.fused.items(), key=lambda kv: kv[0][1]):
            targeted = [p for p in _FUSED_PARAMS if _targets(config, f"{module}.{p}")]
            depths = sorted({d for d, _ in keys})
            if not targeted or depths != list(range(len(targeted))):
                raise AdapterError(
                    config.path, "target_parameters", f"one entry per nested LoRA on {module} ({len(depths)})", str(list(config.target_parameters))
                )
            self.params[L] = {}
            for depth in depths:
                param = targeted[len(targeted) - 1 - depth]  # the first targeted parameter is innermost
                for ab in "AB":
                    if (depth, ab) not in keys:
                        raise AdapterError(path, f"{module}.{'base_layer.' * depth}lora_{ab}.weight", "present (its partner is)", "missing")
                a_key, b_key = keys[(depth, "A")], keys[(depth, "B")]
                a, b = scan.shapes[a_key], scan.shapes[b_key]
                if len(a) != 2 or min(a) < 1 or a[0] % E:
                    raise AdapterError(path, a_key, f"shape [{E}·r, in] ({E} experts in {base.path or 'the base config'})", shape_str(a))
                if len(b) != 2 or b[1] != a[0] or b[0] < 1:
                    raise AdapterError(path, b_key, f"shape [out, {a[0]}]", shape_str(b))
                spec = config.spec(f"{module}.{param}")
                if a[0] != E * spec.rank:
                    raise AdapterError(path, a_key, f"{E * spec.rank} rows, {spec.rank} per expert ({config.rank_reason(f'{module}.{param}')}, {E} experts)",
                                       f"{a[0]} rows, {a[0] // E} per expert")
                self.params[L][param] = (a_key, b_key, spec)
                observations.append((param, a_key, a, b))
        self.orientation = _decide_orientation(path, config, observations, base, orientation)
        layers = {}
        for L, params in self.params.items():
            layers[L] = {}
            if "gate_up_proj" in params:
                layers[L]["gate"] = layers[L]["up"] = params["gate_up_proj"][2]
            if "down_proj" in params:
                layers[L]["down"] = params["down_proj"][2]
        self.info = AdapterInfo(
            path=path,
            format="peft-fused",
            num_experts=E,
            hidden_size=base.hidden_size,
            intermediate_size=base.intermediate_size,
            layers=layers,
            modules=scan.read_modules(config),
            dtype=scan.dtype,
            use_rslora=config.use_rslora,
            peft_version=config.peft_version,
            orientation=self.orientation,
            base_model=config.base_model,
        )

    def read_layer(self, layer: int) -> LayerLoRA:
        E, I = self.info.num_experts, self.info.intermediate_size
        out = LayerLoRA(layer)
        with open_safetensors(self.scan.path) as f:
            for param, (a_key, b_key, spec) in self.params[layer].items():
                A = read_tensor(f, self.info.path, a_key)  # [E·r, in]
                B = read_tensor(f, self.info.path, b_key)  # [out, E·r]
                r = spec.rank
                if self.orientation == "new":
                    a = A.view(E, r, A.shape[1])  # [E, r, in]
                    b = B.view(B.shape[0], r, E).permute(2, 0, 1)  # [E, out, r]
                else:  # delta_e = (B_e A_e)^T: A_e^T is the canonical b, B_e^T the canonical a
                    a = B.view(B.shape[0], r, E).permute(2, 1, 0)  # [E, r, in]
                    b = A.view(E, r, A.shape[1]).transpose(1, 2)  # [E, out, r]
                a, b = a.contiguous(), b.contiguous()
                if param == "down_proj":
                    out.down = ProjLoRA(a, b, spec)
                else:  # gate and up share A; B's rows are [gate; up]
                    out.gate = ProjLoRA(a, b[:, :I].contiguous(), spec)
                    out.up = ProjLoRA(a, b[:, I:].contiguous(), spec)
        return out

    def read_modules(self) -> dict[str, ModuleLoRA]:
        return _read_linear(self.scan, self.info)


def _is_local_model(name: str) -> bool:
    """Whether a base_model_name_or_path from the file names a local checkpoint directory."""
    try:
        return (Path(name) / "config.json").is_file()
    except (OSError, ValueError):  # too long for the file system, a NUL byte: a hub name or junk
        return False


def _targets(config: PeftLoraConfig, name: str) -> bool:
    # PEFT's rule for target_parameters: exact name or a dotted suffix of it.
    return any(name == t or name.endswith("." + t) for t in config.target_parameters)


def _fit(observations, orientation: str, base: MoEConfig) -> str | None:
    """None when every shape fits this orientation, else the first mismatch as an error text."""
    dims = {"H": base.hidden_size, "I": base.intermediate_size, "2I": 2 * base.intermediate_size}
    for param, a_key, a, b in observations:
        in_sym, out_sym = _FUSED_DIMS[(param, orientation)]
        if a[1] != dims[in_sym] or b[0] != dims[out_sym]:
            return a_key, f"A [{a[0]}, {dims[in_sym]}] and B [{dims[out_sym]}, {a[0]}] ({orientation} PEFT layout)", f"A {shape_str(a)}, B {shape_str(b)}"
    return None


def _decide_orientation(path, config: PeftLoraConfig, observations, base: MoEConfig, forced: str) -> str:
    if forced in ("new", "old"):
        chosen, why = forced, "--orientation"
    elif (version := config.version()) is not None:
        from packaging.version import Version

        chosen = "new" if version >= Version(_FIRST_NEW_ORIENTATION) else "old"
        why = f"peft_version {config.peft_version}"
    else:
        fits = [o for o in ("new", "old") if _fit(observations, o, base) is None]
        if len(fits) == 2:
            raise AdapterError(
                config.path, "peft_version", "a PEFT version to tell the fused layouts apart (both readings fit these shapes; pass --orientation new|old)", "none"
            )
        chosen, why = (fits[0] if fits else "new"), "shapes"
    mismatch = _fit(observations, chosen, base)
    if mismatch:
        key, expected, found = mismatch
        raise AdapterError(path, key, f"{expected}, chosen by {why}", found)
    return chosen

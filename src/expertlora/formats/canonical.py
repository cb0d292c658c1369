"""The canonical stacked file (ours, ``expertlora/1``) and KTransformers' ``fused_expert_lora.safetensors``.

Both use the keys ``layers.{L}.experts.{gate,up,down}_lora_{a,b}`` with a [E, r, in], b [E, out, r].
Ours adds ``__metadata__`` (sizes, per-layer rank / alpha / scaling, source) and may name a PEFT
directory beside it holding the non-expert LoRA.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from ..errors import AdapterError, shape_str
from ..jsonfile import check_number, describe, number_text, parse_json
from ..lora import MAX_ALPHA, PROJECTIONS, AdapterInfo, LayerLoRA, LoRASpec, ModuleLoRA, ProjLoRA
from ..model_config import MAX_EXPERTS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS
from ..peft_config import PeftLoraConfig
from .base import SAFETENSORS_DTYPES, AdapterReader, check_dtypes, check_shape, duplicate, open_safetensors, parse_index, read_header, read_tensor

FORMAT_TAG = "expertlora/1"
KT_FILE_NAME = "fused_expert_lora.safetensors"
# \Z, not $: "$" also matches before a final newline, and would take "...lora_a\n"
_KEY = re.compile(r"^layers\.(?P<layer>[0-9]+)\.experts\.(?P<proj>gate|up|down)_lora_(?P<ab>[ab])\Z")
_META_CHOICES = {"use_rslora": ("true", "false"), "orientation": ("new", "old"), "expert_naming": ("mlp", "block_sparse_moe")}


def tensor_key(layer: int, proj: str, ab: str) -> str:
    return f"layers.{layer}.experts.{proj}_lora_{ab}"


def is_stacked_key(key: str) -> bool:
    return _KEY.match(key) is not None


class StackedReader(AdapterReader):
    """Our canonical file, or KTransformers' (rank / alpha then come from adapter_config.json)."""

    def __init__(self, path: Path, lora_alpha: float | None = None):
        self.path = path
        meta, header = read_header(path)
        self.keys: dict[tuple[int, str, str], str] = {}  # (layer, proj, a|b) -> the file's key
        found: dict[int, dict[str, set[str]]] = {}
        for key in header:
            m = _KEY.match(key)
            if not m:
                raise AdapterError(path, key, "layers.L.experts.{gate,up,down}_lora_{a,b}", "another key")
            slot = (parse_index(path, key, m["layer"], "layer", MAX_LAYERS), m["proj"], m["ab"])
            if slot in self.keys:  # layers.01 beside layers.1
                raise duplicate(path, key, self.keys[slot])
            self.keys[slot] = key
            found.setdefault(slot[0], {}).setdefault(slot[1], set()).add(slot[2])
        if not found:
            raise AdapterError(path, None, "expert LoRA tensors", "an empty file")
        dtype = check_dtypes(path, {d for d, _ in header.values()})
        for L, projs in found.items():
            for proj, abs_ in projs.items():
                for ab in "ab":
                    if ab not in abs_:
                        raise AdapterError(path, tensor_key(L, proj, ab), "present (its partner is)", "missing")
        shapes = {slot: header[key][1] for slot, key in self.keys.items()}
        for slot, shape in shapes.items():
            if len(shape) != 3 or min(shape) < 1:
                raise AdapterError(path, self.keys[slot], "a stacked 3-D tensor [E, r, in] / [E, out, r] with no empty dimension", shape_str(shape))

        ours = meta.get("format") == FORMAT_TAG
        if ours:
            E = _meta_int(path, meta, "num_experts", MAX_EXPERTS)
            H = _meta_int(path, meta, "hidden_size", MAX_HIDDEN)
            I = _meta_int(path, meta, "intermediate_size", MAX_INTERMEDIATE)
            specs = _meta_layers(path, _meta(path, meta, "layers"))
            sizes = {"E": f"__metadata__.num_experts = {E}", "H": f"__metadata__.hidden_size = {H}", "I": f"__metadata__.intermediate_size = {I}"}
        else:
            # KTransformers' file: sizes from the shapes, rank / alpha from the PEFT config beside it.
            L0 = min(found)
            proj0 = next(p for p in PROJECTIONS if p in found[L0])
            a0, b0 = shapes[(L0, proj0, "a")], shapes[(L0, proj0, "b")]
            E = a0[0]
            H, I = (b0[1], a0[2]) if proj0 == "down" else (a0[2], b0[1])
            first = f"as {tensor_key(L0, proj0, 'a')} / _b"
            sizes = dict.fromkeys("EHI", first)
            config = _kt_config(path)
            if config is None and lora_alpha is not None:
                check_number(lora_alpha, MAX_ALPHA, lambda: AdapterError(path, "--lora-alpha", number_text(MAX_ALPHA), repr(lora_alpha)))
            specs = {}
            for L, projs in found.items():
                specs[L] = {}
                for proj in projs:
                    r = shapes[(L, proj, "a")][1]
                    if config is not None:
                        specs[L][proj] = config.spec(_kt_module_name(config, L, proj))
                    elif lora_alpha is None:
                        raise AdapterError(path.parent / "adapter_config.json", None, "the adapter's config (lora_alpha) or --lora-alpha", "no such file")
                    else:
                        specs[L][proj] = LoRASpec.of(r, float(lora_alpha), False, path, "--lora-alpha")
        if {L: set(p) for L, p in specs.items()} != {L: set(p) for L, p in found.items()}:
            raise AdapterError(path, "__metadata__.layers", f"the projections present {_layout(found)}", _layout(specs))
        for L, projs in specs.items():
            for proj, spec in projs.items():
                in_dim, out_dim = ("I", "H") if proj == "down" else ("H", "I")
                dims = {"E": E, "H": H, "I": I}
                if ours:
                    rank = f"__metadata__.layers says rank {spec.rank}"
                else:
                    rank = config.rank_reason(_kt_module_name(config, L, proj)) if config else f"rank {spec.rank} as {self.keys[(L, proj, 'a')]}"
                for ab, expected, labels in (
                    ("a", (E, spec.rank, dims[in_dim]), (sizes["E"], rank, sizes[in_dim])),
                    ("b", (E, dims[out_dim], spec.rank), (sizes["E"], sizes[out_dim], rank)),
                ):
                    found_shape = shapes[(L, proj, ab)]
                    why = next((w for f, x, w in zip(found_shape, expected, labels) if f != x), None)
                    check_shape(path, self.keys[(L, proj, ab)], found_shape, expected, why)

        self.sidecar = None
        if ours and meta.get("non_expert_adapter"):
            self.sidecar = path.parent / _plain_name(path, meta["non_expert_adapter"])
        elif not ours and (path.parent / "adapter_model.safetensors").is_file() and (path.parent / "adapter_config.json").is_file():
            self.sidecar = path.parent  # KTransformers keeps the non-expert LoRA as a PEFT adapter beside
        if self.sidecar is not None:
            from .peft import WEIGHTS_NAME, _Scan

            weights = self.sidecar / WEIGHTS_NAME
            if not weights.is_file():
                raise AdapterError(weights, None, "the non-expert LoRA named by the adapter", "no such file")
            self.modules_scan = _Scan(weights)
            if self.modules_scan.per_expert or self.modules_scan.fused:
                raise AdapterError(weights, None, "only non-expert LoRA beside a stacked expert file", "expert LoRA too")
            self.modules_config = PeftLoraConfig.from_file(self.sidecar / "adapter_config.json")
            modules = self.modules_scan.read_modules(self.modules_config)
        else:
            modules = {}

        for key, choices in _META_CHOICES.items():
            if meta.get(key, choices[0]) not in choices:
                raise AdapterError(path, f"__metadata__.{key}", " or ".join(choices), repr(meta[key])[:80])
        self.info = AdapterInfo(
            path=path,
            format="expertlora" if ours else "kt",
            num_experts=E,
            hidden_size=H,
            intermediate_size=I,
            layers=dict(sorted(specs.items())),
            modules=modules,
            dtype=dtype,
            use_rslora=meta.get("use_rslora") == "true",
            peft_version=meta.get("peft_version") or None,
            orientation=meta.get("orientation") or None,
            expert_naming=meta.get("expert_naming") or None,
            base_model=meta.get("base_model") or None,
        )

    def read_layer(self, layer: int) -> LayerLoRA:
        out = LayerLoRA(layer)
        with open_safetensors(self.path) as f:
            for proj, spec in self.info.layers[layer].items():
                a, b = (read_tensor(f, self.path, self.keys[(layer, proj, ab)]) for ab in "ab")
                setattr(out, proj, ProjLoRA(a, b, spec))
        return out

    def read_modules(self) -> dict[str, ModuleLoRA]:
        if self.sidecar is None:
            return {}
        from .peft import _read_linear

        return _read_linear(self.modules_scan, self.info)


def _meta(path: Path, meta: dict, key: str) -> str:
    if key not in meta:
        raise AdapterError(path, f"__metadata__.{key}", "present", "missing")
    return meta[key]


def _meta_int(path: Path, meta: dict, key: str, hi: int) -> int:
    value = _meta(path, meta, key)
    if not re.fullmatch(r"[1-9][0-9]{0,9}", value) or int(value) > hi:
        raise AdapterError(path, f"__metadata__.{key}", f"an integer from 1 to {hi}", repr(value)[:80])
    return int(value)


def _meta_layers(path: Path, text: str) -> dict[int, dict[str, LoRASpec]]:
    """``__metadata__.layers``: {"L": {"gate|up|down": {"rank", "alpha", "scaling"}}}, every value checked."""
    where = "__metadata__.layers"
    expected = 'JSON {"L": {"gate|up|down": {"rank", "alpha", "scaling"}}}'
    layers = parse_json(text, path, where)
    if not isinstance(layers, dict):
        raise AdapterError(path, where, expected, describe(layers))
    specs: dict[int, dict[str, LoRASpec]] = {}
    names: dict[int, str] = {}
    for name, projs in layers.items():
        if not re.fullmatch(r"[0-9]+", name):
            raise AdapterError(path, f"{where}.{name}", f"{expected} with layer numbers as keys", "another key")
        L = parse_index(path, f"{where}.{name}", name, "layer", MAX_LAYERS)
        if L in names:  # "01" beside "1"
            raise duplicate(path, f"{where}.{name}", f"{where}.{names[L]}")
        names[L] = name
        if not isinstance(projs, dict) or not set(projs) <= set(PROJECTIONS):
            raise AdapterError(path, f"{where}.{name}", expected, describe(projs))
        specs[L] = {p: LoRASpec.from_json(s, path, f"{where}.{name}.{p}") for p, s in projs.items()}
    return specs


def _plain_name(path: Path, name: str) -> str:
    """A directory name beside the file: never a path that leads elsewhere."""
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or len(name) > 255:
        raise AdapterError(path, "__metadata__.non_expert_adapter", "a directory name beside the file", repr(name)[:80])
    return name


def _layout(specs: dict) -> str:
    return "{" + ", ".join(f"{L}: {'/'.join(sorted(p))}" for L, p in sorted(specs.items())) + "}"


def _kt_module_name(config: PeftLoraConfig, layer: int, proj: str) -> str:
    """The name the config's rank / alpha patterns are written against, in the config's own style."""
    if config.target_parameters:
        return f"model.layers.{layer}.mlp.experts.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
    return f"model.layers.{layer}.mlp.experts.0.{proj}_proj"


def _kt_config(path: Path) -> PeftLoraConfig | None:
    cfg = path.parent / "adapter_config.json"
    return PeftLoraConfig.from_file(cfg) if cfg.is_file() else None


# ---- writing -------------------------------------------------------------------------------

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def metadata(info: AdapterInfo, non_expert_adapter: str | None = None) -> dict[str, str]:
    meta = {
        "format": FORMAT_TAG,
        "num_experts": str(info.num_experts),
        "hidden_size": str(info.hidden_size),
        "intermediate_size": str(info.intermediate_size),
        "layers": json.dumps({str(L): {p: s.to_json() for p, s in projs.items()} for L, projs in sorted(info.layers.items())}),
        "use_rslora": "true" if info.use_rslora else "false",
        "source_format": info.format,
    }
    optional = {
        "peft_version": info.peft_version,
        "orientation": info.orientation,
        "expert_naming": info.expert_naming,
        "base_model": info.base_model,
        "non_expert_adapter": non_expert_adapter,
    }
    meta.update({k: str(v) for k, v in optional.items() if v})
    return meta


def write_safetensors(
    info: AdapterInfo,
    layers: Iterable[LayerLoRA],
    out: Path,
    dtype: torch.dtype,
    meta: dict[str, str],
) -> None:
    """Write the canonical file one layer at a time, so memory stays near one layer.

    safetensors' own ``save_file`` needs every tensor in memory at once, so the header (whose
    shapes ``info`` already knows) is written first and each layer's bytes follow as they come.
    The result is a plain safetensors file; ``safe_open`` reads it.
    """
    entries, offset = {}, 0
    for L in sorted(info.layers):
        for proj in (p for p in PROJECTIONS if p in info.layers[L]):  # the order LayerLoRA.projections() yields
            for ab, shape in zip("ab", info.expert_shapes(L, proj)):
                size = math.prod(shape) * dtype.itemsize
                entries[tensor_key(L, proj, ab)] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
    header = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        names = iter(entries)
        for layer in layers:
            for proj, lora in layer.projections().items():
                for ab, t in (("a", lora.a), ("b", lora.b)):
                    name = next(names)
                    assert name == tensor_key(layer.layer, proj, ab) and list(t.shape) == entries[name]["shape"], name
                    f.write(t.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
            del layer, lora, t  # free this layer before the next one is read
        f.flush()
        os.fsync(f.fileno())


def narrowed(t: torch.Tensor, dtype: torch.dtype, path: str | Path, key: str) -> torch.Tensor:
    """``t`` in ``dtype``; a value that does not fit (bf16 / fp32 overflow to inf) is an AdapterError
    naming the tensor, never an inf written to the output."""
    out = t.to(dtype)
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        src = t.double()
        found = src[torch.isfinite(src)].abs().max() if bool(torch.isfinite(src).any()) else float("inf")
        name = str(dtype).removeprefix("torch.")
        raise AdapterError(path, key, f"values that fit in {name} (|v| <= {torch.finfo(dtype).max:.4g})",
                           f"{float(found):.4g}, which becomes inf" if math.isfinite(float(found)) else "inf")
    return out


# ---- output paths: written beside the target, moved into place whole, with the usual mode -----

# errno values that say the path given cannot be written (bad input), as against a failing disk
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL}


def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (os.umask sets it, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the mode a new file gets under
    the umask (0644 / 0755 under 022): writers that go through a private temporary file, such as
    safetensors' save_file, leave 0600."""
    mask = _umask()
    if path.is_dir() and not path.is_symlink():
        path.chmod(0o777 & ~mask)
        for p in path.rglob("*"):
            if not p.is_symlink():
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    elif path.is_file():
        path.chmod(0o666 & ~mask)


def output_error(final: Path, e: OSError) -> Exception:
    """An OSError met writing ``final`` (or its temporary), as the error to raise: the path the
    user gave, never the temporary's. A path that cannot be written is bad input (AdapterError);
    anything else (a full disk) stays an OSError, on that path."""
    reason = e.strerror or type(e).__name__
    if e.errno in _PATH_ERRNOS:
        return AdapterError(final, None, "an output path that can be written", reason)
    return OSError(e.errno, f"cannot write the output ({reason})", str(final))

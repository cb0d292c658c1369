"""Every format reads to the deltas PEFT itself computes; round trips are exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from expertlora import MoEConfig, load_adapter, open_adapter, tiny
from expertlora.convert import convert, export, sidecar_path
from expertlora.formats.canonical import tensor_key

from .conftest import FAMILIES

TOL_FP32 = 1e-6  # relative, deltas computed in float64 from fp32 factors


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_peft_matches_peft_deltas(family, fused_adapter):
    path, peft_model, base = fused_adapter(family)
    adapter = load_adapter(path, base)
    assert adapter.info.format == "peft-fused" and adapter.info.orientation == "new"
    assert sorted(adapter.layers) == list(base.moe_layers)
    assert tiny.max_rel_error(tiny.canonical_expert_deltas(adapter), tiny.peft_expert_deltas(peft_model)) < TOL_FP32
    # rank_pattern and alpha_pattern resolve as PEFT resolves them
    assert _peft_specs(peft_model) == {(L, p): (s.rank, s.alpha, s.scaling) for L, projs in adapter.info.layers.items() for p, s in projs.items()}
    assert adapter.info.layers[base.moe_layers[0]]["down"].rank == 8
    # non-expert LoRA is kept, never dropped
    mods = tiny.peft_module_deltas(peft_model)
    assert set(adapter.modules) == set(mods) and len(mods) > 0
    assert tiny.max_rel_error({k: m.delta() for k, m in adapter.modules.items()}, mods) < TOL_FP32


def _peft_specs(peft_model) -> dict:
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper) and name.endswith("mlp.experts"):
            L = int(name.split("layers.")[1].split(".")[0])
            while isinstance(module, ParamWrapper):
                spec = (module.r["default"], float(module.lora_alpha["default"]), module.scaling["default"])
                for p in ("down",) if module.parameter_name == "down_proj" else ("gate", "up"):
                    out[(L, p)] = spec
                module = module.base_layer
    return out


def test_qwen3_patterns_resolve(fused_adapter):
    path, _, base = fused_adapter("qwen3_moe")
    first = load_adapter(path, base).info.layers[base.moe_layers[0]]
    assert first["down"].rank == 8 and first["down"].scaling == 1.0
    assert first["gate"].alpha == 3.0 and first["gate"].scaling == 0.75


def test_fused_rslora_and_single_target(model_dir, tmp_path):
    base = MoEConfig.from_model_dir(model_dir("qwen3_moe"))
    peft_model = tiny.peft_fused_adapter(
        tiny.tiny_model("qwen3_moe"), tmp_path / "a", family="qwen3_moe", r=8, alpha=5.0,
        experts=("down_proj",), non_expert=False, use_rslora=True,
    )
    adapter = load_adapter(tmp_path / "a", base)
    assert all(set(p) == {"down"} for p in adapter.info.layers.values())
    assert adapter.info.layers[0]["down"].scaling == pytest.approx(5.0 / 8**0.5)
    assert tiny.max_rel_error(tiny.canonical_expert_deltas(adapter), tiny.peft_expert_deltas(peft_model)) < TOL_FP32


def _old_peft_delta(A, B, E):
    # peft 0.17-0.19.0 ParamWrapper.get_delta_weight for a 3D parameter [E, d1, d2], no swap:
    # einsum("o r e, e r i -> e i o") with A [E·r, d1] and B [d2, E·r].
    return torch.einsum("ore,eri->eio", B.double().reshape(B.shape[0], -1, E), A.double().reshape(E, -1, A.shape[-1]))


def test_fused_old_orientation_matches_old_peft_formula(model_dir, tmp_path):
    base = MoEConfig.from_model_dir(model_dir("qwen3_moe"))
    E, H, I, r = base.num_experts, base.hidden_size, base.intermediate_size, 4
    g = torch.Generator().manual_seed(5)
    tensors, want = {}, {}
    for L in base.moe_layers:
        prefix = f"base_model.model.model.layers.{L}.mlp.experts."
        # gate_up_proj [E, 2I, H] read as [E, in=2I, out=H]; down_proj [E, H, I] as [E, in=H, out=I]
        for nest, (d_in, d_out), proj in (("base_layer.", (2 * I, H), "gate_up"), ("", (H, I), "down")):
            A, B = torch.randn(E * r, d_in, generator=g), torch.randn(d_out, E * r, generator=g)
            tensors[prefix + nest + "lora_A.weight"], tensors[prefix + nest + "lora_B.weight"] = A, B
            delta = 2.0 * _old_peft_delta(A, B, E)  # [E, d1, d2] = the parameter's own shape
            if proj == "down":
                want[(L, "down")] = delta
            else:
                want[(L, "gate")], want[(L, "up")] = delta[:, :I], delta[:, I:]
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2.0 * r, "target_modules": None, "peft_version": "0.18.1",
              "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    adapter = load_adapter(tmp_path / "old", base)
    assert adapter.info.orientation == "old"
    assert tiny.max_rel_error(tiny.canonical_expert_deltas(adapter), want) < TOL_FP32
    # without a version the shapes decide (H != 2I here), and agree
    config.pop("peft_version")
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(config))
    assert load_adapter(tmp_path / "old", base).info.orientation == "old"


class _V4Expert(nn.Module):
    def __init__(self, H, I, names):
        super().__init__()
        for name, (d_in, d_out) in zip(names, ((H, I), (H, I), (I, H))):
            setattr(self, name, nn.Linear(d_in, d_out, bias=False))


def _v4_model(layers, E, H, I, block="mlp", names=("gate_proj", "up_proj", "down_proj")):
    """The module tree of a transformers-4.x per-expert MoE, enough for PEFT to load an adapter."""
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for _ in range(max(layers) + 1):
        layer = nn.Module()
        moe = nn.Module()
        moe.experts = nn.ModuleList([_V4Expert(H, I, names) for _ in range(E)])
        setattr(layer, block, moe)
        layer.self_attn = nn.Module()
        layer.self_attn.q_proj = nn.Linear(H, H, bias=False)
        root.model.layers.append(layer)
    return root


@pytest.mark.parametrize("naming", ["mlp", "block_sparse_moe"])
def test_per_expert_matches_peft(naming, tmp_path):
    from peft import PeftModel

    E, H, I = 4, 32, 24
    names = ("gate_proj", "up_proj", "down_proj") if naming == "mlp" else ("w1", "w3", "w2")
    ranks = {(1, names[2]): 8}  # one layer's down projection at another rank, via rank_pattern
    extra = {f"base_model.model.model.layers.{L}.self_attn.q_proj.lora_{ab}.weight": torch.randn(*s) for L in (0, 1) for ab, s in (("A", (4, H)), ("B", (H, 4)))}
    config = {
        "target_modules": [*names, "q_proj"], "use_rslora": True,
        "rank_pattern": {rf"layers.1.{naming}.experts.\d+.{names[2]}": 8},
        "alpha_pattern": {"q_proj": 16.0},
    }
    path = tiny.write_per_expert_adapter(
        tmp_path / "a", num_layers=[0, 1], num_experts=E, hidden_size=H, intermediate_size=I, naming=naming,
        extra_config=config, extra_tensors=extra, rank_of=lambda L, n: ranks.get((L, n), 4),
    )
    adapter = load_adapter(path)
    assert adapter.info.format == "peft-per-expert" and adapter.info.expert_naming == naming
    assert adapter.info.layers[1]["down"].rank == 8 and adapter.info.layers[0]["down"].rank == 4

    peft_model = PeftModel.from_pretrained(_v4_model([0, 1], E, H, I, naming, names), str(path))
    theirs = tiny.peft_module_deltas(peft_model)
    proj = dict(zip(names, ("gate", "up", "down")))
    want_experts, want_modules = {}, {}
    for name, delta in theirs.items():
        parts = name.split(".")
        if "experts" in parts:
            L, e, p = int(parts[2]), int(parts[5]), proj[parts[6]]
            want_experts.setdefault((L, p), {})[e] = delta
        else:
            want_modules[name] = delta
    want_experts = {k: torch.stack([v[e] for e in range(E)]) for k, v in want_experts.items()}
    assert tiny.max_rel_error(tiny.canonical_expert_deltas(adapter), want_experts) < TOL_FP32
    assert tiny.max_rel_error({k: m.delta() for k, m in adapter.modules.items()}, want_modules) < TOL_FP32


def test_original_moe_and_default_suffix(tmp_path):
    path = tiny.write_per_expert_adapter(tmp_path / "a", num_layers=[0], num_experts=2, hidden_size=8, intermediate_size=6)
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        renamed = {k.replace("mlp.experts", "mlp.original_moe.experts").replace(".lora_A.", ".lora_A.default."): f.get_tensor(k) for k in f.keys()}
    save_file(renamed, str(path / "adapter_model.safetensors"))
    plain = load_adapter(tiny.write_per_expert_adapter(tmp_path / "b", num_layers=[0], num_experts=2, hidden_size=8, intermediate_size=6))
    seeded = load_adapter(path)
    for p in ("gate", "up", "down"):
        assert torch.equal(getattr(seeded.layers[0], p).a, getattr(plain.layers[0], p).a)
        assert torch.equal(getattr(seeded.layers[0], p).b, getattr(plain.layers[0], p).b)


def _assert_same(x, y):
    assert x.info.layers == y.info.layers
    assert (x.info.num_experts, x.info.hidden_size, x.info.intermediate_size) == (y.info.num_experts, y.info.hidden_size, y.info.intermediate_size)
    for L in x.layers:
        for p, lora in x.layers[L].projections().items():
            other = getattr(y.layers[L], p)
            assert torch.equal(lora.a, other.a) and torch.equal(lora.b, other.b), (L, p)
    assert set(x.modules) == set(y.modules)
    for name, m in x.modules.items():
        assert torch.equal(m.a, y.modules[name].a) and torch.equal(m.b, y.modules[name].b) and m.spec == y.modules[name].spec


def test_canonical_file_layout_and_round_trips(fused_adapter, tmp_path):
    path, _, base = fused_adapter("deepseek_v3")
    original = load_adapter(path, base)
    out = tmp_path / "canon.safetensors"
    convert(path, out, base=base, progress=False)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        L = base.moe_layers[0]
        assert f.get_tensor(tensor_key(L, "gate", "a")).shape == (base.num_experts, 4, base.hidden_size)
        assert f.get_tensor(tensor_key(L, "down", "b")).shape == (base.num_experts, base.hidden_size, 8)
        assert torch.equal(f.get_tensor(tensor_key(L, "up", "b")), original.layers[L].up.b)
    assert meta["format"] == "expertlora/1" and meta["source_format"] == "peft-fused" and meta["peft_version"]
    assert json.loads(meta["layers"])[str(L)]["down"] == {"rank": 8, "alpha": 8.0, "scaling": 1.0}
    assert sidecar_path(out).is_dir() and meta["non_expert_adapter"] == sidecar_path(out).name
    canonical = load_adapter(out, base)
    assert canonical.info.format == "expertlora"
    _assert_same(original, canonical)

    # canonical -> export-peft (both layouts) -> canonical
    for layout in ("fused", "per-expert"):
        export(out, tmp_path / layout, layout=layout, base=base, progress=False)
        back = load_adapter(tmp_path / layout, base)
        assert tiny.max_rel_error(tiny.canonical_expert_deltas(back), tiny.canonical_expert_deltas(original)) < TOL_FP32
        assert tiny.max_rel_error({k: m.delta() for k, m in back.modules.items()}, {k: m.delta() for k, m in original.modules.items()}) < TOL_FP32


def test_seed_pt_round_trip(per_expert_adapter, tmp_path):
    path, spec = per_expert_adapter
    original = load_adapter(path)
    convert(path, tmp_path / "seed.pt", output_format="pt", progress=False)
    obj = torch.load(tmp_path / "seed.pt", weights_only=True)
    assert obj["metadata"]["lora_rank"] == 4 and obj["metadata"]["lora_alpha"] == 8.0
    assert obj["layer_1"]["down_lora_b"].shape == (4, 32, 4)
    seed = load_adapter(tmp_path / "seed.pt")
    assert seed.info.format == "seed-pt"
    _assert_same(original, seed)
    convert(tmp_path / "seed.pt", tmp_path / "back.safetensors", progress=False)
    _assert_same(original, load_adapter(tmp_path / "back.safetensors"))


def test_kt_file_reads_with_its_peft_config(fused_adapter, tmp_path):
    path, peft_model, base = fused_adapter("qwen3_moe")
    original = load_adapter(path, base)
    kt = tmp_path / "kt"
    kt.mkdir()
    tensors = {tensor_key(L, p, ab): getattr(lora, ab).clone() for L, layer in original.layers.items() for p, lora in layer.projections().items() for ab in "ab"}
    save_file(tensors, str(kt / "fused_expert_lora.safetensors"))
    # KTransformers keeps the PEFT adapter (config + non-expert LoRA) beside its fused expert file
    (kt / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    save_file({k: v for k, v in load_file_keys(path).items() if "experts" not in k}, str(kt / "adapter_model.safetensors"))
    adapter = load_adapter(kt, base)
    assert adapter.info.format == "kt"
    _assert_same(original, adapter)
    # without a config, --lora-alpha supplies the scaling (rank comes from the shapes)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in tensors.items() if ".0." in k or k.startswith("layers.0.")}, str(bare))
    info = open_adapter(bare, lora_alpha=16.0).info
    assert info.layers[0]["gate"].scaling == 4.0 and info.layers[0]["down"].scaling == 2.0


def load_file_keys(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_dtype_conversion(per_expert_adapter, tmp_path):
    path, _ = per_expert_adapter
    convert(path, tmp_path / "bf16.safetensors", dtype="bf16", progress=False)
    adapter = load_adapter(tmp_path / "bf16.safetensors")
    assert adapter.info.dtype == torch.bfloat16 and adapter.layers[0].gate.a.dtype == torch.bfloat16
    ref = load_adapter(path)
    assert torch.equal(adapter.layers[0].gate.a, ref.layers[0].gate.a.bfloat16())


def test_exported_fused_adapter_gives_same_model_output(fused_adapter, tmp_path):
    from peft import PeftModel

    path, peft_model, base = fused_adapter("mixtral")
    convert(path, tmp_path / "c.safetensors", base=base, progress=False)
    export(tmp_path / "c.safetensors", tmp_path / "peft", layout="fused", base=base, progress=False)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    reloaded = PeftModel.from_pretrained(tiny.tiny_model("mixtral", seed=0), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        want, got = peft_model(ids).logits, reloaded(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_fused_export_of_distinct_gate_up_is_exact(per_expert_adapter, model_dir, tmp_path):
    # per-expert adapters have separate gate / up A: the fused export stacks them block-wise (rank 2r)
    path, spec = per_expert_adapter
    base_dir = tmp_path / "base"
    tiny.tiny_config("qwen3_moe", num_layers=2, num_experts=4, hidden_size=32, moe_intermediate_size=24).save_pretrained(base_dir)
    base = MoEConfig.from_model_dir(base_dir)
    export(path, tmp_path / "fused", layout="fused", base=base, progress=False)
    back = load_adapter(tmp_path / "fused", base)
    assert back.info.layers[0]["gate"].rank == 8
    assert tiny.max_rel_error(tiny.canonical_expert_deltas(back), tiny.canonical_expert_deltas(load_adapter(path))) < TOL_FP32

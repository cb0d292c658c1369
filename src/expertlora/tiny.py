"""Tiny random MoE models and LoRA adapters, for the demo and the tests (nothing is downloaded).

Needs the ``hf`` extra (transformers >= 5, peft).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .lora import AdapterInfo, ExpertLoRA, LayerLoRA, LoRASpec, ProjLoRA, lora_scaling

# Small configs of each supported family: H != 2I and H != I keep fused layouts unambiguous, and
# H, I multiples of 32 let the compiled kernel and int4 run on them.
FAMILIES: dict[str, dict] = {
    "qwen3_moe": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=64, num_experts=6, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    ),
    "qwen2_moe": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=64, shared_expert_intermediate_size=40,
        num_experts=6, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
    ),
    "mixtral": dict(
        hidden_size=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    "deepseek_v3": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=64, n_routed_experts=6, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
    ),
    "deepseek_v2": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=64, n_routed_experts=6, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    ),
}
# Config overrides that make routing harder to get right; tiny_config(family, **ROUTING_OVERRIDES[family]).
# DeepSeek-V3 routes within groups: 8 experts in n_group=4 groups of 2, the best topk_group=2 groups
# kept (each group is scored by its top 2, so a group needs at least 2 experts), 3 experts chosen.
ROUTING_OVERRIDES: dict[str, dict] = {
    "deepseek_v3": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3),
}
# Non-expert linear modules worth a LoRA in each family (attention, shared experts).
# peft 0.21 on transformers 5 rewrites DeepSeek targets named gate_proj / up_proj / down_proj
# (shared experts, dense MLP) into the fused experts' gate_up_proj, so DeepSeek gets attention only.
NON_EXPERT_TARGETS: dict[str, list[str]] = {
    "qwen3_moe": ["q_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "shared_expert.gate_proj", "shared_expert.down_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "deepseek_v3": ["q_b_proj", "o_proj"],
    "deepseek_v2": ["kv_b_proj", "o_proj"],
}


def tiny_config(family: str, num_layers: int = 3, vocab_size: int = 96, **overrides):
    from transformers import AutoConfig

    kwargs = {**FAMILIES[family], "num_hidden_layers": num_layers, "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, **config_overrides):
    """A float32 random model of the family, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_overrides), dtype=torch.float32)
    return model.eval()


def randomize_all(model, seed: int = 0) -> None:
    """Draw every parameter and persistent buffer of ``model`` at random, at scales that keep a
    tiny model's outputs finite and its routing decided by the drawn values: matrices ~ N(0, 1/fan_in),
    norm weights uniform in [0.5, 1.5], biases (DeepSeek-V3's ``e_score_correction_bias`` too)
    ~ N(0, 0.2^2). A test of loading then fails if any tensor keeps its constructed value.

    Non-persistent buffers (rotary tables) are derived from the config and never saved, so they
    keep their constructed values (randomizing them would change nothing a checkpoint holds)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            persistent = [(n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
            for name, t in [*module.named_parameters(recurse=False), *persistent]:
                if t.is_floating_point():
                    t.copy_(_random_like(t, "norm" in f"{module_name}.{name}".lower(), g))


def _random_like(t: torch.Tensor, is_norm: bool, g: torch.Generator) -> torch.Tensor:
    if t.dim() == 1 and is_norm:
        return torch.rand(t.shape, generator=g) + 0.5
    if t.dim() == 1:
        return torch.randn(t.shape, generator=g) * 0.2
    return torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5  # fan_in: the last dim of [out, in] / [E, out, in]


def save_checkpoint(model, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def randomize_lora(model, seed: int = 1, std: float = 0.2) -> None:
    """PEFT initialises B to zero; give every LoRA matrix random values so deltas are real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_fused_adapter(
    model,
    out_dir: str | Path | None = None,
    *,
    family: str,
    r: int = 4,
    alpha: float = 8.0,
    experts: tuple[str, ...] = ("gate_up_proj", "down_proj"),
    non_expert: bool = True,
    seed: int = 1,
    **lora_kwargs,
):
    """Wrap ``model`` with a random PEFT LoRA on its fused experts (transformers 5 layout); save if asked."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=NON_EXPERT_TARGETS[family] if non_expert else None,
        target_parameters=[f"mlp.experts.{p}" for p in experts],
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    randomize_lora(peft_model, seed)
    peft_model.eval()
    if out_dir is not None:
        peft_model.save_pretrained(str(out_dir))
    return peft_model


def write_per_expert_adapter(
    out_dir: str | Path,
    *,
    num_layers: list[int],
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    r: int = 4,
    alpha: float = 8.0,
    naming: str = "mlp",
    seed: int = 2,
    dtype: torch.dtype = torch.float32,
    extra_config: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    rank_of=None,
) -> Path:
    """A transformers-4.x style PEFT adapter (per-expert modules), written key by key.

    ``rank_of(layer, proj_name)`` may give per-module ranks (they must match the config's patterns).
    """
    from safetensors.torch import save_file

    names = {"mlp": ("gate_proj", "up_proj", "down_proj"), "block_sparse_moe": ("w1", "w3", "w2")}[naming]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for L in num_layers:
        for name, (d_in, d_out) in zip(names, ((hidden_size, intermediate_size), (hidden_size, intermediate_size), (intermediate_size, hidden_size))):
            rank = rank_of(L, name) if rank_of else r
            for e in range(num_experts):
                prefix = f"base_model.model.model.layers.{L}.{naming}.experts.{e}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * 0.2).to(dtype)
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.2).to(dtype)
    tensors.update(extra_tensors or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(names), "use_rslora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "peft_version": "0.15.2", **(extra_config or {}),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def peft_expert_deltas(peft_model, adapter_name: str = "default") -> dict[tuple[int, str], torch.Tensor]:
    """PEFT's own per-expert deltas of a fused adapter: (layer, gate|up|down) -> [E, out, in] float64."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, ParamWrapper) or not name.endswith("mlp.experts"):
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        while isinstance(module, ParamWrapper):
            delta = module.get_delta_weight(adapter_name).detach().double()  # shaped like the parameter
            if module.parameter_name == "down_proj":
                out[(layer, "down")] = delta
            else:
                half = delta.shape[1] // 2
                out[(layer, "gate")], out[(layer, "up")] = delta[:, :half], delta[:, half:]
            module = module.base_layer
    return out


def peft_module_deltas(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's deltas of plain lora.Linear modules: module name (no PeftModel prefix) -> [out, in] float64."""
    from peft.tuners.lora.layer import Linear

    return {
        name.removeprefix("base_model.model."): m.get_delta_weight(adapter_name).detach().double()
        for name, m in peft_model.named_modules()
        if isinstance(m, Linear)
    }


def canonical_expert_deltas(adapter) -> dict[tuple[int, str], torch.Tensor]:
    """Our deltas, same keys as ``peft_expert_deltas``."""
    return {(L, p): lora.delta() for L, layer in adapter.layers.items() for p, lora in layer.projections().items()}


def max_rel_error(ours: dict, theirs: dict) -> float:
    """Largest relative Frobenius error over matching keys; the key sets must agree."""
    if set(ours) != set(theirs):
        raise AssertionError(f"different keys: {sorted(set(ours) ^ set(theirs), key=str)[:5]}")
    return max(float((ours[k] - theirs[k]).norm() / theirs[k].norm()) for k in theirs)


def random_expert_lora(
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    layers: list[int],
    ranks: dict[str, int],
    alpha: float = 16.0,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.1,
) -> ExpertLoRA:
    """A canonical adapter with random A and B on ``layers``; ``ranks`` maps each targeted
    projection (gate / up / down) to its rank. No file involved: for engine tests and benchmarks."""
    E, H, I = num_experts, hidden_size, intermediate_size
    gen = torch.Generator().manual_seed(seed)
    dims = {"gate": (H, I), "up": (H, I), "down": (I, H)}
    specs = {p: LoRASpec(r, alpha, lora_scaling(r, alpha, use_rslora)) for p, r in ranks.items()}
    out = {}
    for L in layers:
        projs = {}
        for p, spec in specs.items():
            n_in, n_out = dims[p]
            a = torch.randn(E, spec.rank, n_in, generator=gen) * std
            b = torch.randn(E, n_out, spec.rank, generator=gen) * std
            projs[p] = ProjLoRA(a, b, spec)
        out[L] = LayerLoRA(L, **projs)
    info = AdapterInfo(
        path=Path(f"<random adapter {seed}>"), format="expertlora", num_experts=E, hidden_size=H,
        intermediate_size=I, layers={L: dict(specs) for L in layers}, modules={}, dtype=torch.float32,
        use_rslora=use_rslora,
    )
    return ExpertLoRA(info, out)


def save_tokenizer(out_dir: str | Path, vocab_size: int = 96) -> Path:
    """A word-level tokenizer: ``<unk>`` (0, also padding), ``</s>`` (1, end of sequence), then the
    words ``t2`` .. ``t{vocab_size - 1}``; saved beside a tiny checkpoint so prompts can be text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return Path(out_dir)

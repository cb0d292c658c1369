"""`expertlora demo`: the main job end to end on a tiny random model, checked against PEFT:
inspect, convert and export an adapter, then generate with and without it on our engine."""

from __future__ import annotations

import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .errors import AdapterError

FAMILY = "qwen2_moe"  # routed experts, a shared expert and attention: every kind of LoRA target


def run_demo(workdir: Path | None, console: Console) -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise AdapterError("expertlora demo", None, "transformers and peft installed (pip install 'expertlora[hf]')", f"missing {e.name}") from None
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        # PEFT warns that rank_pattern keys of target_parameters "did not match", yet applies them.
        warnings.simplefilter("ignore")
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="expertlora-demo-") as tmp:
                return _run(Path(tmp), console)
        workdir.mkdir(parents=True, exist_ok=True)
        return _run(workdir, console)


def _run(work: Path, console: Console) -> bool:
    from peft import PeftModel

    from . import tiny
    from .convert import convert, export
    from .formats import load_adapter, open_adapter
    from .model_config import MoEConfig
    from .report import describe, print_report

    t0 = time.perf_counter()
    console.print(f"[bold]1.[/] tiny random {FAMILY} model and a PEFT LoRA on experts, shared expert and attention in {work}")
    base_dir = tiny.save_checkpoint(tiny.tiny_model(FAMILY, seed=0), work / "model")
    peft_model = tiny.peft_fused_adapter(
        tiny.tiny_model(FAMILY, seed=0), work / "adapter", family=FAMILY, r=4, alpha=8.0,
        rank_pattern={"model.layers.1.mlp.experts.down_proj": 8},
    )
    base = MoEConfig.from_model_dir(base_dir)

    console.print("[bold]2.[/] expertlora inspect adapter --base model")
    print_report(describe(open_adapter(work / "adapter", base)), console)

    console.print("[bold]3.[/] convert to the canonical file, export back to PEFT (fused and per-expert)")
    convert(work / "adapter", work / "adapter.safetensors", base=base, progress=False)
    export(work / "adapter.safetensors", work / "exported_fused", layout="fused", base=base, progress=False)
    export(work / "adapter.safetensors", work / "exported_per_expert", layout="per-expert", base=base, progress=False)

    reference = tiny.peft_expert_deltas(peft_model)
    module_reference = tiny.peft_module_deltas(peft_model)
    checks = []
    for label, path in (
        ("PEFT fused directory", work / "adapter"),
        ("canonical .safetensors", work / "adapter.safetensors"),
        ("exported fused PEFT", work / "exported_fused"),
        ("exported per-expert PEFT", work / "exported_per_expert"),
    ):
        adapter = load_adapter(path, base)
        err = tiny.max_rel_error(tiny.canonical_expert_deltas(adapter), reference)
        mod_err = tiny.max_rel_error({k: m.delta() for k, m in adapter.modules.items()}, module_reference)
        checks.append((f"{label}: expert deltas vs PEFT", err))
        checks.append((f"{label}: non-expert deltas vs PEFT", mod_err))

    # The exported fused directory, loaded by PEFT itself, must give the original model output.
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = peft_model(ids).logits.double()
        reloaded = PeftModel.from_pretrained(tiny.tiny_model(FAMILY, seed=0), str(work / "exported_fused")).eval()
        got = reloaded(ids).logits.double()
    checks.append(("PEFT logits, exported fused vs original", float((got - want).norm() / want.norm())))

    ok = _report_checks(checks, console)
    ok &= _generate(work, base_dir, base, peft_model, console)
    console.print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.1f} s")
    return ok


def _report_checks(checks: list[tuple[str, float]], console: Console) -> bool:
    table = Table(title="checks against PEFT (relative error, fp32; pass below 1e-5)")
    table.add_column("check")
    table.add_column("rel. error", justify="right")
    table.add_column("", justify="center")
    ok = True
    for name, err in checks:
        passed = err < 1e-5
        ok &= passed
        table.add_row(name, f"{err:.2e}", "[green]ok[/]" if passed else "[red]FAIL[/]")
    console.print(table)
    return ok


def _generate(work: Path, base_dir: Path, base, peft_model, console: Console) -> bool:
    """Greedy generation on our engine, with and without the adapter, against transformers + PEFT."""
    from .formats import load_adapter
    from .integration import load_model
    from .run import Sampling, generate

    console.print("[bold]4.[/] generate on the expertlora engine (experts on the CPU), with and without the adapter")
    prompt, steps = [5, 17, 33, 2, 40, 61, 7, 12], 16
    ids = torch.tensor([prompt])
    reference = {}
    for adapter in ("demo", None):
        start = time.perf_counter()
        with torch.no_grad(), (peft_model.disable_adapter() if adapter is None else nullcontext()):
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                      min_new_tokens=steps, do_sample=False, pad_token_id=0)
        reference[adapter] = (out[0, len(prompt):].tolist(), steps / (time.perf_counter() - start))
    table = Table(title=f"greedy, {steps} tokens from {len(prompt)} prompt ids (agreement: with transformers + PEFT, fp32)")
    for column in ("run", "adapter", "tokens", "agreement", "tokens/s"):
        table.add_column(column, justify="left" if column in ("run", "adapter", "tokens") else "right")
    for adapter, (tokens, speed) in reference.items():
        table.add_row("transformers + PEFT", adapter or "none", " ".join(map(str, tokens[:6])) + " …", "", f"{speed:.0f}")
    ok = True
    for method in ("fp32", "int4"):
        lm = load_model(base_dir, method, adapters={"demo": load_adapter(work / "adapter.safetensors", base)})
        for adapter in ("demo", None):
            g = generate(lm, prompt, adapter, Sampling(max_new_tokens=steps, ignore_eos=True))
            agree = sum(a == b for a, b in zip(g.token_ids, reference[adapter][0])) / steps
            ok &= method != "fp32" or agree == 1.0
            table.add_row(f"expertlora {method}", adapter or "none", " ".join(map(str, g.token_ids[:6])) + " …",
                          f"{agree:.0%}", f"{g.tokens_per_s:.0f}")
    console.print(table)
    return ok


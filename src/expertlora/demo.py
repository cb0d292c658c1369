"""`expertlora demo`: the main job end to end on a tiny random model, checked against PEFT:
inspect, convert and export an adapter, generate with and without it on our engine, then serve
it over HTTP for a moment (the base and two adapters, one loaded at runtime)."""

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
    ok &= _serve(work, base_dir, console)
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



def _serve(work: Path, base_dir: Path, console: Console) -> bool:
    """The main job: ``expertlora serve`` on the tiny model for a moment, called over HTTP as the
    base and as two adapters (the second loaded at runtime), beside the same requests in process."""
    try:
        from .serve import ServeConfig, Server
    except ImportError as e:
        console.print(f"[bold]5.[/] the server: skipped ({e.name} is missing: pip install 'expertlora[serve]')")
        return True
    from . import tiny
    from .runtime import Engine, EngineConfig, SamplingParams

    try:
        import openai
    except ImportError:
        openai = None
    console.print(f"[bold]5.[/] expertlora serve on 127.0.0.1 for a moment, called with {'the openai client' if openai else 'urllib (openai is not installed)'}"
                  "; adapter 'second' loaded at runtime through /v1/load_lora_adapter")
    tiny.peft_fused_adapter(tiny.tiny_model(FAMILY, seed=0), work / "second", family=FAMILY, r=2, alpha=4.0, seed=5)
    prompt, steps, served = [5, 17, 33, 2, 40, 61, 7, 12], 16, "tiny"
    sampling = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    rows, ok = [], True
    with Engine(EngineConfig(base_dir, method="fp32", adapters={"demo": work / "adapter.safetensors"}, max_model_len=64,
                             max_num_seqs=4, kv_cache_memory=16 << 20)) as engine:
        with Server(engine, ServeConfig(port=0, served_model_name=served)) as server:
            _post(f"{server.url}/v1/load_lora_adapter", {"lora_name": "second", "lora_path": str(work / "second")})
            for model, adapter in ((served, None), ("demo", "demo"), (f"{served}:second", "second")):
                start = time.perf_counter()
                http = _complete(openai, server.url, model, prompt, steps)
                elapsed = time.perf_counter() - start
                local = list(engine.generate([prompt], [adapter], [sampling])[0].token_ids)
                ok &= http == local
                rows.append((model, " ".join(map(str, http[:6])) + " …", " ".join(map(str, local[:6])) + " …",
                             "[green]yes[/]" if http == local else "[red]NO[/]", f"{elapsed * 1000:.0f}"))
            url = server.url
    table = Table(title=f"greedy, {steps} tokens: POST {url}/v1/completions beside engine.generate")
    for column in ("model", "over HTTP", "in process", "same", "ms"):
        table.add_column(column, justify="right" if column == "ms" else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print("[dim]server stopped; `expertlora serve --model DIR --adapter NAME=PATH` runs it for real (README: Serve)[/dim]")
    return ok


def _complete(openai, url: str, model: str, prompt: list[int], steps: int) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if openai is not None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0, timeout=60)
        r = client.completions.create(model=model, prompt=prompt, max_tokens=steps, temperature=0, extra_body=extra)
        return list(r.choices[0].token_ids)
    body = {"model": model, "prompt": prompt, "max_tokens": steps, "temperature": 0} | extra
    return list(_post(f"{url}/v1/completions", body)["choices"][0]["token_ids"])


def _post(url: str, body: dict) -> dict:
    import json
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())

"""inspect: what an adapter holds, as a dict (for --json) and as rich tables."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .formats.base import AdapterReader
from .lora import PROJECTIONS


def describe(reader: AdapterReader) -> dict:
    info = reader.info
    size = sum(p.stat().st_size for p in _files(info.path))
    return {
        "path": str(info.path),
        "format": info.format,
        "peft_version": info.peft_version,
        "orientation": info.orientation,
        "num_experts": info.num_experts,
        "hidden_size": info.hidden_size,
        "intermediate_size": info.intermediate_size,
        "dtype": str(info.dtype).removeprefix("torch."),
        "use_rslora": info.use_rslora,
        "expert_naming": info.expert_naming,
        "base_model": info.base_model,
        "layers": {str(L): {p: s.to_json() for p, s in projs.items()} for L, projs in sorted(info.layers.items())},
        "non_expert_modules": {m: s.to_json() for m, s in info.modules.items()},
        "expert_parameters": info.num_params(),
        "size_bytes": size,
    }


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]


def print_report(d: dict, console: Console) -> None:
    head = Table.grid(padding=(0, 2))
    for key in ("path", "format", "peft_version", "orientation", "num_experts", "hidden_size", "intermediate_size", "dtype", "use_rslora", "expert_naming"):
        if d[key] is not None:
            head.add_row(f"[bold]{key}[/]", _text(d[key]))
    head.add_row("[bold]expert parameters[/]", f"{d['expert_parameters']:,}")
    head.add_row("[bold]size on disk[/]", f"{d['size_bytes'] / 2**20:,.1f} MiB")
    console.print(head)

    table = Table(title="expert LoRA (rank / alpha / scaling)")
    table.add_column("layers")
    for p in PROJECTIONS:
        table.add_column(p)
    for layers, projs in _group(d["layers"]):
        table.add_row(layers, *(_spec(projs.get(p)) for p in PROJECTIONS))
    console.print(table)

    mods = d["non_expert_modules"]
    if mods:
        table = Table(title=f"non-expert LoRA ({len(mods)} modules, kept and applied)")
        table.add_column("module")
        table.add_column("rank / alpha / scaling")
        for name, spec in mods.items():
            table.add_row(_text(name), _spec(spec))
        console.print(table)
    else:
        console.print("non-expert LoRA: none")


def _text(value) -> str:
    """A value from the adapter's files, shown as text: no rich markup, no control characters."""
    text = str(value)
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


def _spec(s: dict | None) -> str:
    return "-" if s is None else f"{s['rank']} / {s['alpha']:g} / {s['scaling']:.4g}"


def _group(layers: dict) -> list[tuple[str, dict]]:
    """Consecutive layers with the same specs share a row."""
    rows: list[tuple[list[int], dict]] = []
    for L, projs in layers.items():
        if rows and rows[-1][1] == projs and rows[-1][0][-1] + 1 == int(L):
            rows[-1][0].append(int(L))
        else:
            rows.append(([int(L)], projs))
    return [(str(ls[0]) if len(ls) == 1 else f"{ls[0]}-{ls[-1]}", projs) for ls, projs in rows]

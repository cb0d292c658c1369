"""Helpers for tests/test_serve.py: a tiny checkpoint with a tokenizer and a chat template, its
PEFT adapters, and readers of the server's answers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expertlora import tiny

FAMILY = "qwen3_moe"
VOCAB = 96
# Words the tiny word-level tokenizer knows ("t2" .. "t95"): each message becomes "t3 <content>",
# the generation prompt "t2". A template variable: ``terse`` ends the prompt with "t4" too.
CHAT_TEMPLATE = ("{% for m in messages %}t3 {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t2{% endif %}"
                 "{% if terse %} t4{% endif %}")


def build_model(root: Path) -> tuple[Path, dict[str, tuple[Path, object]]]:
    """A tiny random checkpoint with a tokenizer (and chat template), and three PEFT adapters of
    different ranks and values: name -> (directory, PeftModel)."""
    from transformers import AutoTokenizer

    model_dir = tiny.save_checkpoint(tiny.tiny_model(FAMILY, seed=0), root / "model")
    tiny.save_tokenizer(model_dir, VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    adapters = {}
    for name, r, alpha, seed in (("alpha", 4, 8.0, 11), ("beta", 2, 5.0, 12), ("gamma", 8, 4.0, 13)):
        out = root / name
        peft_model = tiny.peft_fused_adapter(tiny.tiny_model(FAMILY, seed=0), out, family=FAMILY, r=r, alpha=alpha, seed=seed)
        adapters[name] = (out, peft_model)
    return model_dir, adapters


def random_ids(length: int, seed: int) -> list[int]:
    """Prompt ids drawn at random (ids 2.. so none is EOS or unknown)."""
    return torch.randint(2, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def as_text(ids) -> str:
    """What the tiny tokenizer decodes ``ids`` to (its special tokens 0 and 1 skipped)."""
    return " ".join(f"t{i}" for i in ids if i >= 2)


def peft_greedy(model, prompt: list[int], max_tokens: int, base: bool = False) -> list[int]:
    """transformers + PEFT's greedy tokens, up to and with the first end-of-sequence token (as the
    engine stops, when the request does not ignore EOS)."""
    from contextlib import nullcontext

    x = torch.tensor([prompt])
    with torch.no_grad(), (model.disable_adapter() if base else nullcontext()):
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def sse_events(lines) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream: dicts, and the final "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0

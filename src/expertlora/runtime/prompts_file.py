"""``expertlora run --prompts-file FILE.jsonl``: many requests through the engine at once.

Each line is one JSON object: ``id`` (string), exactly one of ``prompt_ids`` (token ids),
``prompt`` (text) or ``messages`` (chat), and optionally ``adapter`` (a loaded name; null or absent:
the base), ``max_new_tokens`` (or OpenAI's name, ``max_tokens``), ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop``, ``ignore_eos``, ``logprobs`` (alternatives per token, up to 20: the
result then holds each generated token's ``{token_id, logprob, top}``), and with ``messages``
``chat_template_kwargs`` (the template's variables, as vLLM takes them). Every line is checked before anything runs; a bad
one is an error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from .engine import Engine
from .request import RequestOutput, SamplingParams

MAX_FILE_BYTES = 1 << 30
MAX_LINES = 1_000_000
PROMPT_KEYS = ("prompt_ids", "prompt", "messages")
SAMPLING_KEYS = {"max_new_tokens": "max_tokens", "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos", "logprobs": "logprobs"}
KNOWN_KEYS = {"id", "adapter", "chat_template_kwargs", *PROMPT_KEYS, *SAMPLING_KEYS}


@dataclass(frozen=True)
class Job:
    line: int
    id: str
    prompt: str | list
    adapter: str | None
    sampling: SamplingParams
    chat_template_kwargs: dict | None = None  # with messages: the chat template's variables


def read_jobs(path: Path, default_max_tokens: int = 32) -> list[Job]:
    """Every line of ``path`` as a Job; AdapterError naming the line for the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(path, None, "a JSON Lines file of requests", "no such file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise AdapterError(path, None, f"at most {MAX_FILE_BYTES} bytes", f"{path.stat().st_size}")
    jobs, ids = [], set()
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number > MAX_LINES:
                raise AdapterError(path, f"line {number}", f"at most {MAX_LINES} lines", "more")
            if not raw.strip():
                continue
            job = _job(path, number, raw, default_max_tokens)
            if job.id in ids:
                raise AdapterError(path, f"line {number}: id", "an id no other line has", repr(job.id))
            ids.add(job.id)
            jobs.append(job)
    if not jobs:
        raise AdapterError(path, None, "at least one request line", "none")
    return jobs


def _job(path: Path, number: int, raw: bytes, default_max_tokens: int) -> Job:
    where = f"line {number}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(path, where, "a JSON object", f"invalid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise AdapterError(path, where, "a JSON object", type(obj).__name__)
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        raise AdapterError(path, f"{where}: {unknown[0]}", f"one of {', '.join(sorted(KNOWN_KEYS))}", "an unknown key")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise AdapterError(path, f"{where}: id", "a non-empty string", repr(obj.get("id")))
    given = [k for k in PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise AdapterError(path, where, f"exactly one of {', '.join(PROMPT_KEYS)}", ", ".join(given) or "none")
    key = given[0]
    prompt = obj[key]
    valid = {
        "prompt_ids": isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt),
        "prompt": isinstance(prompt, str),
        "messages": isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt),
    }[key]
    if not valid or not prompt:
        expected = {"prompt_ids": "a non-empty list of token ids", "prompt": "a non-empty string", "messages": "a non-empty list of message objects"}[key]
        raise AdapterError(path, f"{where}: {key}", expected, _short(prompt))
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise AdapterError(path, f"{where}: adapter", "a string or null", _short(adapter))
    if "max_new_tokens" in obj and "max_tokens" in obj:
        raise AdapterError(path, f"{where}: max_tokens", "one of max_new_tokens and max_tokens (the same setting)", "both")
    settings = {SAMPLING_KEYS[k]: v for k, v in obj.items() if k in SAMPLING_KEYS}
    settings.setdefault("max_tokens", default_max_tokens)
    if isinstance(settings.get("stop"), str):
        settings["stop"] = [settings["stop"]]
    if "ignore_eos" in settings and not isinstance(settings["ignore_eos"], bool):
        raise AdapterError(path, f"{where}: ignore_eos", "true or false", _short(settings["ignore_eos"]))
    if "stop" in settings and not isinstance(settings["stop"], list):
        raise AdapterError(path, f"{where}: stop", "a string or a list of strings", _short(settings["stop"]))
    try:
        sampling = SamplingParams(**settings)
    except (TypeError, ValueError) as e:
        raise AdapterError(path, where, "valid sampling settings", str(e)) from None
    template_kwargs = obj.get("chat_template_kwargs")
    if template_kwargs is not None and not (isinstance(template_kwargs, dict) and "messages" in obj):
        raise AdapterError(path, f"{where}: chat_template_kwargs", "an object of template variables, with messages", _short(template_kwargs))
    return Job(number, obj["id"], prompt, adapter, sampling, template_kwargs)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_jobs(path: Path, jobs: list[Job], engine: Engine) -> list[list[int]]:
    """Each job's prompt ids, checked against the engine's model and adapters (nothing runs)."""
    from .errors import RequestError

    out = []
    for job in jobs:
        if job.adapter is not None and job.adapter not in engine.adapter_names:
            raise AdapterError(path, f"line {job.line}: adapter", f"one of the --adapter names ({', '.join(engine.adapter_names) or 'none given'}) or null", repr(job.adapter))
        try:
            ids = engine.prompt_ids(job.prompt, job.chat_template_kwargs)
        except RequestError as e:
            raise AdapterError(path, f"line {job.line}", "a prompt this model can run", str(e)) from None
        if len(ids) + job.sampling.max_tokens > engine.max_model_len:
            raise AdapterError(path, f"line {job.line}: max_new_tokens", f"at most {engine.max_model_len - len(ids)} after its {len(ids)} prompt tokens (the context)", str(job.sampling.max_tokens))
        out.append(ids)
    return out


def run_jobs(engine: Engine, jobs: list[Job], prompt_ids: list[list[int]], emit: Callable[[dict], None], advance: Callable[[], None] = lambda: None) -> None:
    """Queue every job (the engine batches them), and ``emit`` each result as it finishes."""
    import queue

    done: queue.SimpleQueue[tuple[Job, RequestOutput]] = queue.SimpleQueue()
    pending = list(zip(jobs, prompt_ids))
    in_flight = 0
    limit = engine.config.max_queued_requests  # keep the queue below its limit: the rest wait here
    while pending or in_flight:
        while pending and in_flight < limit:
            job, ids = pending.pop(0)
            handle = engine.add_request(ids, job.adapter, job.sampling, request_id=job.id)
            handle.add_done_callback(lambda out, job=job: done.put((job, out)))
            in_flight += 1
        job, out = done.get()
        in_flight -= 1
        emit(result_json(job, out))
        advance()


def result_json(job: Job, out: RequestOutput) -> dict:
    result = {
        "id": job.id, "adapter": out.adapter, "token_ids": list(out.token_ids), "text": out.text,
        "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
    }
    if out.logprobs is not None:  # asked for: one per generated token
        result["logprobs"] = [{"token_id": e.token_id, "logprob": e.logprob, "top": [list(t) for t in e.top]} for e in out.logprobs]
    return result

"""The OpenAI-compatible server (expertlora.serve) on a live loopback socket, driven by the official
openai client: completions and chat, streamed and not, for the base and each adapter, with token
ids equal to the engine's for the same request (and to transformers + PEFT, fp32 greedy);
adapters loaded and unloaded at runtime; every refusal by status and message; disconnects that
abort at once; a bounded concurrent load with adapters changing midway; graceful stops; and the
``serve`` command stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from expertlora import tiny  # noqa: E402
from expertlora.runtime import Engine, EngineConfig, SamplingParams  # noqa: E402
from expertlora.serve import Server, ServeConfig  # noqa: E402
from expertlora.serve.errors import APIError  # noqa: E402

from .conftest import FAMILIES
from .serve_helpers import as_text, build_model, metric, peft_greedy, random_ids, sse_events  # noqa: E402

MAX_MODEL_LEN = 2048
LONG = MAX_MODEL_LEN - 16  # tokens a request asks for when it must still be running when we act


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One engine (fp32, adapter "alpha" loaded at start) behind a server named "tiny"."""
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapters = build_model(root)
    engine = Engine(EngineConfig(model_dir, method="fp32", adapters={"alpha": adapters["alpha"][0]}, max_model_len=MAX_MODEL_LEN,
                                 max_num_seqs=16, kv_cache_memory=128 << 20, threads=1))
    server = Server(engine, ServeConfig(port=0, served_model_name="tiny")).start()
    try:
        yield type("Served", (), dict(engine=engine, server=server, url=server.url, root=root, model_dir=model_dir,
                                      adapters=adapters))
    finally:
        server.stop(timeout=5)
        engine.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def alone(engine, prompt, adapter, sampling) -> tuple[int, ...]:
    return engine.generate([prompt], [adapter], [sampling])[0].token_ids


def complete(client, model, prompt, max_tokens, **kw):
    extra = {"return_token_ids": True, "ignore_eos": True} | kw.pop("extra_body", {})
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=kw.pop("temperature", 0),
                                     extra_body=extra, **kw)


def refused(call, status: int, message: str, param: str | None = "?"):
    """``call`` fails with this status, a message matching ``message``, and (if given) this param."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    e = info.value
    error = e.body if isinstance(e.body, dict) and "message" in e.body else (e.body or {}).get("error", {})
    assert e.status_code == status, (e.status_code, error)
    assert re.search(message, error["message"]), error["message"]
    if param != "?":
        assert error.get("param") == param, error
    return e


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- completions and chat: the engine's tokens, over HTTP ----------------------------------------


def test_completions_equal_engine_and_peft(served, client):
    engine = served.engine
    prompt = random_ids(7, seed=random.randrange(1 << 30))
    tokens = {}
    for model, adapter in (("tiny", None), ("alpha", "alpha"), ("tiny:alpha", "alpha")):
        r = complete(client, model, prompt, 10)
        choice = r.choices[0]
        assert choice.prompt_token_ids == prompt and choice.finish_reason == "length"
        assert tuple(choice.token_ids) == alone(engine, prompt, adapter, greedy(10)), model
        assert choice.text == as_text(choice.token_ids) and r.model == model
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 10, 17)
        tokens[model] = choice.token_ids
    assert tokens["alpha"] == tokens["tiny:alpha"] != tokens["tiny"]  # the adapter changes the answer
    peft_alpha = served.adapters["alpha"][1]
    assert tokens["tiny"] == peft_greedy(peft_alpha, prompt, 10, base=True)
    assert tokens["alpha"] == peft_greedy(peft_alpha, prompt, 10)
    # text prompts go through the checkpoint's tokenizer
    r = complete(client, "alpha", as_text(prompt), 10)
    assert r.choices[0].prompt_token_ids == prompt and r.choices[0].token_ids == tokens["alpha"]


def test_streamed_completion_equals_whole(served, client):
    prompt = random_ids(5, seed=random.randrange(1 << 30))
    whole = complete(client, "alpha", prompt, 9).choices[0]
    stream = complete(client, "alpha", prompt, 9, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 9)
    choices = [c.choices[0] for c in chunks[:-1]]
    assert choices[0].prompt_token_ids == prompt
    assert [t for c in choices for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in choices) == whole.text
    assert [c.finish_reason for c in choices] == [None] * (len(choices) - 1) + ["length"]
    # without include_usage there is no usage chunk; the raw stream ends with [DONE]. Between
    # the first chunk and the last (which always come), a token that adds no text (0 and 1, the
    # special tokens, are skipped) sends none
    base = complete(client, "tiny", prompt, 4).choices[0]
    with httpx.stream("POST", f"{served.url}/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    sent = 2 + sum(t >= 2 for t in base.token_ids[1:-1])
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1]) and len(events) == sent + 1
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == base.text
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 2) + ["length"]


def test_chat_equals_engine(served, client):
    engine = served.engine
    words = random_ids(6, seed=random.randrange(1 << 30))
    messages = [{"role": "user", "content": as_text(words)}]
    want_prompt = [3, *words, 2]  # serve_helpers.CHAT_TEMPLATE
    assert engine.prompt_ids(messages) == want_prompt
    want = alone(engine, want_prompt, "alpha", greedy(8))
    r = client.chat.completions.create(model="alpha", messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.prompt_token_ids == want_prompt and tuple(choice.token_ids) == want
    assert choice.message.content == as_text(want)
    # streamed, with content given as text parts and the newer max_completion_tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": as_text(words[:3]) + " "}, {"type": "text", "text": as_text(words[3:])}]}]
    chunks = list(client.chat.completions.create(model="tiny:alpha", messages=parts, max_completion_tokens=8, temperature=0, stream=True,
                                                 extra_body={"return_token_ids": True, "ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert tuple(t for c in chunks for t in c.choices[0].token_ids) == want
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == as_text(want)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_settings_reach_the_engine(served, client):
    engine = served.engine
    prompt = random_ids(6, seed=random.randrange(1 << 30))
    sampled = {}
    for seed in (123, 456):
        r = complete(client, "alpha", prompt, 12, temperature=0.9, top_p=0.95, seed=seed, extra_body={"top_k": 20})
        want = alone(engine, prompt, "alpha", SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=20, seed=seed, ignore_eos=True))
        assert tuple(r.choices[0].token_ids) == want
        sampled[seed] = want
    assert sampled[123] != sampled[456]
    # a stop string ends the text before it, with finish_reason stop
    full = complete(client, "tiny", prompt, 12).choices[0]
    stop = " t" + str(next(t for t in full.token_ids[3:] if t >= 2))  # a word of the text (0 and 1 decode to nothing)
    r = complete(client, "tiny", prompt, 12, stop=[stop]).choices[0]
    assert r.finish_reason == "stop" and r.text == full.text[: full.text.index(stop)]
    # stop_token_ids: the token ends the output and is kept in token_ids
    r = complete(client, "tiny", prompt, 12, extra_body={"stop_token_ids": [full.token_ids[3]]}).choices[0]
    assert r.finish_reason == "stop" and r.token_ids == full.token_ids[: full.token_ids.index(full.token_ids[3]) + 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_over_http_equals_peft(family, model_dir, fused_adapter):
    """fp32 greedy over HTTP, the base and an adapter in one server: transformers + PEFT's tokens."""
    adapter_dir, peft_model, _ = fused_adapter(family)
    prompt = random_ids(6, seed=random.randrange(1 << 30))
    config = EngineConfig(model_dir(family), method="fp32", adapters={"a": adapter_dir}, max_model_len=64, threads=1)
    with Engine(config) as engine, Server(engine, ServeConfig(port=0, served_model_name="m")) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        base, adapted = (complete(c, model, prompt, 6, extra_body={"ignore_eos": False}).choices[0].token_ids for model in ("m", "m:a"))
    assert base == peft_greedy(peft_model, prompt, 6, base=True)
    assert adapted == peft_greedy(peft_model, prompt, 6)


# -- adapters at runtime ----------------------------------------------------------------------------


def test_load_and_unload_at_runtime(served, client):
    engine, url = served.engine, served.url
    prompt = random_ids(6, seed=random.randrange(1 << 30))
    beta_dir, beta_peft = served.adapters["beta"]
    refused(lambda: complete(client, "beta", prompt, 4), 404, "'beta' does not exist", "model")
    # a long request runs through the loads and failed loads below, untouched
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": "alpha", "prompt": prompt, "max_tokens": 300, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}) as running:
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(beta_dir)}, timeout=60)
        assert r.status_code == 200 and r.json()["loaded_adapters"] == ["alpha", "beta"]
        bad = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(served.root / "missing")}, timeout=60)
        assert bad.status_code == 400 and "could not be loaded" in bad.json()["error"]["message"]
        wrong = tiny.write_per_expert_adapter(served.root / "wrong_shape", num_layers=[0], num_experts=6, hidden_size=40, intermediate_size=64)
        bad = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(wrong)}, timeout=60)  # SGLang's route
        message = bad.json()["error"]["message"]
        assert bad.status_code == 400 and "\n" not in message and re.search("hidden|32|40", message), message
        again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(beta_dir)}, timeout=60)
        assert again.status_code == 409 and "already loaded" in again.json()["error"]["message"]
        events = sse_events(running.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert tuple(t for e in events[:-1] for t in e["choices"][0]["token_ids"]) == alone(engine, prompt, "alpha", greedy(300))
    assert engine.adapter_names == ["alpha", "beta"]

    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"tiny", "alpha", "beta"} and listed["beta"].parent == "tiny" and listed["tiny"].parent is None
    got = complete(client, "beta", prompt, 8).choices[0].token_ids
    assert tuple(got) == alone(engine, prompt, "beta", greedy(8)) and got == peft_greedy(beta_peft, prompt, 8)
    assert got != complete(client, "alpha", prompt, 8).choices[0].token_ids

    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta"}, timeout=60)
    assert r.status_code == 200 and r.json()["loaded_adapters"] == ["alpha"]
    refused(lambda: complete(client, "beta", prompt, 4), 404, "'beta' does not exist", "model")
    r = httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "beta"}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 404 and "no adapter named 'beta'" in error["message"] and error["param"] == "lora_name", r.text
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "tiny"}, timeout=60)  # the base model's served name
    assert r.status_code == 400 and "base model's served name" in r.json()["error"]["message"], r.text
    assert client.models.list().data[0].id == "tiny"


def test_adapter_dirs_confine_runtime_loads(served, tmp_path):
    engine = served.engine
    root = tmp_path / "adapters"
    root.mkdir()
    (root / "inside").symlink_to(served.adapters["gamma"][0])  # a link from inside to a folder outside
    os.symlink(served.adapters["beta"][0], root / "beta_link")
    with Server(engine, ServeConfig(port=0, served_model_name="tiny", adapter_dirs=(root,))) as server:
        def load(name, path):
            return httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60)

        for path in (served.adapters["beta"][0], root / "inside", "beta_link", root / ".." / "alpha"):
            r = load("x", path)
            assert r.status_code == 403 and "outside the adapter folders" in r.json()["error"]["message"], (path, r.text)
        assert engine.adapter_names == ["alpha"]
    # without roots, a server reachable from other machines loads nothing at runtime
    from expertlora.serve.state import ServerState

    state = ServerState(engine, ServeConfig(host="0.0.0.0"))
    with pytest.raises(APIError) as info:
        state.allowed_adapter_path(str(served.adapters["beta"][0]))
    assert info.value.status == 403 and "--adapter-dir" in info.value.message
    state.shutdown_threads()


def test_adapter_inside_a_root_loads(served, tmp_path):
    import shutil

    root = tmp_path / "adapters"
    shutil.copytree(served.adapters["gamma"][0], root / "gamma")
    with Server(served.engine, ServeConfig(port=0, served_model_name="tiny", adapter_dirs=(root,))) as server:
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": "gamma"}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "g"}, timeout=60)
        assert r.status_code == 200 and served.engine.adapter_names == ["alpha"]


# -- refusals ---------------------------------------------------------------------------------------


def test_logprobs_over_http_are_the_engines(served, client):
    """Completions' and chat's log-probabilities, whole and streamed, are the engine's for the same
    request (fp32: 1e-5), in each API's form; a request without them has none."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(served.model_dir).convert_ids_to_tokens  # the word-level vocabulary: id -> word
    name = lambda t: vocab([t])[0]  # noqa: E731
    engine = served.engine
    prompt = random_ids(6, seed=random.randrange(1 << 30))
    mine = engine.generate([prompt], ["alpha"], [greedy(7, logprobs=3)])[0]
    whole = complete(client, "alpha", prompt, 7, logprobs=3).choices[0]
    assert tuple(whole.token_ids) == mine.token_ids
    lp = whole.logprobs
    assert lp.tokens == [name(t) for t in mine.token_ids]
    assert max(abs(a - e.logprob) for a, e in zip(lp.token_logprobs, mine.logprobs)) <= 1e-5
    for top, e, token in zip(lp.top_logprobs, mine.logprobs, lp.tokens):
        want = {name(t): v for t, v in e.top} | {token: e.logprob}  # the chosen token too, as vLLM gives it
        assert top.keys() == want.keys() and max(abs(top[k] - want[k]) for k in want) <= 1e-5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = [c.choices[0].logprobs for c in complete(client, "alpha", prompt, 7, logprobs=3, stream=True)]
    assert [t for c in streamed for t in c.tokens] == lp.tokens and [o for c in streamed for o in c.text_offset] == lp.text_offset
    assert max(abs(a - b) for a, b in zip([v for c in streamed for v in c.token_logprobs], lp.token_logprobs)) <= 1e-5
    assert complete(client, "alpha", prompt, 3).choices[0].logprobs is None
    # the base and two adapters at once, each with its log-probabilities: each as the request alone
    from concurrent.futures import ThreadPoolExecutor

    asks = [("tiny", None), ("alpha", "alpha"), ("tiny", None), ("alpha", "alpha")]
    prompts = [random_ids(4 + i, seed=random.randrange(1 << 30)) for i in range(len(asks))]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: complete(client, a[0][0], a[1], 6, logprobs=2).choices[0], zip(asks, prompts)))
    for answer, (_, adapter), p in zip(answers, asks, prompts):
        single = engine.generate([p], [adapter], [greedy(6, logprobs=2)])[0]
        assert tuple(answer.token_ids) == single.token_ids
        assert max(abs(a - e.logprob) for a, e in zip(answer.logprobs.token_logprobs, single.logprobs)) <= 1e-5

    messages = [{"role": "user", "content": "t5 t9"}]
    chat_ids = engine.prompt_ids(messages)
    mine = engine.generate([chat_ids], ["alpha"], [greedy(5, logprobs=2)])[0]
    r = client.chat.completions.create(model="alpha", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [name(t) for t in mine.token_ids]
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)
    assert max(abs(c.logprob - e.logprob) for c, e in zip(content, mine.logprobs)) <= 1e-5
    assert [[t.token for t in c.top_logprobs] for c in content] == [[name(t) for t, _ in e.top] for e in mine.logprobs]
    stream = client.chat.completions.create(model="alpha", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True, extra_body={"ignore_eos": True})
    streamed = [c for chunk in stream for c in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]
    assert [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in streamed] == \
        [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in content]
    only_chosen = client.chat.completions.create(model="alpha", messages=messages, max_tokens=2, temperature=0, logprobs=True)
    assert [len(c.top_logprobs) for c in only_chosen.choices[0].logprobs.content] == [0, 0]


def test_echo_scores_the_prompt_as_lm_eval_asks(served, client):
    """lm-eval's loglikelihood request (echo, logprobs 1, max_tokens 1): the prompt's text and
    tokens come first, the first token's log-probability null, the others the engine's prompt
    log-probabilities (fp32: 1e-5); streamed, the first chunk carries them."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(served.model_dir).convert_ids_to_tokens
    prompt = random_ids(8, seed=random.randrange(1 << 30))
    mine = served.engine.generate([prompt], ["alpha"], [greedy(1, logprobs=1, prompt_logprobs=1)])[0]
    for text_prompt in (False, True):
        r = complete(client, "alpha", as_text(prompt) if text_prompt else prompt, 1, logprobs=1, echo=True).choices[0]
        assert r.text == as_text(prompt) + as_text(mine.token_ids)
        lp = r.logprobs
        assert lp.tokens == vocab(prompt + list(mine.token_ids))
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        wanted = [e.logprob for e in mine.prompt_logprobs[1:]] + [mine.logprobs[0].logprob]
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], wanted)) <= 1e-5
        assert all(len(top) in (1, 2) and token in top for top, token in zip(lp.top_logprobs[1:], lp.tokens[1:]))
    chunks = [c.choices[0] for c in complete(client, "alpha", prompt, 3, logprobs=0, echo=True, stream=True)]
    assert chunks[0].text.startswith(as_text(prompt)) and chunks[0].logprobs.tokens[: len(prompt)] == vocab(prompt)
    assert "".join(c.text for c in chunks) == complete(client, "alpha", prompt, 3, echo=True).choices[0].text


def test_n_choices_are_the_engines_with_seeds_in_turn(served, client):
    """n = 3 samples of one prompt: choice i is the engine's answer with seed + i (as vLLM
    seeds them), the prompt counted once in the usage; streamed, each choice's chunks carry its
    index and add up to it; chat's n choices too."""
    engine = served.engine
    prompt = random_ids(5, seed=random.randrange(1 << 30))
    hot = dict(temperature=1.0, top_p=0.9)
    mine = [engine.generate([prompt], ["alpha"], [SamplingParams(max_tokens=6, seed=40 + i, ignore_eos=True, **hot)])[0] for i in range(3)]
    r = complete(client, "alpha", prompt, 6, n=3, seed=40, **hot)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [tuple(c.token_ids) for c in r.choices] == [m.token_ids for m in mine]
    assert len({tuple(c.token_ids) for c in r.choices}) > 1  # the seeds differ
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 18, 23)
    chunks = list(complete(client, "alpha", prompt, 6, n=3, seed=40, stream=True, stream_options={"include_usage": True}, **hot))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    for c in r.choices:
        mine_chunks = [k.choices[0] for k in chunks[:-1] if k.choices[0].index == c.index]
        assert "".join(k.text for k in mine_chunks) == c.text and [t for k in mine_chunks for t in k.token_ids] == c.token_ids
        assert [k.finish_reason for k in mine_chunks][-1] == "length"
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "t5"}], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content


def test_penalties_and_logit_bias_over_http_are_the_engines(served, client):
    engine = served.engine
    prompt = random_ids(5, seed=random.randrange(1 << 30))
    kw = dict(presence_penalty=1.2, frequency_penalty=0.4, logit_bias={11: 0.3, 12: -0.5})
    mine = engine.generate([prompt], ["alpha"], [greedy(8, **kw)])[0]
    r = complete(client, "alpha", prompt, 8, presence_penalty=1.2, frequency_penalty=0.4, logit_bias={"11": 0.3, "12": -0.5})
    assert tuple(r.choices[0].token_ids) == mine.token_ids != alone(engine, prompt, "alpha", greedy(8))
    chat = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "t5"}], max_tokens=4, temperature=0,
                                          logit_bias={"7": 100}, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert chat.choices[0].token_ids == [7, 7, 7, 7]


def test_chat_template_kwargs_reach_the_template(served, client):
    """vLLM's and SGLang's chat_template_kwargs (Qwen3's enable_thinking is one) are the template's
    variables; apply_chat_template's own arguments and odd values are refused by field."""
    messages = [{"role": "user", "content": "t5 t9"}]

    def prompt_ids(**extra):
        r = client.chat.completions.create(model="alpha", messages=messages, max_tokens=1, temperature=0,
                                           extra_body={"return_token_ids": True} | extra)
        return r.choices[0].prompt_token_ids

    plain = prompt_ids()
    assert plain == [3, 5, 9, 2] and prompt_ids(chat_template_kwargs={}) == plain
    assert prompt_ids(chat_template_kwargs={"terse": True, "enable_thinking": False}) == plain + [4]
    assert prompt_ids(chat_template_kwargs={"terse": False}) == plain
    for kwargs, needle in (({"tokenize": False}, "'tokenize' is not a template variable name"),
                           ({"add_generation_prompt": False}, "'add_generation_prompt' is not"), ({"1x": 1}, "'1x' is not"),
                           ({"terse": [1]}, "terse: expected a boolean, number"), ({"terse": "x" * 1025}, "terse: expected"),
                           ({f"k{i}": 1 for i in range(33)}, "chat_template_kwargs")):
        refused(lambda: prompt_ids(chat_template_kwargs=kwargs), 400, needle, "chat_template_kwargs")
    refused(lambda: complete(client, "alpha", [5], 1, extra_body={"chat_template_kwargs": {"terse": True}}), 400,
            "chat_template_kwargs: unknown field", "chat_template_kwargs")


ODD_VALUES = [None, True, False, 0, 1, 2, 5, 20, 21, -1, 2**63, 0.5, float("nan"), "", "x", [], [1], {}, {"a": 1}, {"7": 3},
              {"95": -100.0}, {"7": float("inf")}]


def _odd_bodies():
    from hypothesis import strategies as st

    fields = ["logprobs", "top_logprobs", "echo", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stream",
              "return_token_ids", "n", "max_tokens", "max_completion_tokens", "stop_token_ids", "presence_penalty",
              "frequency_penalty", "logit_bias"]
    return st.tuples(st.booleans(), st.dictionaries(st.sampled_from(fields), st.sampled_from(ODD_VALUES), max_size=5))


def test_odd_generation_fields_are_answered_or_refused_never_500(served):
    """Random combinations of the generation fields, sane and odd values, on both endpoints: each
    answer is 200 (a whole body or a stream ending [DONE]) or a 400 naming a field, never a
    server error; at most 3 tokens each, a bounded number of requests."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_odd_bodies())
    def check(case):
        chat, fields = case
        body = {"model": "alpha", "max_tokens": 3} | fields
        body |= {"messages": [{"role": "user", "content": "t5"}]} if chat else {"prompt": [5, 7, 9]}
        if body.get("max_tokens") not in (None, 0, 1, 2, 5) or body.get("max_completion_tokens") not in (None, 0, 1, 2, 5):
            body["max_tokens"] = body["max_completion_tokens"] = 3  # long generations only cost time
        r = httpx.post(f"{served.url}/v1/{'chat/completions' if chat else 'completions'}", content=json.dumps(body),  # NaN too (Python writes it; the parser reads it)
                       headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code in (200, 400), (r.status_code, body, r.text)
        if r.status_code == 400:
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"] and "\n" not in error["message"], (body, error)
        elif body.get("stream") is True:
            assert r.text.rstrip().endswith("data: [DONE]"), (body, r.text[-200:])
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), (body, r.text)

    check()


def test_bad_requests_are_400(served, client):
    p = random_ids(4, seed=random.randrange(1 << 30))
    chat = client.chat.completions.create
    msgs = [{"role": "user", "content": "t5"}]
    cases = [
        (lambda: complete(client, "tiny", p, 4, n=17), "n: expected 1 to 16 choices, found 17", "n"),
        (lambda: complete(client, "tiny", p, 4, n=0), "n: expected 1 to 16 choices, found 0", "n"),
        (lambda: complete(client, "tiny", p, 4, extra_body={"repetition_penalty": 1.2}), "repetition_penalty: unknown field", "repetition_penalty"),
        (lambda: complete(client, "tiny", [5, 96], 4), r"token id 96 is outside the vocabulary \[0, 96\)", "prompt"),
        (lambda: complete(client, "tiny", p, MAX_MODEL_LEN), "exceed the context of 2048", "max_tokens"),
        (lambda: complete(client, "tiny", p, 0), "max_tokens: expected an integer >= 1", "max_tokens"),
        (lambda: complete(client, "tiny", p, 4, temperature="hot"), "temperature: .*number", "temperature"),
        (lambda: complete(client, "tiny", p, 4, top_p=0), r"top_p: expected > 0", "top_p"),
        (lambda: complete(client, "tiny", p, 4, seed=-1), "seed: expected an integer >= 0", "seed"),
        (lambda: complete(client, "tiny", p, 4, stop=[f"s{i}" for i in range(17)]), "stop", "stop"),
        (lambda: complete(client, "tiny", [p, p], 4), "one prompt per request, found 2", "prompt"),
        (lambda: complete(client, "tiny", [], 4), "at least one token", "prompt"),
        (lambda: complete(client, "tiny", [1, True], 4), "expected a string or a list", "prompt"),
        (lambda: complete(client, "tiny", p, 4, frequency_penalty=2.5), "frequency_penalty: expected >= -2.0 and <= 2.0", "frequency_penalty"),
        (lambda: complete(client, "tiny", p, 4, presence_penalty="high"), "presence_penalty: .*number", "presence_penalty"),
        (lambda: complete(client, "tiny", p, 4, logit_bias={"t5": 1}), "logit_bias: keys are token ids, found 't5'", "logit_bias"),
        (lambda: complete(client, "tiny", p, 4, logit_bias={"96": 1}), r"logit_bias: token id 96 is outside the vocabulary \[0, 96\)", "logit_bias"),
        (lambda: complete(client, "tiny", p, 4, logit_bias={"5": 101}), "logit_bias: token 5's bias: expected a number from -100 to 100", "logit_bias"),
        (lambda: complete(client, "tiny", p, 4, logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "logit_bias"),
        (lambda: complete(client, "tiny", p, 4, logprobs=21), "logprobs: expected an integer >= 0 and <= 20, found 21", "logprobs"),
        (lambda: complete(client, "tiny", p, 4, logprobs=True), "logprobs: .*integer", "logprobs"),
        (lambda: complete(client, "tiny", p, 4, echo="yes"), "echo: .*boolean", "echo"),
        (lambda: chat(model="tiny", messages=msgs, max_tokens=4, top_logprobs=2), "top_logprobs: needs logprobs = true", "top_logprobs"),
        (lambda: chat(model="tiny", messages=msgs, max_tokens=4, logprobs=True, top_logprobs=21),
         "top_logprobs: expected an integer >= 0 and <= 20, found 21", "top_logprobs"),
        (lambda: chat(model="tiny", messages=msgs, max_tokens=4, logprobs=3), "logprobs: .*boolean", "logprobs"),
        (lambda: chat(model="tiny", messages=[], max_tokens=4), "messages", "messages"),
        (lambda: chat(model="tiny", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], max_tokens=4),
         "messages.0.content: only text parts .* found 'image_url'", "messages.0.content"),
        (lambda: chat(model="tiny", messages=msgs, max_tokens=4, max_completion_tokens=5), "differs from max_tokens", "max_completion_tokens"),
        (lambda: chat(model="tiny", messages=msgs, max_completion_tokens=0), "max_completion_tokens: expected an integer >= 1", "max_completion_tokens"),
        (lambda: chat(model="tiny", messages=msgs, max_tokens=4, tools=[{"type": "function", "function": {"name": "f"}}]), "tools: not supported", "tools"),
    ]
    for call, message, param in cases:
        refused(call, 400, message, param)
    for body, message, code in ((b"{not json", "not valid JSON", "invalid_json"), (b"[1, 2]", "JSON object", "invalid_value"),
                                (b"[" * 100_000 + b"]" * 100_000, "not valid JSON", "invalid_json")):
        r = httpx.post(f"{served.url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400 and message in error["message"] and error["code"] == code, r.text


def test_not_found_is_404(served, client):
    p = random_ids(4, seed=random.randrange(1 << 30))
    refused(lambda: complete(client, "gpt-4", p, 4), 404, r"'gpt-4' does not exist; this server has: tiny, alpha", "model")
    refused(lambda: complete(client, "tiny:nope", p, 4), 404, "'tiny:nope' does not exist", "model")
    refused(lambda: complete(client, "other:alpha", p, 4), 404, "'other:alpha' does not exist", "model")
    r = httpx.get(f"{served.url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/nothing"


def test_api_key(served):
    with Server(served.engine, ServeConfig(port=0, served_model_name="tiny", api_key="s3cret")) as server:
        p = random_ids(4, seed=random.randrange(1 << 30))
        for key in ("wrong", "s3cre", "s3cret2"):
            c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
            refused(lambda: complete(c, "tiny", p, 2), 401, "invalid or missing API key")
            refused(lambda: c.models.list(), 401, "invalid or missing API key")
        r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "alpha"}, timeout=10)
        assert r.status_code == 401 and served.engine.adapter_names == ["alpha"]
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert complete(good, "tiny", p, 2).choices[0].token_ids
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # probes need no key
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200


def test_body_size_is_bounded(served):
    with Server(served.engine, ServeConfig(port=0, served_model_name="tiny", max_body_bytes=4096)) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        refused(lambda: complete(c, "tiny", random_ids(2000, seed=1), 2), 413, "larger than 4096 bytes")

        def chunked():  # no Content-Length: counted as it arrives
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(100):
                yield b"t5 " * 100
            yield b'"}'

        r = httpx.post(f"{server.url}/v1/completions", content=chunked(), headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert complete(c, "tiny", random_ids(4, seed=2), 2).choices[0].token_ids


def test_in_use_adapter_and_disconnects(served, client):
    """Unloading an adapter a request uses is 409; a client that goes away aborts its request (all
    its n choices) at once."""
    engine, url = served.engine, served.url
    prompt = random_ids(3, seed=random.randrange(1 << 30))

    def aborted():
        return metric(httpx.get(f"{url}/metrics", timeout=10).text, "expertlora_requests_total", adapter="alpha", finish_reason="abort")

    before, steps = aborted(), engine.stats().steps
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": LONG,
                                                                "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            busy = http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "alpha"})
            assert busy.status_code == 409 and "in use by 1 request" in busy.json()["error"]["message"]
        wait_for(lambda: aborted() == before + 1, what="the streamed request's abort")
    wait_for(lambda: engine.stats().running == 0 and engine.stats().kv_slots_used == 0, what="the cache slot to be free")
    assert engine.stats().steps - steps < LONG // 2  # stopped early, not run to its end
    steps = engine.stats().steps
    # not streamed: the client times out and closes its connection
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": LONG, "temperature": 0,
                                                   "ignore_eos": True}, timeout=0.3)
    wait_for(lambda: aborted() == before + 2, what="the plain request's abort")
    wait_for(lambda: engine.stats().running == 0, what="the engine to stop the request")
    assert engine.stats().steps - steps < LONG // 2
    # n choices: a client leaving a stream aborts every one of them
    steps = engine.stats().steps
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": LONG, "n": 3,
                                                                "temperature": 1, "ignore_eos": True, "stream": True}) as r:
            assert next(r.iter_lines()).startswith("data: ")
    wait_for(lambda: aborted() == before + 5, what="the three choices' aborts")
    wait_for(lambda: engine.stats().running == 0 and engine.stats().kv_slots_used == 0, what="the choices' cache slots to be free")
    assert engine.stats().steps - steps < LONG // 2
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert metric(text, "expertlora_requests_running") == 0 and metric(text, "expertlora_kv_cache_usage_ratio") == 0
    assert engine.adapter_names == ["alpha"]


def test_queue_full_and_closed_engine_are_503(served, tmp_path):
    plain = tiny.save_checkpoint(tiny.tiny_model("qwen3_moe", seed=0), tmp_path / "plain")  # no tokenizer
    engine = Engine(EngineConfig(plain, method="fp32", max_num_seqs=1, max_queued_requests=2, max_model_len=256, threads=1))
    server = Server(engine, ServeConfig(port=0, retry_after_s=2)).start()
    try:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["plain"]  # the folder's name by default
        r = complete(c, "plain", [5, 6, 7], 5)
        assert r.choices[0].text == "" and len(r.choices[0].token_ids) == 5  # no tokenizer: ids only
        refused(lambda: complete(c, "plain", "t5 t6", 4), 400, "no tokenizer; give the prompt as token ids", "prompt")
        refused(lambda: c.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=2),
                400, "no chat template", "messages")
        results, lock = [], threading.Lock()

        def one():
            try:
                complete(c, "plain", [5, 6, 7], 200)
                outcome = "ok"
            except openai.APIStatusError as e:
                outcome = (e.status_code, e.response.headers.get("retry-after"), e.body.get("message", ""))
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        full = [r for r in results if r != "ok"]
        assert full and all(s == 503 and retry == "2" and "requests are waiting" in m for s, retry, m in full), results
        assert len(results) == 12 and "ok" in results
    finally:
        engine.close()
    refused(lambda: complete(c, "plain", [5, 6], 2), 503, "shutting down")
    server.stop()


# -- load -------------------------------------------------------------------------------------------


def test_concurrent_clients_with_adapters_changing(served):
    """8 clients x 50 requests, streamed and not, over the base, alpha and a third adapter that is
    beta until gamma is loaded midway and beta unloaded: no errors, every greedy result equal to
    the same request alone (greedy, or sampled with its own seed), and the run ends by itself."""
    engine, url = served.engine, served.url
    clients, per_client, switch_after = 8, 50, 150
    rng = random.Random(random.randrange(1 << 30))
    # (prompt, max tokens, adapter slot, sampling seed or None for greedy)
    cases = [(random_ids(rng.randint(2, 24), rng.randrange(1 << 30)), rng.randint(2, 12), slot, rng.randrange(1 << 30) if k % 3 == 0 else None)
             for slot in ("none", "alpha", "swap") for k in range(8)]

    def settings(i: int) -> SamplingParams:
        _, m, _, seed = cases[i]
        return greedy(m) if seed is None else SamplingParams(max_tokens=m, temperature=0.8, top_k=30, seed=seed, ignore_eos=True)

    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(served.adapters["beta"][0])}, timeout=60)
    assert r.status_code == 200
    names = {"none": None, "alpha": "alpha"}
    expected = {(i, a): alone(engine, p, a, settings(i)) for i, (p, _, slot, _) in enumerate(cases)
                for a in ([names[slot]] if slot in names else ["beta"])}

    lock = threading.Lock()
    state = {"phase": 1, "done": 0, "beta_pending": 0}
    results, errors = [], []

    def client_loop(k: int):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        local = random.Random(k)
        for j in range(per_client):
            i = local.randrange(len(cases))
            prompt, max_tokens, slot, seed = cases[i]
            sampled = {} if seed is None else {"temperature": 0.8, "seed": seed, "extra_body": {"top_k": 30}}
            with lock:
                adapter = names[slot] if slot in names else ("beta" if state["phase"] == 1 else "gamma")
                state["beta_pending"] += adapter == "beta"
            model = {None: "tiny", "alpha": "tiny:alpha" if j % 3 == 0 else "alpha"}.get(adapter, adapter)
            try:
                if j % 2:
                    chunks = list(complete(c, model, prompt, max_tokens, stream=True, **sampled))
                    got = tuple(t for ch in chunks for t in ch.choices[0].token_ids)
                else:
                    got = tuple(complete(c, model, prompt, max_tokens, **sampled).choices[0].token_ids)
                with lock:
                    results.append((i, adapter, got))
            except Exception as e:  # noqa: BLE001: every failure is reported below
                with lock:
                    errors.append(f"{model}: {type(e).__name__}: {e}")
            with lock:
                state["done"] += 1
                state["beta_pending"] -= adapter == "beta"

    def switch():
        wait_for(lambda: state["done"] >= switch_after, timeout=120, what="the midpoint")
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(served.adapters["gamma"][0])}, timeout=60)
        with lock:
            state["phase"] = 2
        wait_for(lambda: state["beta_pending"] == 0, timeout=60, what="beta's last request")
        u = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta"}, timeout=60)
        with lock:
            state["switch"] = (r.status_code, u.status_code, state["done"])

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)] + [threading.Thread(target=switch)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "the load test did not end by itself"
    assert errors == []
    assert state["switch"][:2] == (200, 200) and state["switch"][2] < clients * per_client, state["switch"]
    assert len(results) == clients * per_client
    assert {a for _, a, _ in results} == {None, "alpha", "beta", "gamma"}
    for i, a, _ in results:
        if a == "gamma" and (i, a) not in expected:
            expected[(i, a)] = alone(engine, cases[i][0], "gamma", settings(i))
    wrong = [(i, a) for i, a, got in results if got != expected[(i, a)]]
    assert wrong == [], f"{len(wrong)} results differ from the request alone"
    assert engine.stats().running == 0 and engine.stats().kv_slots_used == 0
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, timeout=60)
    assert r.status_code == 200 and engine.adapter_names == ["alpha"]
    print(f"load test: {clients * per_client} requests in {time.monotonic() - start:.1f} s")


# -- metrics, stopping ------------------------------------------------------------------------------


def test_metrics_count_each_adapter(served):
    with Server(served.engine, ServeConfig(port=0, served_model_name="tiny")) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        lengths = [(3, 4), (5, 2), (2, 7)]
        for n, m in lengths:
            complete(c, "alpha", random_ids(n, seed=n), m)
        list(complete(c, "tiny", random_ids(4, seed=9), 3, stream=True))
        refused(lambda: complete(c, "nope", [5], 1), 404, "does not exist")
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "expertlora_requests_total", adapter="alpha", finish_reason="length") == 3
    assert metric(text, "expertlora_requests_total", adapter="none", finish_reason="length") == 1
    assert metric(text, "expertlora_prompt_tokens_total", adapter="alpha") == sum(n for n, _ in lengths)
    assert metric(text, "expertlora_generation_tokens_total", adapter="alpha") == sum(m for _, m in lengths)
    assert metric(text, "expertlora_time_to_first_token_seconds_count", adapter="alpha") == 3
    assert metric(text, "expertlora_inter_token_latency_seconds_count", adapter="alpha") == sum(m - 1 for _, m in lengths)
    assert metric(text, "expertlora_request_latency_seconds_count", adapter="none") == 1
    assert metric(text, "expertlora_http_errors_total", status="404") == 1
    assert metric(text, "expertlora_adapter_loaded", adapter="alpha") == 1 and metric(text, "expertlora_adapters_loaded") == 1
    assert metric(text, "expertlora_kv_cache_slots") == served.engine.stats().kv_slots
    for gauge in ("expertlora_requests_running", "expertlora_requests_waiting", "expertlora_kv_cache_usage_ratio"):
        assert f"\n{gauge} " in text


def test_stop_drains_then_aborts(served):
    engine = served.engine
    prompt = random_ids(4, seed=random.randrange(1 << 30))
    body = {"model": "tiny", "prompt": prompt, "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    # 1. a running request finishes within the timeout; meanwhile new requests get 503
    server = Server(engine, ServeConfig(port=0, served_model_name="tiny")).start()
    url = server.url
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"max_tokens": 400}, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        stopper = threading.Thread(target=server.stop, kwargs={"timeout": 60})
        stopper.start()
        wait_for(lambda: server.state.draining, what="draining")
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        late = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 2, "stream": False}, timeout=10)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        events = sse_events([first, *lines])
    stopper.join(30)
    assert not stopper.is_alive() and events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) == 400
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
    # 2. with no time left, the running request is aborted and its stream still ends cleanly
    server = Server(engine, ServeConfig(port=0, served_model_name="tiny")).start()
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body | {"max_tokens": LONG}, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        t0 = time.monotonic()
        stopper = threading.Thread(target=server.stop, kwargs={"timeout": 0})
        stopper.start()
        events = sse_events([first, *lines])
    stopper.join(30)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "abort" and time.monotonic() - t0 < 10
    assert engine.stats().running == 0 and engine.stats().kv_slots_used == 0


def test_serve_command_stops_on_sigterm(served):
    """`expertlora serve` prints its URL when ready, answers, and exits 0 on SIGTERM."""
    cmd = [sys.executable, "-c", "from expertlora.cli import main; main()", "serve", "--model", str(served.model_dir),
           "--adapter", f"alpha={served.adapters['alpha'][0]}", "--method", "fp32", "--port", "0", "--threads", "1",
           "--max-model-len", "256", "--served-model-name", "tiny-cli", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        c = openai.OpenAI(base_url=f"{found.group(0)}/v1", api_key="x", max_retries=0, timeout=60)
        prompt = random_ids(5, seed=random.randrange(1 << 30))
        got = complete(c, "tiny-cli:alpha", prompt, 6).choices[0].token_ids
        assert tuple(got) == alone(served.engine, prompt, "alpha", greedy(6))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_readme_serve_example(served, capsys):
    """The README's Serve example (its ```python serve block), against the live server."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = "\n".join(re.findall(r"```python serve\n(.*?)```", readme, re.S))
    assert "OpenAI(" in code
    code = code.replace("http://127.0.0.1:8000", served.url).replace('"my-model:math"', '"tiny:alpha"').replace('model="code"', 'model="alpha"')
    exec(code, {})
    assert capsys.readouterr().out.strip()


def test_serve_command_bad_options(served, tmp_path):
    """Bad options: one line and exit code 2, before anything listens; a port in use: exit code 1."""
    import socket

    from typer.testing import CliRunner

    from expertlora.cli import app

    alpha = served.adapters["alpha"][0]
    model = ["serve", "--model", str(served.model_dir), "--port", "0", "--no-progress"]
    taken = socket.create_server(("127.0.0.1", 0))
    cases = [
        (["serve", "--model", str(tmp_path / "missing"), "--port", "0"], 2, "missing"),
        ([*model, "--adapter-dir", str(tmp_path / "nope")], 2, "adapter_dirs: .*nope: expected an existing folder"),
        ([*model[:-2], "70000"], 2, r"port: expected an integer >= 0 and <= 65535"),
        ([*model, "--served-model-name", "a", "--adapter", f"a={alpha}"], 2, "the base model's served name"),
        ([*model, "--adapter", f"a={alpha}", "--adapter", f"a={alpha}"], 2, "the name 'a' is given twice"),
        ([*model, "--adapter", f"a={alpha}", "--kt-moe-lora-rank", "3"], 2, "expected rank 3 .*found 4"),
        ([*model, "--max-num-seqs", "0"], 2, "max_num_seqs"),
        ([*model[:-2], str(taken.getsockname()[1])], 1, "127.0.0.1:.*(in use|Address)"),
    ]
    try:
        for args, code, message in cases:
            result = CliRunner().invoke(app, args)
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert result.exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
            assert re.search(message, lines[0]), lines[0]
    finally:
        taken.close()

"""The serving engine (expertlora.runtime): continuous batches of mixed adapters against each request
alone and against transformers + PEFT (fp32 greedy: the same tokens), chunked prefill, requests
joining and leaving, sampling per request, stops, aborts, adapters loaded and unloaded while
requests run, and the refusals."""

from __future__ import annotations

import contextlib

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from expertlora import tiny
from expertlora.runtime import (
    AdapterBusy,
    Engine,
    EngineConfig,
    QueueFull,
    RequestError,
    SamplingParams,
    UnknownAdapter,
)

from .conftest import FAMILIES

VOCAB = 96


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# (adapter, prompt length, prompt seed, max tokens): prompts longer than the prefill budget, the same
# prompt under three adapters, more requests than sequences so some wait and join mid-run.
WORKLOAD = [
    (None, 5, 1, 6), ("math", 9, 2, 4), ("code", 3, 3, 7), ("math", 5, 1, 6),
    (None, 12, 4, 3), ("code", 9, 2, 5), ("code", 5, 1, 6),
]


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory, model_dir):
    """family -> (adapter dir, PeftModel): another PEFT LoRA (other rank, alpha and values)."""
    from peft import PeftModel

    cache = {}

    def make(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"{family}_code")
            tiny.peft_fused_adapter(tiny.tiny_model(family, seed=0), out, family=family, r=2, alpha=5.0, seed=7)
            cache[family] = (out, PeftModel.from_pretrained(tiny.tiny_model(family, seed=0), str(out)).eval())
        return cache[family]

    return make


def peft_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_alone_and_peft(family, model_dir, fused_adapter, second_adapter):
    math_dir, peft_math, _ = fused_adapter(family)
    code_dir, peft_code = second_adapter(family)
    config = EngineConfig(model_dir(family), method="fp32", adapters={"math": math_dir, "code": code_dir},
                          max_num_seqs=3, max_prefill_tokens=4, max_model_len=64)
    prompts = [ids(n, seed) for _, n, seed, _ in WORKLOAD]
    sampling = [SamplingParams(max_tokens=m) for *_, m in WORKLOAD]
    adapters = [a for a, *_ in WORKLOAD]
    with Engine(config) as engine:
        batched = engine.generate(prompts, adapters, sampling)
        alone = [engine.generate([p], [a], [s])[0] for p, a, s in zip(prompts, adapters, sampling)]
        assert engine.stats().kv_slots_used == 0 and engine.stats().running == 0
        eos = engine.eos_ids
    peers = {"math": peft_math, "code": peft_code}
    for out, single, p, a, s in zip(batched, alone, prompts, adapters, sampling):
        assert out.token_ids == single.token_ids, (a, p)
        assert out.prompt_token_ids == tuple(p) and out.adapter == a
        if a is None:
            with peft_math.disable_adapter():
                expected = peft_greedy(peft_math, p, s.max_tokens)
        else:
            expected = peft_greedy(peers[a], p, s.max_tokens)
        assert list(out.token_ids) == expected, (family, a, p)
        assert out.finish_reason == ("stop" if expected[-1] in eos else "length")
    # the adapters matter: the same prompt gives different tokens under each
    same_prompt = [batched[i].token_ids for i in (0, 3, 6)]
    assert len(set(same_prompt)) == 3


@pytest.fixture(scope="module")
def engine(model_dir, fused_adapter):
    math_dir, _, _ = fused_adapter("qwen3_moe")
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, max_num_seqs=4,
                             max_model_len=48, max_queued_requests=64)) as e:
        yield e


def test_sampling_is_per_request_and_seeded(engine):
    p = ids(6, 11)
    hot = SamplingParams(max_tokens=8, temperature=1.5, seed=123, ignore_eos=True)
    alone = engine.generate([p], sampling=[hot])[0].token_ids
    # the same seeded request beside other sampling requests draws the same tokens
    others = [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    outs = engine.generate([p, p, p, p], ["math", None, "math", None], [others[0], hot, others[1], others[2]])
    assert outs[1].token_ids == alone
    assert len({o.token_ids for o in outs}) > 1
    # top_k = 1 is greedy, whatever the temperature
    greedy = engine.generate([p], sampling=[SamplingParams(max_tokens=8, ignore_eos=True)])[0].token_ids
    assert engine.generate([p], sampling=[SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=5, ignore_eos=True)])[0].token_ids == greedy
    # a tiny top_p keeps only the likeliest token too
    assert engine.generate([p], sampling=[SamplingParams(max_tokens=8, temperature=2.0, top_p=1e-6, seed=5, ignore_eos=True)])[0].token_ids == greedy


def test_stop_token_ids_and_eos(engine):
    p = ids(7, 12)
    full = engine.generate([p], sampling=[SamplingParams(max_tokens=10, ignore_eos=True)])[0]
    stop_at = full.token_ids[3]
    first = full.token_ids.index(stop_at)
    out = engine.generate([p], sampling=[SamplingParams(max_tokens=10, stop_token_ids=[stop_at], ignore_eos=True)])[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop"
    # EOS from the checkpoint's generation config ends a request unless ignore_eos
    engine.eos_ids, saved = frozenset([stop_at]), engine.eos_ids
    try:
        assert engine.generate([p], sampling=[SamplingParams(max_tokens=10)])[0].token_ids == full.token_ids[: first + 1]
        assert engine.generate([p], sampling=[SamplingParams(max_tokens=10, ignore_eos=True)])[0].token_ids == full.token_ids
    finally:
        engine.eos_ids = saved


def test_streaming_and_abort(engine):
    p = ids(5, 13)
    handle = engine.add_request(p, "math", SamplingParams(max_tokens=40, ignore_eos=True))
    seen = []
    for out in handle:
        seen += out.new_token_ids
        if len(seen) >= 3 and not out.finished:
            handle.abort()
    final = handle.result(timeout=30)
    assert final.finish_reason == "abort" and list(final.token_ids) == seen and 3 <= len(seen) < 40
    assert engine.stats().kv_slots_used == 0


def test_async_stream(engine):
    import asyncio

    p = ids(4, 14)
    expected = engine.generate([p], sampling=[SamplingParams(max_tokens=5)])[0].token_ids

    async def consume():
        handle = engine.add_request(p, None, SamplingParams(max_tokens=5))
        return [t async for out in handle.stream() for t in out.new_token_ids]

    assert tuple(asyncio.run(consume())) == expected


def test_more_requests_than_slots_wait_and_finish(engine):
    prompts = [ids(3 + i % 5, 20 + i) for i in range(10)]
    alone = [engine.generate([p], sampling=[SamplingParams(max_tokens=4)])[0].token_ids for p in prompts]
    together = engine.generate(prompts, sampling=SamplingParams(max_tokens=4))
    assert [o.token_ids for o in together] == alone
    assert engine.stats().kv_slots == 4


def test_refusals(engine):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([1, VOCAB], None)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([-1, 2], None)
    with pytest.raises(RequestError, match="exceed the context of 48"):
        engine.add_request(ids(10, 1), None, SamplingParams(max_tokens=39))
    with pytest.raises(RequestError, match="no tokenizer"):
        engine.add_request("hello", None)
    with pytest.raises(RequestError, match="at least one token"):
        engine.add_request([], None)
    with pytest.raises(UnknownAdapter, match="'nope'"):
        engine.add_request([1, 2], "nope")
    for bad in (dict(temperature=float("nan")), dict(top_p=0.0), dict(top_k=-1), dict(max_tokens=0), dict(max_tokens=True),
                dict(stop=[""]), dict(seed=-1), dict(temperature=1e9)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(UnknownAdapter):
        engine.unload_adapter("nope")
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_queue_full(model_dir):
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", max_num_seqs=1, max_model_len=40, max_queued_requests=2)) as e:
        handles = []
        with pytest.raises(QueueFull):
            for _ in range(50):  # the engine thread admits one at a time: the queue fills within a few
                handles.append(e.add_request(ids(4, 2), None, SamplingParams(max_tokens=30, ignore_eos=True)))
        for h in handles:
            h.abort()
        assert all(h.result(timeout=30).finish_reason in ("abort", "length") for h in handles)


def test_load_and_unload_while_running(tmp_path, model_dir, fused_adapter, second_adapter):
    math_dir, peft_math, _ = fused_adapter("qwen3_moe")
    code_dir, peft_code = second_adapter("qwen3_moe")
    p = ids(6, 30)
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, max_num_seqs=4, max_model_len=64)) as e:
        long = e.add_request(p, "math", SamplingParams(max_tokens=40, ignore_eos=True))
        next(iter(long))  # it runs
        e.load_adapter("code", code_dir)
        with pytest.raises(AdapterBusy):
            e.unload_adapter("math")
        with pytest.raises(ValueError, match="already loaded"):
            e.load_adapter("code", code_dir)
        with pytest.raises(ValueError, match="reserved"):
            e.load_adapter("none", code_dir)
        with pytest.raises(Exception, match="no such file"):
            e.load_adapter("ghost", tmp_path / "missing")
        code = e.generate([p], ["code"], [SamplingParams(max_tokens=5)])[0]
        assert list(code.token_ids) == peft_greedy(peft_code, p, 5)
        assert list(long.result(timeout=60).token_ids[:5]) == peft_greedy(peft_math, p, 5)
        e.unload_adapter("math")
        assert e.adapter_names == ["code"]
        with pytest.raises(UnknownAdapter):
            e.add_request(p, "math")


def _threads() -> dict[str, str]:
    """This process's threads: id -> name."""
    tasks = "/proc/self/task"
    names = {}
    for tid in os.listdir(tasks):
        try:
            names[tid] = open(f"{tasks}/{tid}/comm").read().strip()
        except FileNotFoundError:  # ended meanwhile
            pass
    return names


@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"), reason="needs 2 CPU threads and Linux /proc")
def test_an_adapter_read_leaves_no_thread_pool_behind(model_dir, fused_adapter, monkeypatch):
    """A server reads adapters on threads that live on: the parallel CPU work of a read must not
    leave an OpenMP pool on them (libgomp then stops spinning in the engine's pool: slower steps)."""
    math_dir, _, _ = fused_adapter("qwen3_moe")
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", max_model_len=32)) as e:
        read = e.adapters.read

        def read_with_parallel_work(name, source):
            torch.randn(1024, 1024) @ torch.randn(1024, 1024)  # as a large adapter's conversion does
            return read(name, source)

        monkeypatch.setattr(e.adapters, "read", read_with_parallel_work)
        before = _threads()
        with ThreadPoolExecutor(1) as server:  # a long-lived server thread, as serve's adapter_ops
            server.submit(e.load_adapter, "math", math_dir).result()
            new = [name for tid, name in _threads().items() if tid not in before]
            assert len(new) == 1, new  # the server thread alone
        assert e.adapter_names == ["math"]


def test_adapters_swap_under_load(model_dir, fused_adapter, second_adapter):
    """Clients keep sending base and math requests while code is loaded and unloaded: none fails,
    none sees another adapter's weights (each result equals the request alone)."""
    math_dir, _, _ = fused_adapter("qwen3_moe")
    code_dir, _ = second_adapter("qwen3_moe")
    prompts = [ids(4 + i % 3, 40 + i) for i in range(4)]
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, max_num_seqs=4, max_model_len=32)) as e:
        expected = {(i, a): e.generate([p], [a], [SamplingParams(max_tokens=4)])[0].token_ids
                    for i, p in enumerate(prompts) for a in (None, "math")}
        errors, results = [], []

        def client(k: int):
            try:
                for j in range(6):
                    i, a = (k + j) % 4, (None, "math")[(k + j) % 2]
                    results.append(((i, a), e.add_request(prompts[i], a, SamplingParams(max_tokens=4)).result(timeout=60).token_ids))
            except Exception as err:  # noqa: BLE001 - the test reports any failure
                errors.append(err)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for _ in range(3):
            e.load_adapter("code", code_dir)
            e.generate([prompts[0]], ["code"], [SamplingParams(max_tokens=2)])
            e.unload_adapter("code")
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 18
        assert all(tokens == expected[key] for key, tokens in results)


@pytest.mark.parametrize("method", ["bf16", "int8", "int4"])
def test_quantized_batched_equals_alone(method, model_dir, fused_adapter):
    """bf16 / int8 / int4: a packed batch gives each request its tokens alone, up to the method's
    rounding: the first tokens agree, and the logits of one step within 2e-2 relative (bf16 matmuls
    over other batch sizes round differently)."""
    math_dir, _, _ = fused_adapter("qwen3_moe")
    prompts = [ids(5 + i, 50 + i) for i in range(3)]
    with Engine(EngineConfig(model_dir("qwen3_moe"), method=method, adapters={"math": math_dir}, max_num_seqs=4, max_model_len=32)) as e:
        s = SamplingParams(max_tokens=3)
        batched = e.generate(prompts, [None, "math", "math"], s)
        alone = [e.generate([p], [a], [s])[0] for p, a in zip(prompts, [None, "math", "math"])]
    for b, a in zip(batched, alone):
        assert b.token_ids[0] == a.token_ids[0]


def test_least_recently_used_idle_adapter_is_evicted(model_dir, fused_adapter, second_adapter):
    math_dir, _, _ = fused_adapter("qwen3_moe")
    code_dir, peft_code = second_adapter("qwen3_moe")
    p = ids(5, 60)
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, max_loaded_adapters=1, max_model_len=32)) as e:
        busy = e.add_request(p, "math", SamplingParams(max_tokens=20, ignore_eos=True))
        next(iter(busy))
        with pytest.raises(AdapterBusy, match="all are in use"):
            e.load_adapter("code", code_dir)
        assert e.adapter_names == ["math"]
        busy.result(timeout=60)
        e.load_adapter("code", code_dir)  # math is idle now: evicted
        assert e.adapter_names == ["code"]
        assert list(e.generate([p], ["code"], [SamplingParams(max_tokens=4)])[0].token_ids) == peft_greedy(peft_code, p, 4)


def test_prompts_file_lines_are_checked(tmp_path):
    from expertlora.errors import AdapterError
    from expertlora.runtime.prompts_file import read_jobs

    good = '{"id": "a", "prompt_ids": [1, 2], "adapter": null, "max_new_tokens": 3, "stop": "x", "seed": 1}'
    for line, needle in (
        ('{"id": "b", "prompt_ids": [1, 2], "temprature": 1}', "line 2: temprature"),
        ('{"id": "b"}', "exactly one of prompt_ids, prompt, messages"),
        ('{"id": "b", "prompt_ids": [1, "2"]}', "line 2: prompt_ids"),
        ('{"id": "b", "prompt": "x", "messages": []}', "exactly one of"),
        ('{"id": 3, "prompt_ids": [1]}', "line 2: id"),
        ('{"id": "a", "prompt_ids": [1]}', "an id no other line has"),
        ('{"id": "b", "prompt_ids": [1], "top_p": 0}', "top_p"),
        ('{"id": "b", "prompt_ids": [1], "ignore_eos": "yes"}', "ignore_eos"),
        ('[1, 2]', "a JSON object"),
        ('{"id": "b", "prompt_ids": [1]', "invalid JSON"),
        ('{"id": "b", "prompt_ids": [1], "max_tokens": 2, "max_new_tokens": 3}', "line 2: max_tokens: expected one of max_new_tokens and max_tokens"),
        ('{"id": "b", "prompt_ids": [1], "logprobs": 21}', "logprobs: expected an integer >= 0 and <= 20, found 21"),
        ('{"id": "b", "prompt_ids": [1], "logprobs": true}', "logprobs"),
        ('{"id": "b", "prompt_ids": [1], "chat_template_kwargs": {"a": 1}}', "line 2: chat_template_kwargs: expected an object of template variables, with messages"),
        ('{"id": "b", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]}', "line 2: chat_template_kwargs"),
    ):
        path = tmp_path / "jobs.jsonl"
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(AdapterError, match=needle.replace("(", r"\(")):
            read_jobs(path)
    thinking = '{"id": "q3", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"enable_thinking": false}}'
    path.write_text(good + "\n\n" + '{"id": "openai", "prompt_ids": [1], "max_tokens": 5}' + "\n" + thinking + "\n")
    job, openai_named, chat = read_jobs(path)
    assert chat.chat_template_kwargs == {"enable_thinking": False} and job.chat_template_kwargs is None
    assert job.sampling.max_tokens == 3 and job.sampling.stop == ("x",) and job.adapter is None
    assert openai_named.sampling.max_tokens == 5  # OpenAI's name for max_new_tokens


def test_run_prompts_file_answers_each_line(tmp_path, model_dir, fused_adapter):
    """``expertlora run --prompts-file``: one JSON result per line (in finishing order, by id), each
    the engine's answer to that request alone; log-probabilities only where a line asks."""
    import json

    from typer.testing import CliRunner

    from expertlora.cli import app

    math_dir, _, _ = fused_adapter("qwen3_moe")
    lines = [{"id": "base", "prompt_ids": ids(5, 1), "max_new_tokens": 4, "ignore_eos": True},
             {"id": "math", "prompt_ids": ids(7, 2), "adapter": "math", "max_tokens": 5, "ignore_eos": True, "logprobs": 2},
             {"id": "hot", "prompt_ids": ids(4, 3), "adapter": "math", "max_new_tokens": 3, "temperature": 1.0, "seed": 5, "ignore_eos": True}]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    model = model_dir("qwen3_moe")
    result = CliRunner().invoke(app, ["run", str(model), "--adapter", f"math={math_dir}", "--method", "fp32", "--prompts-file", str(path),
                                      "--no-progress"])
    assert result.exit_code == 0, result.stderr
    answers = {a["id"]: a for a in map(json.loads, result.stdout.splitlines())}
    assert answers.keys() == {"base", "math", "hot"}
    with Engine(EngineConfig(model, method="fp32", adapters={"math": math_dir}, max_model_len=64)) as e:
        for line in lines:
            s = SamplingParams(max_tokens=line.get("max_new_tokens", line.get("max_tokens")), temperature=line.get("temperature", 0.0),
                               seed=line.get("seed"), ignore_eos=True, logprobs=line.get("logprobs"))
            alone = e.generate([line["prompt_ids"]], [line.get("adapter")], [s])[0]
            answer = answers[line["id"]]
            assert answer["token_ids"] == list(alone.token_ids) and answer["adapter"] == line.get("adapter"), line["id"]
            if "logprobs" not in line:
                assert "logprobs" not in answer
                continue
            assert [x["token_id"] for x in answer["logprobs"]] == answer["token_ids"]
            assert all(len(x["top"]) == 2 for x in answer["logprobs"])
            assert max(abs(x["logprob"] - y.logprob) for x, y in zip(answer["logprobs"], alone.logprobs)) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_decode_equals_eager(family, model_dir, fused_adapter, second_adapter):
    """Every expert on the GPU in bf16: decode steps replayed from per-bucket graphs give the
    tokens eager steps give, mixed adapters included, and adapters loaded between runs are seen.
    A graph pads its batch to the bucket, so the MoE kernels see another batch size and round
    otherwise in bf16: a near-tied token of a tiny random model may flip late in a sequence (seen
    once, DeepSeek-V3, token 5 of 6). So: each request's first two tokens equal, 90% of all."""
    math_dir, _, _ = fused_adapter(family)
    code_dir, _ = second_adapter(family)
    prompts = [ids(4 + i, 70 + i) for i in range(5)]
    adapters = [None, "math", "code", "math", None]
    s = SamplingParams(max_tokens=6, ignore_eos=True)
    results = {}
    for graphs in (False, True):
        config = EngineConfig(model_dir(family), method="bf16", adapters={"math": math_dir}, device="cuda", gpu_experts_ratio=1.0,
                              max_num_seqs=8, max_model_len=64, cuda_graphs=graphs)
        with Engine(config) as e:
            assert e.runner.graphs == graphs
            e.load_adapter("code", code_dir)
            results[graphs] = [o.token_ids for o in e.generate(prompts, adapters, s)]
    assert all(g[:2] == e[:2] for g, e in zip(results[True], results[False]))
    same = sum(a == b for g, e in zip(results[True], results[False]) for a, b in zip(g, e))
    assert same >= 0.9 * len(prompts) * s.max_tokens, results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_hybrid_engine_equals_cpu(ratio, model_dir, fused_adapter):
    """fp32, attention on the GPU and none or half of the experts there, the rest on the CPU engine:
    the same greedy tokens as the all-CPU engine, mixed adapters and chunked prefill included."""
    math_dir, _, _ = fused_adapter("qwen3_moe")
    prompts = [ids(4 + 3 * i, 80 + i) for i in range(4)]
    adapters = [None, "math", "math", None]
    s = SamplingParams(max_tokens=6, ignore_eos=True)
    results = []
    for device in ("cpu", "cuda"):
        config = EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, device=device,
                              gpu_experts_ratio=ratio if device == "cuda" else None, max_prefill_tokens=5, max_model_len=64)
        with Engine(config) as e:
            results.append([o.token_ids for o in e.generate(prompts, adapters, s)])
    assert results[0] == results[1]


def test_kv_cache_stays_within_its_budget(model_dir):
    """--kv-cache-memory is a bound: the regions allocated (a CUDA graph engine's pad region
    included) fit in it, and a budget below one region is refused."""
    from expertlora.runtime.engine import slots_in_budget

    assert slots_in_budget(budget=10_000, per_slot=1_000, max_num_seqs=64, pad=False) == 10
    assert slots_in_budget(budget=10_000, per_slot=1_000, max_num_seqs=64, pad=True) == 9  # + the pad region: 10 in all
    assert slots_in_budget(budget=10_000, per_slot=1_000, max_num_seqs=4, pad=True) == 4
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", max_model_len=32)) as e:
        per_slot = e.cache.nbytes // e.cache.num_slots
    budget = 3 * per_slot + per_slot // 2
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", max_model_len=32, kv_cache_memory=budget)) as e:
        assert e.cache.num_slots == 3 and e.cache.nbytes <= budget
    with pytest.raises(ValueError, match="holds no sequence of max_model_len 32"):
        Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", max_model_len=32, kv_cache_memory=per_slot // 2))


def peft_logprobs(model, prompt: list[int], tokens: tuple[int, ...]) -> torch.Tensor:
    """transformers + PEFT's log-probabilities (float64) of the next token after the prompt and
    each generated token but the last: [len(tokens), V]."""
    x = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, len(prompt) - 1 : -1]
    return logits.double().log_softmax(-1)


def test_logprobs_are_the_models_for_each_request(model_dir, fused_adapter):
    """Requests that ask for log-probabilities (k alternatives, or none but the chosen token's)
    beside requests that do not, greedy and sampling, base and adapter, in one batch: each
    token's figures are transformers + PEFT's for that sequence (fp32: 1e-5 relative)."""
    math_dir, peft_math, _ = fused_adapter("qwen3_moe")
    asks = [(None, 3, 0.0), ("math", 0, 0.0), ("math", 5, 1.3), (None, None, 0.0), ("math", 20, 0.8)]
    prompts = [ids(5 + i, 40 + i) for i in range(len(asks))]
    sampling = [SamplingParams(max_tokens=6, temperature=t, seed=7, ignore_eos=True, logprobs=k) for _, k, t in asks]
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, max_num_seqs=4, max_model_len=48)) as e:
        outs = e.generate(prompts, [a for a, *_ in asks], sampling)
    for out, prompt, (adapter, k, _) in zip(outs, prompts, asks):
        if k is None:
            assert out.logprobs is None
            continue
        assert [entry.token_id for entry in out.logprobs] == list(out.token_ids)
        if adapter is None:
            with peft_math.disable_adapter():
                ref = peft_logprobs(peft_math, prompt, out.token_ids)
        else:
            ref = peft_logprobs(peft_math, prompt, out.token_ids)
        for entry, row in zip(out.logprobs, ref):
            assert abs(entry.logprob - row[entry.token_id].item()) <= 1e-5 * max(1.0, abs(row[entry.token_id].item()))
            assert len(entry.top) == k
            if k:
                want = row.topk(k)
                assert [t for t, _ in entry.top] == want.indices.tolist(), (adapter, k)
                assert max(abs(v - w) for (_, v), w in zip(entry.top, want.values.tolist())) <= 1e-5 * max(1.0, abs(want.values.min().item()))
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_prompt_logprobs_across_prefill_chunks(model_dir, fused_adapter):
    """Prompt tokens' log-probabilities (after the first) of prompts prefilled in chunks of 4,
    beside a request that asks for none and decodes meanwhile: transformers + PEFT's (fp32, 1e-5)."""
    math_dir, peft_math, _ = fused_adapter("qwen3_moe")
    asks = [("math", 2, 11), (None, 0, 6), ("math", None, 9), (None, 3, 1)]  # (adapter, prompt_logprobs, prompt length)
    prompts = [ids(n, 60 + i) for i, (_, _, n) in enumerate(asks)]
    sampling = [SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=k) for _, k, _ in asks]
    config = EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, max_num_seqs=4, max_prefill_tokens=4, max_model_len=48)
    with Engine(config) as e:
        outs = e.generate(prompts, [a for a, *_ in asks], sampling)
    for out, prompt, (adapter, k, n) in zip(outs, prompts, asks):
        if k is None:
            assert out.prompt_logprobs is None
            continue
        assert len(out.prompt_logprobs) == n and out.prompt_logprobs[0] is None
        x = torch.tensor([prompt])
        with torch.no_grad(), (peft_math.disable_adapter() if adapter is None else contextlib.nullcontext()):
            ref = peft_math(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].double().log_softmax(-1)
        for entry, row, target in zip(out.prompt_logprobs[1:], ref, prompt[1:]):
            assert entry.token_id == target and abs(entry.logprob - row[target].item()) <= 1e-5 * max(1.0, abs(row[target].item()))
            assert [t for t, _ in entry.top] == row.topk(k).indices.tolist()


def test_logprob_entries_in_blocks_are_the_float64_math(monkeypatch):
    """Rows taken a few at a time (blocks of 3 here) give each row's own figures: the target's
    log-probability and its k likeliest tokens, k from 0 to more than a block."""
    from expertlora.runtime import sampler

    monkeypatch.setattr(sampler, "SCORE_BLOCK_ROWS", 3)
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    logits = torch.randn(8, 50, generator=g) * 3
    targets = torch.randint(0, 50, (8,), generator=g).tolist()
    ks = [0, 2, 5, 1, 0, 3, 20, 4]
    ref = logits.double().log_softmax(-1)
    for i, entry in enumerate(sampler.logprob_entries(logits, targets, ks)):
        assert entry.token_id == targets[i] and abs(entry.logprob - ref[i, targets[i]].item()) <= 1e-6 * max(1, abs(ref[i, targets[i]].item()))
        assert [t for t, _ in entry.top] == (ref[i].topk(ks[i]).indices.tolist() if ks[i] else [])
        assert all(abs(v - ref[i, t].item()) <= 1e-5 for t, v in entry.top)


def test_penalties_and_logit_bias_choose_as_openai_defines_them(model_dir, fused_adapter):
    """Greedy with presence / frequency penalties and a logit bias, beside a plain request: each
    token is the argmax of transformers + PEFT's logits (float64) less the penalties over the
    tokens generated before it, plus the bias; a bias of 100 forces its token; log-probabilities
    stay the raw logits'."""
    math_dir, peft_math, _ = fused_adapter("qwen3_moe")
    settings = [dict(presence_penalty=1.5, frequency_penalty=0.7), dict(frequency_penalty=-0.3, logit_bias={9: 0.4, 30: -0.2}),
                dict(logit_bias={7: 100.0}), dict()]
    prompts = [ids(6, 90 + i) for i in range(len(settings))]
    sampling = [SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0, **kw) for kw in settings]
    with Engine(EngineConfig(model_dir("qwen3_moe"), method="fp32", adapters={"math": math_dir}, max_num_seqs=4, max_model_len=48)) as e:
        outs = e.generate(prompts, "math", sampling)
    assert list(outs[2].token_ids) == [7] * 8
    for out, prompt, s in zip(outs, prompts, sampling):
        x = torch.tensor([prompt + list(out.token_ids)])
        with torch.no_grad():
            raw = peft_math(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, len(prompt) - 1 : -1].double()
        for j, token in enumerate(out.token_ids):
            counts = torch.bincount(torch.tensor(out.token_ids[:j], dtype=torch.long), minlength=raw.shape[1]).double()
            want = raw[j] - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).double()
            for t, b in s.logit_bias:
                want[t] += b
            top2 = want.topk(2).values
            if top2[0] - top2[1] > 1e-4:  # not a near-tie
                assert token == int(want.argmax()), (s, j)
            assert abs(out.logprobs[j].logprob - raw[j].log_softmax(-1)[token].item()) <= 1e-5 * max(1.0, abs(out.logprobs[j].logprob))
    assert len(set(outs[0].token_ids)) == 8  # the presence penalty outweighs the tiny model's logit spread: no repeats
    for bad, needle in (({"logit_bias": {5: 101}}, "logit_bias: token 5's bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
                        ({"logit_bias": [1, 2]}, "logit_bias: expected a dict"), ({"presence_penalty": 2.5}, "presence_penalty"),
                        ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"logit_bias": {i: 1 for i in range(301)}}, "at most 300")):
        with pytest.raises(ValueError, match=needle):
            SamplingParams(**bad)

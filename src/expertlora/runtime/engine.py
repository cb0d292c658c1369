"""The serving engine: many requests, each with its own adapter, continuously batched.

    engine = Engine(EngineConfig("path/to/model", adapters={"math": "path/to/adapter"}))
    handle = engine.add_request("2 + 2 =", adapter="math", sampling=SamplingParams(max_tokens=8))
    for out in handle:                  # outputs as tokens arrive; async: `async for out in handle.stream()`
        print(out.new_text, end="")
    outs = engine.generate(["a", "b"], adapters=[None, "math"])   # blocking, like vLLM's LLM.generate
    engine.close()

One thread (the engine's) owns the model, the scheduler, the cache and the requests; the public
methods may be called from any thread: they check their input at once, then hand the change to
the engine thread, which applies it between steps.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora import ExpertLoRA
from .adapters import AdapterManager
from .batch import build_batch
from .config import (
    CPU_KV_CACHE_CAP,
    CPU_KV_CACHE_FRACTION,
    DEFAULT_MAX_MODEL_LEN,
    GPU_KV_CACHE_FRACTION,
    EngineConfig,
)
from .detokenize import IncrementalText
from .errors import EngineClosed, QueueFull, RequestError
from .kv_cache import KVCache
from .request import Request, RequestHandle, RequestOutput, SamplingParams, TokenLogprob
from .runner import ModelRunner
from .sampler import logprob_entries, new_generator, sample, token_logprobs
from .scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_TEMPLATE_KWARGS = 32
# apply_chat_template's own arguments: a template variable may not replace them
TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                                "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                                "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def check_template_kwargs(kwargs: dict) -> None:
    """Chat template variables: a few, named as identifiers, with plain values."""
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise RequestError(f"chat_template_kwargs: expected at most {MAX_TEMPLATE_KWARGS}, found {len(kwargs)}", param="chat_template_kwargs")
    for key, value in kwargs.items():
        if not (isinstance(key, str) and key.isidentifier() and len(key) <= 64) or key in TEMPLATE_ARGUMENTS:
            raise RequestError(f"chat_template_kwargs: {str(key)[:64]!r} is not a template variable name", param="chat_template_kwargs")
        if not (value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 1024)):
            raise RequestError(f"chat_template_kwargs: {key}: expected a boolean, number, string of at most 1024 characters or null",
                               param="chat_template_kwargs")
Prompt = str | Sequence[int] | Sequence[dict]
MAX_CHAT_MESSAGES = 1024


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health checks."""

    running: int
    waiting: int
    kv_slots_used: int
    kv_slots: int
    kv_cache_bytes: int
    adapters: tuple[str, ...]
    steps: int


class Engine:
    """Requests in, tokens out; see the module docstring."""

    def __init__(self, config: EngineConfig, progress: Callable | None = None):
        """Load the model and start stepping; raises what loading raises (bad config, files)."""
        self.config = config
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(progress, ready), name="expertlora-engine", daemon=True)
        self._thread.start()
        ready.result()

    def _run(self, progress: Callable | None, ready: Future) -> None:
        """The engine thread: it loads the model, then steps it. One thread does both because each
        thread that runs parallel CPU work gets an OpenMP thread pool of its own, and a parallel
        region entered from a second such thread waited for its pool's threads to wake: with the
        model loaded on another thread, a decode attention call took 143 us here against 18 us on
        the dev box, and the engine's steps were 5x slower (BENCHMARKS.md, OpenMP thread pools)."""
        try:
            self._setup(progress)
        except BaseException as e:  # noqa: BLE001 - handed to the constructor's caller
            ready.set_exception(e)
            return
        ready.set_result(None)
        self._loop()

    def _setup(self, progress: Callable | None) -> None:
        config = self.config
        self.lm, self.tokenizer = _load(config, progress)
        self.lm.engine.adapters_changed()  # the start-up adapters' device forms, before the first step
        model_config = self.lm.model.config
        self.vocab_size = int(model_config.vocab_size)
        context = getattr(model_config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len {config.max_model_len}: the model's context is {context} (max_position_embeddings)")
        self.max_model_len = config.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
        if getattr(model_config, "use_sliding_window", False) or (getattr(model_config, "sliding_window", None) or self.max_model_len) < self.max_model_len:
            raise ValueError(f"{config.model}: sliding-window attention is not supported by the engine")
        eos = self.lm.model.generation_config.eos_token_id
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.runner = ModelRunner(self.lm, graphs=config.cuda_graphs)
        self.cache = self._allocate_cache()
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_prefill_tokens)
        self.adapters = AdapterManager(self.lm, config.max_loaded_adapters)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _commands, _queued, _closed and the adapters' use counts
        self._wake = threading.Condition(self._lock)
        self._commands: deque[Callable[[], None]] = deque()
        self._queued = 0  # requests added and not yet running
        self._closed = False
        self._steps = 0
        self._requests: dict[str, Request] = {}  # engine thread

    # -- requests --------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a prompt (token ids, text, or chat messages) for ``adapter`` (None: the base).
        Raises RequestError for a prompt or setting this model cannot run, UnknownAdapter,
        QueueFull, EngineClosed."""
        sampling = sampling or SamplingParams()
        ids = self.prompt_ids(prompt)
        if len(ids) + sampling.max_tokens > self.max_model_len:
            raise RequestError(
                f"{len(ids)} prompt tokens + max_tokens {sampling.max_tokens} exceed the context of {self.max_model_len} tokens",
                param="max_tokens",
            )
        bad = next((t for t, _ in sampling.logit_bias if t >= self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"logit_bias: token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="logit_bias")
        request_id = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(request_id, adapter, tuple(ids), self)
        request = Request(request_id, ids, adapter, sampling, handle, frozenset() if sampling.ignore_eos else self.eos_ids,
                          generator=new_generator(sampling), detokenizer=IncrementalText(self.tokenizer),
                          output_logprobs=None if sampling.logprobs is None else [],
                          prompt_logprobs=None if sampling.prompt_logprobs is None else [None])  # nothing predicts the first
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            if self._queued >= self.config.max_queued_requests:
                raise QueueFull(f"{self._queued} requests are waiting (max_queued_requests {self.config.max_queued_requests})")
            self.adapters.check_loaded(adapter)
            self.adapters.acquire(adapter)  # under the lock: the adapter cannot be unloaded from under it
            self._queued += 1
            self._commands.append(lambda: self._admit(request))
            self._wake.notify()
        return handle

    def abort(self, handle: RequestHandle | str) -> None:
        """Stop a request; its handle gets a final output with finish reason ``abort``."""
        request_id = handle if isinstance(handle, str) else handle.request_id
        self._submit(lambda: self._abort(request_id))

    def generate(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[str | None] | str | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt (all at once, continuously batched) and return their final outputs
        in order. ``adapters``: one name for all, or one per prompt."""
        n = len(prompts)
        names = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * n
        settings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
        if len(names) != n or len(settings) != n:
            raise ValueError(f"generate: {n} prompts but {len(names)} adapters and {len(settings)} sampling settings")
        handles = [self.add_request(p, a, s) for p, a, s in zip(prompts, names, settings)]
        return [h.result() for h in handles]

    def prompt_ids(self, prompt: Prompt, chat_template_kwargs: Mapping[str, object] | None = None) -> list[int]:
        """The token ids of a prompt, checked against the vocabulary and the context.
        ``chat_template_kwargs``: variables for the chat template (Qwen3's ``enable_thinking``)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.config.model}: the checkpoint has no tokenizer; give the prompt as token ids", param="prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self._chat_ids(prompt, dict(chat_template_kwargs or {}))
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise RequestError("prompt: expected text, a list of token ids or a list of chat messages", param="prompt")
        if not ids:
            raise RequestError("prompt: expected at least one token", param="prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt: {len(ids)} tokens, the context holds {self.max_model_len}", param="prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt: token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="prompt")
        return ids

    def _chat_ids(self, messages: Sequence[dict], template_kwargs: dict) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"{self.config.model}: the checkpoint's tokenizer has no chat template; send a plain prompt", param="messages")
        if len(messages) > MAX_CHAT_MESSAGES:
            raise RequestError(f"messages: at most {MAX_CHAT_MESSAGES}", param="messages")
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError("messages: each message needs a string role and string content", param="messages")
        check_template_kwargs(template_kwargs)
        try:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, **template_kwargs)
        except Exception as e:  # the template is the checkpoint's own code (Jinja): report it, one line
            raise RequestError(f"messages: the chat template failed: {type(e).__name__}: {e}".splitlines()[0], param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    # -- adapters --------------------------------------------------------------------------------

    def load_adapter(self, name: str, source: str | Path | ExpertLoRA) -> None:
        """Read and check ``source`` off the step loop, then install it between two steps.
        Returns when requests can use it. A failure changes nothing."""
        adapter, prepared = _on_a_thread_of_its_own(self.adapters.read, name, source)

        def install():
            self.adapters.install(name, adapter, prepared)
            self.runner.adapters_changed()

        self._submit(install, wait=True)

    def unload_adapter(self, name: str) -> None:
        """Unload an idle adapter; AdapterBusy while requests use it, UnknownAdapter if absent."""

        def remove():
            self.adapters.remove(name)
            self.runner.adapters_changed()

        self._submit(remove, wait=True)

    @property
    def adapter_names(self) -> list[str]:
        return self.adapters.names

    # -- state -----------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running), waiting=self._queued, kv_slots_used=self.cache.used_slots,
            kv_slots=self.cache.num_slots, kv_cache_bytes=self.cache.nbytes, adapters=tuple(self.adapters.names),
            steps=self._steps,
        )

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, let running ones finish for up to ``timeout`` seconds, abort the
        rest, and stop the engine thread."""
        with self._lock:
            self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive() and self._busy() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        with self._lock:
            self._commands += [self._abort_all, _stop]
            self._wake.notify()
        self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine thread -----------------------------------------------------------------------

    def _submit(self, fn: Callable[[], object], wait: bool = False):
        future: Future = Future()

        def command():
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)

        with self._lock:
            if self._closed and wait:
                raise EngineClosed("the engine is shutting down")
            self._commands.append(command)
            self._wake.notify()
        return future.result() if wait else None

    def _busy(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._commands)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._commands and not self.scheduler.running and not self.scheduler.waiting:
                    self._wake.wait()
                commands = list(self._commands)
                self._commands.clear()
            try:
                for command in commands:
                    command()
            except _Stop:
                return
            try:
                self._step()
            except Exception as e:  # a failed step ends the requests in it, not the engine
                log.exception("engine step failed; its requests are aborted")
                message = f"{type(e).__name__}: {e}".splitlines()[0]
                for r in list(self.scheduler.running):
                    self._finish(r, "abort", error=message)

    def _step(self) -> None:
        schedule = self.scheduler.schedule()
        if not schedule:
            return
        with self._lock:
            self._queued -= sum(1 for r, _ in schedule.prefills if r.num_computed == 0)
        batch = build_batch(schedule.decodes, schedule.prefills, self.adapters.slot, self.cache, self.runner.device)
        logits = self.runner.run(batch)
        for r in schedule.decodes:
            r.num_computed += 1
        for r, n in schedule.prefills:
            r.num_computed += n
        self._steps += 1
        now = time.monotonic()
        if batch.scored:
            self._score_prompts(batch, logits[len(batch.sampled):])
            logits = logits[: len(batch.sampled)]
        tokens = sample(logits, batch.sampled)
        for r, token, logprob in zip(batch.sampled, tokens, token_logprobs(logits, batch.sampled, tokens)):
            self._append(r, token, logprob, now)

    @staticmethod
    def _score_prompts(batch, logits: torch.Tensor) -> None:
        """The prompt tokens' log-probabilities of this step's chunks, for the requests that ask."""
        targets, ks = [], []
        for r, p, count in batch.scored:
            targets += r.prompt_ids[p + 1 : p + 1 + count]
            ks += [r.sampling.prompt_logprobs] * count
        entries = iter(logprob_entries(logits, targets, ks))
        for r, _, count in batch.scored:
            r.prompt_logprobs += [next(entries) for _ in range(count)]

    def _admit(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    def _append(self, r: Request, token: int, logprob: TokenLogprob | None, now: float) -> None:
        r.output_ids.append(token)
        if logprob is not None:
            r.output_logprobs.append(logprob)
        r.first_token_time = r.first_token_time or now
        s = r.sampling
        reason = None
        if token in r.eos_ids or token in s.stop_token_ids:
            reason = "stop"
        elif len(r.output_ids) >= s.max_tokens:
            reason = "length"
        text = r.detokenizer.update(r.output_ids, final=reason is not None)  # an incomplete character held back
        if s.stop:
            # search only where a stop string could end in the new text
            look_from = max(0, len(r.text) - max(map(len, s.stop)) + 1)
            hits = [i for i in (text.find(stop, look_from) for stop in s.stop) if i >= 0]
            if hits:
                text, reason = text[: min(hits)], "stop"
        new_text, r.text = text[len(r.text) :], text
        if reason is not None:
            self._finish(r, reason, new_ids=(token,), new_text=new_text)
        else:
            r.handle._push(self._output(r, (token,), new_text, None, None))

    def _output(self, r: Request, new_ids, new_text: str, reason: str | None, error: str | None) -> RequestOutput:
        logprobs = None if r.output_logprobs is None else tuple(r.output_logprobs)
        prompt_logprobs = None
        if r.prompt_logprobs is not None and not r.prefilling:  # complete once the prompt is in
            if not isinstance(r.prompt_logprobs, tuple):
                r.prompt_logprobs = tuple(r.prompt_logprobs)  # once: later outputs share it
            prompt_logprobs = r.prompt_logprobs
        return RequestOutput(
            request_id=r.request_id, adapter=r.adapter, prompt_token_ids=tuple(r.prompt_ids), token_ids=tuple(r.output_ids),
            new_token_ids=tuple(new_ids), text=r.text, new_text=new_text, finished=reason is not None, finish_reason=reason,
            arrival_time=r.arrival_time, first_token_time=r.first_token_time,
            finished_time=time.monotonic() if reason is not None else None, error=error,
            logprobs=logprobs, new_logprobs=logprobs[len(r.output_ids) - len(new_ids):] if logprobs is not None else (),
            prompt_logprobs=prompt_logprobs,
        )

    def _finish(self, r: Request, reason: str, new_ids=(), new_text: str = "", error: str | None = None) -> None:
        if r.finish_reason is not None:
            return
        was_waiting = r.cache_slot is None and r.num_computed == 0
        self.scheduler.finish(r)
        self._requests.pop(r.request_id, None)
        r.finish_reason = reason
        with self._lock:
            self.adapters.release(r.adapter)
            if was_waiting:
                self._queued -= 1
        r.handle._push(self._output(r, new_ids, new_text, reason, error))

    def _abort(self, request_id: str) -> None:
        r = self._requests.get(request_id)
        if r is not None:
            self._finish(r, "abort")

    def _abort_all(self) -> None:
        for r in list(self._requests.values()):
            self._finish(r, "abort")

    # -- set-up ----------------------------------------------------------------------------------

    def _allocate_cache(self) -> KVCache:
        shapes = self.runner.layer_shapes()
        dtype = self.lm.model.dtype
        per_slot = KVCache.bytes_per_slot(shapes, self.max_model_len, dtype)
        budget = self.config.kv_cache_memory or _default_kv_budget(self.runner.device)
        pad = self.runner.graphs
        slots = slots_in_budget(budget, per_slot, self.config.max_num_seqs, pad)
        if slots < 1:
            raise ValueError(
                f"the KV cache budget of {budget} bytes holds no sequence of max_model_len {self.max_model_len} "
                f"({per_slot} bytes each): lower --max-model-len or raise --kv-cache-memory"
            )
        return KVCache(shapes, slots, self.max_model_len, dtype, self.runner.device, pad_slot=pad)


def slots_in_budget(budget: int, per_slot: int, max_num_seqs: int, pad: bool) -> int:
    """Sequence regions of ``per_slot`` bytes that fit in ``budget`` beside the graphs' pad region
    (``pad``), at most ``max_num_seqs``."""
    return min(max_num_seqs, budget // per_slot - pad)


def _on_a_thread_of_its_own(fn, *args):
    """``fn(*args)`` on a new thread that ends with it. Its parallel CPU work gets an OpenMP pool
    that goes with the thread; on a thread that lives on (a server's worker) the pool would stay,
    and with more pooled threads than cores libgomp stops spinning between parallel regions, so
    each of the engine's waits for its threads to wake: on the dev box the steps were 3.4x slower
    after one parallel op on a living thread (BENCHMARKS.md, OpenMP thread pools)."""
    with ThreadPoolExecutor(1, thread_name_prefix="expertlora-adapter-read") as pool:
        return pool.submit(fn, *args).result()


class _Stop(BaseException):
    """Raised by the last command the engine thread runs."""


def _stop():
    raise _Stop


def _default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_CACHE_FRACTION)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 << 30
    return int(min(CPU_KV_CACHE_CAP, available * CPU_KV_CACHE_FRACTION))


def _load(config: EngineConfig, progress: Callable | None):
    """The model on our experts, with the adapters of ``config``, and its tokenizer (or None)."""
    from ..formats import load_adapter
    from ..model_config import MoEConfig
    from ..quantize import resolve_method
    from ..run import gpu_masks_for, load_placed, load_tokenizer
    from .adapters import check_name

    base = MoEConfig.from_model_dir(config.model)
    masks = gpu_masks_for(base, config.device, config.gpu_experts, config.gpu_experts_ratio, config.placement)
    adapters = {check_name(name): load_adapter(path, base) for name, path in config.adapters}
    lm = load_placed(config.model, resolve_method(config.method), config.dtype, adapters, masks, threads=config.threads,
                     group_size=config.group_size, backend=config.backend, device=config.device,
                     kt_weight_path=config.kt_weight_path, gpu_prefill_threshold=config.gpu_prefill_threshold,
                     progress=progress)
    return lm, load_tokenizer(config.model)

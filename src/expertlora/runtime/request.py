"""A request's settings, its state inside the engine, and the handle its caller reads tokens from.

The engine thread appends each step's new tokens to the request and pushes a RequestOutput to
its handle; the caller iterates the handle (blocking) or its ``stream()`` (asyncio).
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from .config import check_int
from .detokenize import IncrementalText

FINISH_REASONS = ("stop", "length", "abort")
# Bounds on what a request may ask for: every loop and buffer a request sizes stays bounded.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default max_logprobs, OpenAI's chat limit)
MAX_LOGIT_BIAS = 300  # biased tokens per request


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits, before temperature,
    top-k or top-p), and the ``logprobs`` likeliest tokens with theirs, likeliest first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; greedy unless temperature > 0.

    ``seed`` seeds this request's own generator (never the global one): the same seed gives the
    same tokens whatever else runs. ``stop``: strings that end the output (not included in its
    text); ``stop_token_ids``: tokens that end it (included in ``token_ids``, as EOS is).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # OpenAI's: each token's logit less presence_penalty if it was generated already, less
    # frequency_penalty per time it was, plus its logit_bias ((token id, bias) pairs)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest tokens'
    prompt_logprobs: int | None = None  # the same for each prompt token after the first

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        try:
            object.__setattr__(self, "logit_bias", tuple(dict(self.logit_bias).items()))
        except (TypeError, ValueError):
            raise ValueError("logit_bias: expected a dict (or pairs) of token id -> bias") from None
        check_int("max_tokens", self.max_tokens, 1)
        check_int("top_k", self.top_k, 0)
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**63 - 1)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0, MAX_LOGPROBS)
        for name, value, low, high, low_open in (("temperature", self.temperature, 0.0, 100.0, False), ("top_p", self.top_p, 0.0, 1.0, True),
                                                 ("presence_penalty", self.presence_penalty, -2.0, 2.0, False),
                                                 ("frequency_penalty", self.frequency_penalty, -2.0, 2.0, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, found {value!r}")
            if value > high or value < low or (low_open and value == low):
                raise ValueError(f"{name}: expected {'>' if low_open else '>='} {low} and <= {high}, found {value!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop: expected at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: expected at most {MAX_STOP_TOKEN_IDS} ids, found {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            check_int("stop_token_ids", t, 0)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: expected at most {MAX_LOGIT_BIAS} tokens, found {len(self.logit_bias)}")
        for t, bias in self.logit_bias:
            check_int("logit_bias", t, 0)
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: token {t}'s bias: expected a number from -100 to 100, found {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class RequestOutput:
    """What a request has produced so far; the last one a handle gives has ``finished`` set.

    ``new_token_ids`` / ``new_text``: what this output adds to the previous one.
    ``text`` is empty where the checkpoint has no tokenizer.
    """

    request_id: str
    adapter: str | None
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    new_token_ids: tuple[int, ...]
    text: str
    new_text: str
    finished: bool
    finish_reason: str | None  # one of FINISH_REASONS once finished
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    error: str | None = None  # why an aborted request ended, where it was not asked for
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of token_ids, where the request asked
    new_logprobs: tuple[TokenLogprob, ...] = ()  # those of new_token_ids
    # one per prompt token, where the request asked: None for the first (nothing predicts it)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """The caller's end of a request: iterate it for outputs as they come (blocking), or
    ``async for`` over ``stream()``; ``result()`` waits for the final output."""

    def __init__(self, request_id: str, adapter: str | None, prompt_token_ids: tuple[int, ...], engine):
        self.request_id, self.adapter, self.prompt_token_ids = request_id, adapter, prompt_token_ids
        self._engine = engine
        self._outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._final: RequestOutput | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._async: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._callbacks: list = []

    # -- engine side ---------------------------------------------------------------------------

    def _push(self, out: RequestOutput) -> None:
        callbacks = []
        with self._lock:
            if self._async:  # an asyncio consumer reads this handle
                for loop, q in self._async:
                    loop.call_soon_threadsafe(q.put_nowait, out)
            else:
                self._outputs.put(out)
            if out.finished:
                self._final = out
                self._done.set()
                callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(out)

    # -- caller side ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[RequestOutput]:
        """Each output as it comes, the final one last."""
        while True:
            out = self._outputs.get()
            yield out
            if out.finished:
                return

    async def stream(self) -> AsyncIterator[RequestOutput]:
        """Each output as it comes (asyncio), the final one last. Cancelling the consumer does
        not abort the request: call ``abort()`` for that (the server does on disconnect)."""
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:  # outputs pushed before now are moved over; later ones come through the loop
            for out in self._drain():
                q.put_nowait(out)
            self._async.append((asyncio.get_running_loop(), q))
        try:
            while True:
                out = await q.get()
                yield out
                if out.finished:
                    return
        finally:
            with self._lock:
                self._async = [(lp, qq) for lp, qq in self._async if qq is not q]

    def _drain(self) -> list[RequestOutput]:
        items = []
        while True:
            try:
                items.append(self._outputs.get_nowait())
            except queue.Empty:
                return items

    def add_done_callback(self, fn) -> None:
        """Call ``fn(final_output)`` when the request finishes (at once if it has; on the engine
        thread otherwise: keep it short)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self._final)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """The final output (blocks until the request finishes)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._final

    def abort(self) -> None:
        self._engine.abort(self)


@dataclass
class Request:
    """A request's state inside the engine (owned by the engine thread)."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingParams
    handle: RequestHandle
    eos_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    cache_slot: int | None = None
    generator: torch.Generator | None = None
    detokenizer: IncrementalText | None = None
    text: str = ""
    first_token_time: float | None = None
    finish_reason: str | None = None
    output_logprobs: list[TokenLogprob] | None = None  # where sampling.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | tuple | None = None  # where asked: filled chunk by chunk, a tuple once complete

    @property
    def last_id(self) -> int:
        """The newest token: the next step's input once the prompt is in."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

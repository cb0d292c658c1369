"""Engine outputs as OpenAI response bodies: whole (``text_completion`` / ``chat.completion``)
or as server-sent event chunks, ending with ``data: [DONE]``.

``return_token_ids`` adds ``prompt_token_ids`` (the first chunk, or the whole answer) and the
generated ``token_ids`` (each chunk's new ones) to each choice: the only content a checkpoint
without a tokenizer can give.

Log-probabilities, where asked, in each API's own form: completions' ``tokens`` /
``token_logprobs`` / ``top_logprobs`` (the chosen token among them, as vLLM gives it) /
``text_offset`` (where each token's own text starts, counting from the completion's start), and
chat's ``content`` list of ``{token, logprob, bytes, top_logprobs}``. A token is named by its own
decoded text (``token_text``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..runtime import RequestOutput, TokenLogprob
from .errors import error_body

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(outs: list[RequestOutput]) -> dict:
    """One prompt, its n completions: the prompt counted once, as OpenAI counts it."""
    prompt, completion = outs[0].prompt_tokens, sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def whole(answers: list[Answer], outs: list[RequestOutput]) -> dict:
    """The non-streaming body of a finished request: one choice per answer."""
    return answers[0].head(False) | {"choices": [a.choice(out) for a, out in zip(answers, outs)], "usage": usage(outs)}


def usage_event(answers: list[Answer], outs: list[RequestOutput]) -> str:
    """The last event of a stream with ``include_usage``, once every choice has finished."""
    return sse(answers[0].head(True) | {"choices": [], "usage": usage(outs)})


@dataclass
class Answer:
    """One choice of an answer (``index``; several with ``n``): its id, the ``model`` it named,
    its kind, options, and what it has streamed so far."""

    request_id: str
    model: str
    chat: bool
    token_ids: bool
    include_usage: bool = False
    token_text: Callable[[int], str] = str
    echo: str | None = None  # completions' echo: the prompt's text
    index: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    _started: bool = False
    _text_offset: int = 0  # where the next token's text starts (completions' text_offset)

    def head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, out: RequestOutput) -> dict:
        """This choice of a finished request, whole."""
        choice = {"index": self.index}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice |= {"text": self._echoed(True) + out.text}
        choice |= {"logprobs": self._logprobs(out, out.logprobs, True), "finish_reason": out.finish_reason}
        if self.token_ids:
            choice |= {"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(out.token_ids)}
        return choice

    def _echoed(self, first: bool) -> str:
        return self.echo if self.echo is not None and first else ""

    def _logprobs(self, out: RequestOutput, entries: tuple[TokenLogprob, ...] | None, first: bool) -> dict | None:
        if entries is None:
            return None
        text = self.token_text
        if self.echo is not None and first and out.prompt_logprobs is not None:  # the prompt's tokens first
            return self._completion_logprobs(list(zip(out.prompt_token_ids, out.prompt_logprobs)) + [(e.token_id, e) for e in entries])
        if self.chat:
            def named(token_id: int, logprob: float) -> dict:
                token = text(token_id)
                return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

            return {"content": [named(e.token_id, e.logprob) | {"top_logprobs": [named(t, lp) for t, lp in e.top]} for e in entries],
                    "refusal": None}
        return self._completion_logprobs([(e.token_id, e) for e in entries])

    def _completion_logprobs(self, entries: list[tuple[int, TokenLogprob | None]]) -> dict:
        """Completions' form; an echoed prompt's first token has no log-probability (null)."""
        text = self.token_text
        tokens = [text(t) for t, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob if e else None for _, e in entries],
                "top_logprobs": [{text(t): lp for t, lp in e.top} | {token: e.logprob} if e else None for token, (_, e) in zip(tokens, entries)],
                "text_offset": offsets}

    def chunks(self, out: RequestOutput) -> Iterator[str]:
        """The SSE events for one output of this choice (none for one that adds nothing a client
        would see); the usage event is the caller's (``usage_event``), after every choice."""
        if out.error is not None:  # the engine failed this request: say why, then end the stream
            yield sse(error_body(500, f"the request failed: {out.error}", None, "internal_error"))
            return
        first = not self._started
        if not (first or out.new_text or out.finished or out.new_logprobs or (self.token_ids and out.new_token_ids)):
            return
        self._started = True
        if self.chat:
            delta = {"role": "assistant", "content": out.new_text} if first else {"content": out.new_text}
            choice = {"index": self.index, "delta": delta}
        else:
            choice = {"index": self.index, "text": self._echoed(first) + out.new_text}
        new = out.new_logprobs if out.logprobs is not None else None
        choice |= {"logprobs": self._logprobs(out, new, first), "finish_reason": out.finish_reason}
        if self.token_ids:
            if first:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
            choice["token_ids"] = list(out.new_token_ids)
        body = self.head(True) | {"choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        yield sse(body)

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


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


@dataclass
class Answer:
    """What one request's answer looks like: its id, the ``model`` it named, its kind, options."""

    request_id: str
    model: str
    chat: bool
    token_ids: bool
    include_usage: bool = False
    token_text: Callable[[int], str] = str
    echo: Callable[[RequestOutput], str] | None = None  # completions' echo: the prompt's text
    created: int = field(default_factory=lambda: int(time.time()))
    _started: bool = False
    _text_offset: int = 0  # where the next token's text starts (completions' text_offset)

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, out: RequestOutput) -> dict:
        """The non-streaming body of a finished request."""
        choice = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice |= {"text": self._echoed(out, True) + out.text}
        choice |= {"logprobs": self._logprobs(out, out.logprobs, True), "finish_reason": out.finish_reason}
        if self.token_ids:
            choice |= {"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(out.token_ids)}
        return self._head(False) | {"choices": [choice], "usage": usage(out)}

    def _echoed(self, out: RequestOutput, first: bool) -> str:
        return self.echo(out) if self.echo is not None and first else ""

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
        """The SSE events for one output (none for one that adds nothing a client would see)."""
        if out.error is not None:  # the engine failed this request: say why, then end the stream
            yield sse(error_body(500, f"the request failed: {out.error}", None, "internal_error"))
            return
        first = not self._started
        if not (first or out.new_text or out.finished or out.new_logprobs or (self.token_ids and out.new_token_ids)):
            return
        self._started = True
        if self.chat:
            delta = {"role": "assistant", "content": out.new_text} if first else {"content": out.new_text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": self._echoed(out, first) + out.new_text}
        new = out.new_logprobs if out.logprobs is not None else None
        choice |= {"logprobs": self._logprobs(out, new, first), "finish_reason": out.finish_reason}
        if self.token_ids:
            if first:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
            choice["token_ids"] = list(out.new_token_ids)
        body = self._head(True) | {"choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        yield sse(body)
        if out.finished and self.include_usage:
            yield sse(self._head(True) | {"choices": [], "usage": usage(out)})

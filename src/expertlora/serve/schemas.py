"""OpenAI request bodies (pydantic), checked strictly: an unknown field or a setting this server
does not implement is refused (400) rather than ignored, so a client never gets silently
different sampling than it asked for. Every list a request holds has a bound.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from ..runtime.engine import MAX_CHAT_MESSAGES, MAX_TEMPLATE_KWARGS
from ..runtime.request import MAX_LOGIT_BIAS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from .errors import APIError

MAX_MODEL_CHARS = 512
MAX_PROMPT_IDS = 1 << 20  # the engine then checks them against its context
MAX_CONTENT_PARTS = 1024
MAX_PATH_CHARS = 4096
MAX_CHOICES = 16  # n: completions of one prompt (each a request of its own in the engine)


class _Body(BaseModel):
    # strict: a number is a JSON number (an integer is a float too), never a string; a bool is not an int
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Generation(_Body):
    """The fields completions and chat share."""

    model: Annotated[StrictStr, Field(min_length=1, max_length=MAX_MODEL_CHARS)]
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None  # -1 or 0: off (vLLM's -1 accepted)
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: StrictInt | None = None
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Annotated[StrictStr, Field(max_length=256)] | None = None  # an end-user id: accepted, unused
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: Annotated[dict[StrictStr, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None  # token id (a string) -> bias
    # OpenAI settings this server does not implement: accepted only at their neutral value.
    NEUTRAL: ClassVar[dict[str, tuple]] = {}

    def check_supported(self) -> None:
        """Refuse (400, naming the field) what would change the output but is not implemented."""
        if self.n is not None and not 1 <= self.n <= MAX_CHOICES:
            raise APIError(400, f"n: expected 1 to {MAX_CHOICES} choices, found {self.n}", "n", "invalid_value")
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if not any(value == v and type(value) is type(v) for v in neutral):
                raise APIError(400, f"{name}: not supported by this server (found {value!r})", name, "unsupported")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only with stream = true", "stream_options", "invalid_value")

    def sampling(self, default_max_tokens: int, choice: int = 0) -> SamplingParams:
        """The engine's SamplingParams for choice ``choice`` of ``n``; OpenAI's defaults
        (temperature 1, top_p 1) where unset. With a seed, choice i draws from seed + i (as vLLM)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        max_tokens = self.requested_max_tokens()
        try:
            return SamplingParams(
                max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k in (None, -1) else self.top_k,
                seed=None if self.seed is None else self.seed + choice, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                logprobs=self.requested_logprobs(), prompt_logprobs=self.requested_prompt_logprobs(),
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                logit_bias=self.token_biases(),
            )
        except ValueError as e:  # SamplingParams names the field first: "top_p: expected ..."
            message, field = str(e), str(e).split(":", 1)[0]
            if field == "max_tokens" and self.max_tokens is None:  # the value came as a chat request's max_completion_tokens
                message, field = "max_completion_tokens" + message.removeprefix("max_tokens"), "max_completion_tokens"
            if field == "logprobs" and self.LOGPROBS_FIELD != "logprobs":  # chat's count is top_logprobs
                message, field = self.LOGPROBS_FIELD + message.removeprefix("logprobs"), self.LOGPROBS_FIELD
            raise APIError(400, message, field, "invalid_value") from None

    LOGPROBS_FIELD: ClassVar[str] = "logprobs"  # the field that carries the number of alternatives

    def token_biases(self) -> dict[int, float]:
        """logit_bias with its keys as token ids (OpenAI sends them as strings)."""
        biases = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise APIError(400, f"logit_bias: keys are token ids, found {key[:40]!r}", "logit_bias", "invalid_value")
            biases[int(key)] = bias
        return biases

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Alternatives per token for the engine (None: no log-probabilities)."""
        raise NotImplementedError

    def requested_prompt_logprobs(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    """POST /v1/completions. ``prompt``: text or token ids (one prompt per request)."""

    prompt: Any
    logprobs: StrictInt | None = None  # the likeliest tokens per position, beside the chosen one's
    echo: StrictBool | None = None  # the prompt before the completion (with logprobs: the prompt tokens' too)
    best_of: Any = None
    suffix: Any = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {**_Generation.NEUTRAL, "best_of": (None, 1), "suffix": (None, "")}

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value):
        # a list of one prompt (OpenAI's batch form) is that prompt; several are refused
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) != 1:
                raise ValueError(f"one prompt per request, found {len(value)}; send several requests instead")
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and len(value) <= MAX_PROMPT_IDS and all(type(t) is int for t in value):
            return value
        raise ValueError(f"expected a string or a list of at most {MAX_PROMPT_IDS} token ids")

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class ChatMessage(_Body):
    role: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    content: Any = None  # a string, or a list of text parts {"type": "text", "text": ...}; None: empty
    name: Annotated[StrictStr, Field(max_length=256)] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value):
        if value is None or isinstance(value, str):
            return value or ""
        if not isinstance(value, list) or len(value) > MAX_CONTENT_PARTS:
            raise ValueError(f"expected a string or a list of at most {MAX_CONTENT_PARTS} text parts")
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) and len(part) == 2):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f'only text parts ({{"type": "text", "text": ...}}) are supported, found {kind!r}')
        return "".join(part["text"] for part in value)

    def as_dict(self) -> dict:
        """The message as the chat template reads it (text parts joined)."""
        return {"role": self.role, "content": self.content} | ({"name": self.name} if self.name is not None else {})


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions; ``messages`` go through the checkpoint's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    # the chat template's variables, as vLLM and SGLang take them (Qwen3's enable_thinking); the engine checks them
    chat_template_kwargs: Annotated[dict[StrictStr, Any], Field(max_length=MAX_TEMPLATE_KWARGS)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None  # with logprobs: the likeliest tokens per position
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {**_Generation.NEUTRAL, "response_format": (None, {"type": "text"}),
                "tools": (None, []), "tool_choice": (None, "none")}
    LOGPROBS_FIELD: ClassVar[str] = "top_logprobs"

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs = true", "top_logprobs", "invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise APIError(400, "max_completion_tokens: differs from max_tokens; give one", "max_completion_tokens", "invalid_value")
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class LoadAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's names; SGLang's /load_lora_adapter too)."""

    lora_name: Annotated[StrictStr, Field(min_length=1, max_length=MAX_MODEL_CHARS)]
    lora_path: Annotated[StrictStr, Field(min_length=1, max_length=MAX_PATH_CHARS)]


class UnloadAdapterRequest(_Body):
    """POST /v1/unload_lora_adapter (and /unload_lora_adapter)."""

    lora_name: Annotated[StrictStr, Field(min_length=1, max_length=MAX_MODEL_CHARS)]
    lora_int_id: StrictInt | None = None  # vLLM clients send it; names are what count here

"""What one server holds besides its engine: its name for the base, the threads it hands
blocking engine calls to, the requests it is answering, whether it is draining."""

from __future__ import annotations

import functools
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..runtime import Engine, RequestHandle
from .config import ServeConfig
from .errors import APIError
from .metrics import Metrics


class ServerState:
    """Shared by the routes of one app (``app.state.server``); built by ``create_app``."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.served_name = config.served_model_name or Path(engine.config.model).resolve().name or "model"
        self.metrics = Metrics(engine)
        self.started = time.time()
        # Tokenizing a long prompt or reading an adapter's files blocks: each on a thread of its
        # own, so the event loop keeps streaming. One admission thread keeps the tokenizer to one
        # caller (besides the engine's detokenizer); one adapter thread keeps loads in order.
        self.admission = ThreadPoolExecutor(1, thread_name_prefix="expertlora-admit")
        self.adapter_ops = ThreadPoolExecutor(1, thread_name_prefix="expertlora-adapters")
        self._inflight: weakref.WeakSet[RequestHandle] = weakref.WeakSet()  # answers being written
        self._inflight_lock = threading.Lock()  # the event loop adds, a stopping thread reads
        self.draining = False
        # a token's own text, as log-probabilities name it (decoded on the event loop: cached)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(functools.partial(token_text, engine.tokenizer))

    def prompt_text(self, ids) -> str:
        """A token-id prompt as text (completions' echo), as the engine's output text is decoded."""
        tokenizer = self.engine.tokenizer
        return "" if tokenizer is None else tokenizer.decode(list(ids), skip_special_tokens=True)

    def resolve_model(self, model: str) -> str | None:
        """A request's ``model`` -> its adapter (None: the base). Accepted: the served name, an
        adapter's name, ``served:adapter`` (SGLang's form)."""
        if model == self.served_name:
            return None
        names = self.engine.adapter_names
        if model in names:
            return model
        base, sep, adapter = model.partition(":")
        if sep and base == self.served_name and adapter in names:
            return adapter
        listed = ", ".join([self.served_name, *names])
        raise APIError(404, f"the model {model!r} does not exist; this server has: {listed}", "model", "model_not_found")

    def allowed_adapter_path(self, raw: str) -> Path:
        """The path a runtime load may read, or APIError 403 (the network must not choose files).
        With ``adapter_dirs``: the path, symlinks resolved, lies inside one of them (a relative
        path is taken inside the first). Without: any path, on a loopback-only server alone."""
        if "\x00" in raw:
            raise APIError(400, "lora_path: contains a NUL character", "lora_path", "invalid_value")
        roots = self.config.adapter_dirs
        if not roots:
            if not self.config.loopback_only:
                raise APIError(403, "lora_path: loading adapters at runtime on a server reachable from other machines "
                                    "needs --adapter-dir", "lora_path", "adapter_dir_required")
            return Path(raw)
        path = Path(raw)
        resolved = (path if path.is_absolute() else roots[0] / path).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise APIError(403, f"lora_path: {raw} is outside the adapter folders this server reads from "
                                f"({', '.join(map(str, roots))})", "lora_path", "path_not_allowed")
        return resolved

    def answering(self, handle: RequestHandle) -> None:
        """Note a request whose answer is being written (a stop waits for it, then aborts it)."""
        with self._inflight_lock:
            self._inflight.add(handle)

    def unfinished(self) -> list[RequestHandle]:
        with self._inflight_lock:
            handles = list(self._inflight)
        return [h for h in handles if not h.finished]

    def shutdown_threads(self) -> None:
        self.admission.shutdown(wait=False, cancel_futures=True)
        self.adapter_ops.shutdown(wait=False, cancel_futures=True)


def token_text(tokenizer, token_id: int) -> str:
    """One token's text, special tokens included; ``token_id:N`` (vLLM's form) without a tokenizer."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)

"""What the engine refuses, by kind: the server maps each kind to its HTTP status."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot run as given (HTTP 400): a prompt id outside the vocabulary,
    max tokens beyond the context, a chat prompt for a checkpoint without a chat template."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownAdapter(LookupError):
    """No adapter of this name is loaded (HTTP 404)."""

    def __init__(self, name: str, loaded: list[str]):
        super().__init__(f"no adapter named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'})")
        self.name = name


class AdapterBusy(RuntimeError):
    """An adapter that requests still use cannot be unloaded, and a full set of adapters that are
    all in use cannot take one more (HTTP 409)."""


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queued_requests`` already (HTTP 503, retry later)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or stopped: it takes no new requests (HTTP 503)."""

"""The app factory: one FastAPI app around one Engine.

    app = create_app(engine, ServeConfig(served_model_name="qwen", api_key="..."))

Three plain ASGI layers sit in front of the routes: one counts error answers for /metrics, one
bounds a request body (413 past ``max_body_bytes``, counted as it arrives, whatever
Content-Length claims), one answers 503 to new work while the server drains for shutdown.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import HTTPException

from ..runtime import Engine
from .config import ServeConfig
from .errors import APIError, install_handlers
from .routes import guarded, router
from .state import ServerState

OPEN_PATHS = ("/health", "/metrics")  # answered while draining, without the API key


def create_app(engine: Engine, config: ServeConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` (which the caller owns and closes)."""
    config = config or ServeConfig()
    app = FastAPI(title="expertlora", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state = ServerState(engine, config)
    install_handlers(app, config.retry_after_s)
    app.include_router(router)
    app.include_router(guarded)
    app.add_middleware(_Draining, state=state)  # the last added runs first: count, bound, then drain
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_CountErrors, metrics=state.metrics)
    return app


class _BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send(send, _too_large(self.limit))
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI passes an HTTPException raised while it reads the body on to our handler
                    raise HTTPException(413, _too_large(self.limit).message)
            return message

        await self.app(scope, bounded_receive, send)


class _CountErrors:
    """Every error answer, by status, whichever layer sent it."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.errors.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted if scope["type"] == "http" else send)


class _Draining:
    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.state.draining and scope["path"] not in OPEN_PATHS:
            return await _send(send, APIError(503, "the server is shutting down", None, "shutting_down"))
        await self.app(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", None, "request_too_large")


async def _send(send, error: APIError) -> None:
    response = error.response()
    await response({"type": "http"}, None, send)

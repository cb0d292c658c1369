"""The OpenAI-compatible server (needs the ``serve`` extra: fastapi, uvicorn, pydantic,
prometheus-client): ``Server(engine, ServeConfig(...)).start()``, or ``create_app`` for an
ASGI app to run elsewhere. Every route calls the engine API a Python user calls."""

from .app import create_app
from .config import ServeConfig
from .server import Server

__all__ = ["ServeConfig", "Server", "create_app"]

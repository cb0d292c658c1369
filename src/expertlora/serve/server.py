"""Running the app: uvicorn on a thread of its own, on a socket bound before it starts (so port
0 picks a free port and the URL is known), with a graceful stop.

    server = Server(engine, ServeConfig(port=0)).start()    # returns once it accepts connections
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    ...
    server.stop()      # new requests get 503; running ones finish within shutdown_timeout, the rest are aborted

``run_until_signal()`` is the foreground form the ``serve`` command uses: it stops on SIGINT /
SIGTERM (a second signal aborts what is still running at once). The engine is the caller's:
a stopped server leaves it open.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

from ..runtime import Engine
from .app import create_app
from .config import ServeConfig

_FINISH_ABORTED_S = 5.0  # for aborted requests' last chunks to go out before uvicorn closes connections


def bind(config: ServeConfig) -> socket.socket:
    """A listening socket on the config's host and port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    return socket.create_server((config.host.strip("[]"), config.port), family=family, backlog=2048)


class Server:
    """An OpenAI-compatible HTTP server around one Engine; see the module docstring."""

    def __init__(self, engine: Engine, config: ServeConfig | None = None, log_level: str = "warning",
                 sock: socket.socket | None = None):
        """``sock``: a socket from ``bind(config)`` (the serve command binds before it loads the
        model, so a port in use is reported at once); None: bound by ``start``."""
        self.engine, self.config, self.log_level = engine, config or ServeConfig(), log_level
        self.app = create_app(engine, self.config)
        self.state = self.app.state.server
        self._socket = sock
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        self._force = threading.Event()

    @property
    def url(self) -> str:
        if self._socket is None:
            raise RuntimeError("the server is not started")
        host, port = self._socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self, timeout: float = 30.0) -> Server:
        """Bind, start serving on a background thread, return once connections are accepted."""
        import uvicorn

        if self._thread is not None:
            raise RuntimeError("the server is started already")
        if self._socket is None:
            self._socket = bind(self.config)
        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(_FINISH_ABORTED_S))
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]},
                                        name="expertlora-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._socket.close()
                raise RuntimeError(f"the HTTP server did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop: new requests get 503 at once, running ones get ``timeout`` seconds
        (default: the config's shutdown_timeout) to finish, the rest are aborted (their answers
        end with finish_reason ``abort``), then uvicorn closes the connections."""
        if self._thread is None:
            return
        self.state.draining = True
        deadline = time.monotonic() + (self.config.shutdown_timeout if timeout is None else timeout)
        while self.state.unfinished() and time.monotonic() < deadline and not self._force.is_set():
            time.sleep(0.02)
        for handle in self.state.unfinished():
            handle.abort()
        deadline = time.monotonic() + _FINISH_ABORTED_S
        while self.state.unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._uvicorn.should_exit = True
        self._thread.join(timeout=2 * _FINISH_ABORTED_S)
        self.state.shutdown_threads()
        self._socket.close()
        self._thread = None

    def run_until_signal(self, on_ready=None) -> None:
        """Start, call ``on_ready(url)``, serve until SIGINT or SIGTERM, then stop gracefully
        (a second signal: abort what still runs). Call from the main thread."""
        stop = threading.Event()

        def handle(signum, frame):
            if stop.is_set():
                self._force.set()
            stop.set()

        previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            if on_ready is not None:
                on_ready(self.url)
            while not stop.wait(0.5):
                pass
            self.stop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

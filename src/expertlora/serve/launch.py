"""``expertlora serve``: options -> EngineConfig + ServeConfig -> Engine -> Server, until a signal.

Bad options, adapters or checkpoints are one line and exit code 2, before anything listens; an
operating-system failure (the port in use) is one line and exit code 1. SIGINT / SIGTERM stop
the server gracefully (server.Server.stop) and the process exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path


def serve(
    *,
    model: Path,
    adapters: list[str],
    served_model_name: str | None,
    host: str,
    port: int,
    api_key: str | None,
    adapter_dirs: list[Path],
    lora_rank: int | None,
    lora_alpha: float | None,
    max_body_bytes: int,
    shutdown_timeout: float,
    progress: bool,
    log_level: str = "warning",
    **engine_options,
) -> int:
    """Serve until SIGINT / SIGTERM; returns the exit code. ``engine_options``: EngineConfig's fields."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        engine_config, serve_config = _configs(model, adapters, served_model_name, host, port, api_key, adapter_dirs,
                                               max_body_bytes, shutdown_timeout, engine_options)
        _check_seed_flags(engine_config, lora_rank, lora_alpha)
    except ValueError as e:  # AdapterError included
        return _fail(err, str(e), 2)
    from .server import Server, bind

    try:  # before the model loads: a port in use is said at once
        sock = bind(serve_config)
    except OSError as e:
        return _fail(err, f"{host}:{port}: {e.strerror or e}", 1)
    try:
        engine = _engine(engine_config, progress)
    except ValueError as e:
        sock.close()
        return _fail(err, str(e), 2)
    except OSError as e:
        sock.close()
        return _fail(err, str(e), 1)
    try:
        server = Server(engine, serve_config, log_level=log_level, sock=sock)
        names = ", ".join(engine.adapter_names) or "none"

        def ready(url: str) -> None:
            print(f"expertlora serve: {url} (OpenAI API at {url}/v1; model {server.state.served_name}; adapters: {names})", flush=True)
            err.print("[dim]Ctrl-C or SIGTERM stops it: running requests get "
                      f"{shutdown_timeout:g} s to finish, then are aborted[/dim]", highlight=False)

        server.run_until_signal(on_ready=ready)
    except (OSError, RuntimeError) as e:
        return _fail(err, f"{host}:{port}: {e}", 1)
    finally:
        engine.close(timeout=shutdown_timeout)
    err.print("[dim]expertlora serve: stopped[/dim]")
    return 0


def _configs(model, adapters, served_model_name, host, port, api_key, adapter_dirs, max_body_bytes, shutdown_timeout, engine_options):
    from ..run import parse_adapter_options
    from ..runtime import EngineConfig
    from .config import ServeConfig

    named = parse_adapter_options(adapters)
    serve_config = ServeConfig(served_model_name=served_model_name, host=host, port=port, api_key=api_key or None,
                               adapter_dirs=tuple(adapter_dirs), max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout)
    engine_config = EngineConfig(model, adapters=tuple(named), **engine_options)
    served = serve_config.served_model_name or Path(model).resolve().name
    if served in {n for n, _ in named}:
        raise ValueError(f"--adapter {served}: the name is the base model's served name (--served-model-name)")
    return engine_config, serve_config


def _check_seed_flags(config, rank: int | None, alpha: float | None) -> None:
    """The seed's --kt-moe-lora-rank / -alpha against each adapter's header, before the model loads."""
    if rank is None and alpha is None:
        return
    from ..formats import open_adapter
    from ..model_config import MoEConfig
    from ..run import check_seed_flags

    base = MoEConfig.from_model_dir(config.model)
    for _, path in config.adapters:
        check_seed_flags(path, open_adapter(path, base).info, rank, alpha)


def _engine(config, progress: bool):
    from ..run import loading_bar
    from ..runtime import Engine

    return Engine(config, progress=loading_bar if progress else None)


def _fail(err, message: str, code: int) -> int:
    line = " ".join(str(message).split())
    err.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
    sys.stderr.flush()
    return code

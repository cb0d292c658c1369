"""The server's configuration: where it listens, who may call it, what a request may weigh.

The model and its limits belong to the engine (runtime.EngineConfig); this holds only what the
HTTP layer adds on top.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

from ..runtime.adapters import check_name
from ..runtime.config import check_int

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a request body; prompts are also bounded by the context
MAX_API_KEY_CHARS = 512


@dataclass(frozen=True)
class ServeConfig:
    """How one server around one Engine behaves.

    ``served_model_name``: the ``model`` value that selects the base (None: the model folder's
    name). ``adapter_dirs``: the only folders a runtime load may read from; with none, runtime
    loads are allowed only while the server listens on loopback. ``shutdown_timeout``: seconds
    in-flight requests get to finish on stop before they are aborted.
    """

    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    adapter_dirs: tuple[Path, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    retry_after_s: int = 1  # the Retry-After header of a 503 for a full queue

    def __post_init__(self):
        if self.served_model_name is not None:
            check_name(self.served_model_name)
        if not isinstance(self.host, str) or not self.host or len(self.host) > 255:
            raise ValueError(f"host: expected a host name or address, found {self.host!r}")
        check_int("port", self.port, 0, 65535)
        check_int("max_body_bytes", self.max_body_bytes, 1024, 1 << 32)
        check_int("retry_after_s", self.retry_after_s, 0, 3600)
        if isinstance(self.shutdown_timeout, bool) or not isinstance(self.shutdown_timeout, (int, float)) or not (
            math.isfinite(self.shutdown_timeout) and 0 <= self.shutdown_timeout <= 24 * 3600
        ):
            raise ValueError(f"shutdown_timeout: expected seconds in [0, 86400], found {self.shutdown_timeout!r}")
        if self.api_key is not None and not (0 < len(self.api_key) <= MAX_API_KEY_CHARS and self.api_key.isprintable()):
            raise ValueError(f"api_key: expected 1 to {MAX_API_KEY_CHARS} printable characters")
        dirs = []
        for d in self.adapter_dirs:
            path = Path(d).expanduser()
            if not path.is_dir():
                raise ValueError(f"adapter_dirs: {d}: expected an existing folder")
            dirs.append(path.resolve())
        object.__setattr__(self, "adapter_dirs", tuple(dirs))

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can reach the server (its host is a loopback address)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

"""The adapter manager: which adapters an engine has loaded, which requests use them.

Loading is split in two: ``read`` (any thread, off the step loop: reads the files and checks
them against the model) and ``install`` (the engine thread, between steps: slots, per-token LoRA
modules, GPU copies). Unloading an adapter that requests still use is refused (AdapterBusy);
beyond ``max_loaded`` adapters, the least recently used idle one is evicted.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ..integration import LoadedModel, add_adapter, remove_adapter
from ..lora import ExpertLoRA
from .errors import AdapterBusy, UnknownAdapter

MAX_NAME_CHARS = 128


def check_name(name) -> str:
    """Adapter names appear in URLs, JSON and logs: printable, bounded, not the reserved ``none``."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable() or name.strip() != name:
        raise ValueError(f"adapter name: expected 1 to {MAX_NAME_CHARS} printable characters without surrounding spaces, found {name!r}")
    if name.lower() == "none":
        raise ValueError("adapter name: 'none' is reserved (it selects the base model)")
    return name


class AdapterManager:
    def __init__(self, lm: LoadedModel, max_loaded: int):
        self.lm, self.max_loaded = lm, max_loaded
        self.in_use: Counter[str] = Counter()  # name -> requests holding it (engine thread)
        self._last_used: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return list(self.lm.adapters)

    def read(self, name: str, source: str | Path | ExpertLoRA) -> tuple[ExpertLoRA, object]:
        """Read and check an adapter for this model, and build the engine's forms of it (any
        thread; changes nothing): what ``install`` takes."""
        from ..formats import load_adapter
        from ..validate import check_against_base

        check_name(name)
        adapter = source if isinstance(source, ExpertLoRA) else load_adapter(source, self.lm.checkpoint.config)
        check_against_base(adapter.info, self.lm.checkpoint.config)
        return adapter, self.lm.engine.prepare_adapter(adapter)

    def install(self, name: str, adapter: ExpertLoRA, prepared: object) -> None:
        """Make ``adapter`` usable by the next step (engine thread, between steps)."""
        if name in self.lm.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        victim = None
        if len(self.lm.adapters) >= self.max_loaded:
            idle = [n for n in sorted(self._last_used, key=self._last_used.get) if not self.in_use[n]]
            if not idle:
                raise AdapterBusy(f"{self.max_loaded} adapters are loaded and all are in use (max_loaded_adapters)")
            victim = idle[0]
        add_adapter(self.lm, name, adapter, prepared)  # checks before it changes anything
        self._last_used[name] = time.monotonic()
        if victim is not None:  # evicted once the new one is in: a failed load evicts nothing
            self.remove(victim)
        self.lm.engine.adapters_changed()  # GPU copies now, not on the first forward that uses them

    def remove(self, name: str) -> None:
        if name not in self.lm.adapters:
            raise UnknownAdapter(name, self.names)
        if self.in_use[name]:
            raise AdapterBusy(f"adapter {name!r} is in use by {self.in_use[name]} request(s); unload it when they finish")
        remove_adapter(self.lm, name)
        self._last_used.pop(name, None)
        del self.in_use[name]
        self.lm.engine.adapters_changed()

    def slot(self, name: str | None) -> int:
        return self.lm.engine.slot(name)

    def check_loaded(self, name: str | None) -> None:
        if name is not None and name not in self.lm.adapters:
            raise UnknownAdapter(name, self.names)

    def acquire(self, name: str | None) -> None:
        if name is not None:
            self.in_use[name] += 1
            self._last_used[name] = time.monotonic()

    def release(self, name: str | None) -> None:
        if name is not None:
            self.in_use[name] -= 1

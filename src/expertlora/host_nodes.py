"""CPU work inside a CUDA graph: host nodes that hand work to a host thread and wait for it.

A stream (and so a graph captured from it) can run a host function in its order of work
(``cuLaunchHostFunc``). Ours only post or wait on POSIX semaphores, as host functions must not
call CUDA:

    launch_host(stream, "post", ready)   # the host thread may start: its inputs have landed
    ... GPU work meanwhile ...
    launch_host(stream, "wait", done)    # the stream waits until the host thread posts done

The host functions are a few lines of C (csrc/host_sync.c), built with the system's C compiler
on first use and cached; the launch goes through the CUDA driver (libcuda) with ctypes. Where
either is missing, ``host_nodes_available()`` says why and callers keep their eager path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "host_sync.c"


class HostNodesUnavailable(RuntimeError):
    pass


def host_nodes_available() -> str | None:
    """None when host nodes work here, else the reason they do not."""
    for part in (_library, _driver):
        result = part()
        if isinstance(result, HostNodesUnavailable):
            return str(result)
    return None


class Semaphore:
    """A POSIX semaphore in memory this object owns (its address goes to host nodes)."""

    def __init__(self):
        lib = _require(_library())
        self._lib = lib
        self._buf = ctypes.create_string_buffer(lib.el_sem_size() + 16)
        if lib.el_sem_init(self._buf) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")

    @property
    def address(self) -> int:
        return ctypes.addressof(self._buf)

    def post(self) -> None:
        self._lib.el_post(self._buf)

    def wait(self, timeout_s: float) -> bool:
        """Wait (without holding the GIL) up to ``timeout_s``; False if it timed out."""
        result = self._lib.el_timed_wait(self._buf, ctypes.c_int64(int(timeout_s * 1000)))
        if result < 0:
            raise OSError(ctypes.get_errno(), "sem_timedwait failed")
        return result == 1

    def __del__(self):
        lib = getattr(self, "_lib", None)
        if lib is not None:
            lib.el_sem_destroy(self._buf)


def set_spin(ready_us: int, done_us: int) -> None:
    """How long each wait polls before it blocks, in microseconds: the host thread's wait for
    the stream's inputs (``ready``) and the stream's wait for the host's result (``done``)."""
    _require(_library()).el_set_spin(ctypes.c_int64(ready_us), ctypes.c_int64(done_us))


def launch_host(stream: torch.cuda.Stream, action: str, semaphore: Semaphore) -> None:
    """Enqueue on ``stream`` a host function that posts (``"post"``) or waits on (``"wait"``)
    ``semaphore``; during stream capture this records a host node of the graph."""
    lib = _require(_library())
    fn = {"post": lib.el_post, "wait": lib.el_wait}[action]
    launch_host_function(stream, ctypes.cast(fn, ctypes.c_void_p).value, semaphore.address)


def launch_host_function(stream: torch.cuda.Stream, function: int, argument: int) -> None:
    """Enqueue on ``stream`` the host function at address ``function`` (``void f(void*)``, which
    must not call CUDA), called with ``argument``; captured as a host node."""
    driver = _require(_driver())
    status = driver.cuLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), ctypes.c_void_p(function), ctypes.c_void_p(argument))
    if status != 0:
        raise RuntimeError(f"cuLaunchHostFunc failed with CUDA error {status}")


def _require(result):
    if isinstance(result, HostNodesUnavailable):
        raise result
    return result


@functools.cache
def _driver():
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return HostNodesUnavailable(f"the CUDA driver library is not loadable: {e}")
    driver.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    driver.cuLaunchHostFunc.restype = ctypes.c_int
    return driver


@functools.cache
def _library():
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return HostNodesUnavailable("no C compiler to build csrc/host_sync.c")
    source = SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertlora"
    target = cache / f"host_sync_{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: no half-written library
            built = Path(tmp) / target.name
            run = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lpthread"],
                                 capture_output=True, text=True, timeout=120)
            if run.returncode != 0:
                return HostNodesUnavailable(f"building {SOURCE.name} failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    for name in ("el_post", "el_wait", "el_sem_init", "el_sem_destroy"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.el_timed_wait.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.el_set_spin.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.el_sem_size.restype = ctypes.c_int64
    return lib

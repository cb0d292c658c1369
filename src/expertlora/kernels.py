"""The compiled CPU kernel (csrc/moe_lora_cpu.cpp), built on first use and cached.

It is compiled with torch's cpp_extension for the CPU it runs on (-march=native), so the
build is cached per source, torch version and CPU. Where it cannot be built (no compiler,
no AVX512-BF16) the engine says so once and runs the PyTorch path; a failed build is not
retried within the process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "moe_lora_cpu.cpp"
METHOD_CODES = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}


class KernelUnavailable(RuntimeError):
    pass


def cpu_kernel():
    """The op ``torch.ops.expertlora_cpu.moe_lora``; raises KernelUnavailable with the reason."""
    result = _build()
    if isinstance(result, KernelUnavailable):
        raise result
    return result


@functools.cache
def _build():
    if platform.machine() not in ("x86_64", "AMD64") or not _has_avx512():
        return KernelUnavailable("the CPU lacks AVX-512 with BF16 (avx512f/bw/vl/avx512_bf16)")
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:12]
    name = f"expertlora_cpu_{key}"
    try:
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=bool(os.environ.get("EXPERTLORA_VERBOSE_BUILD")),
        )
    except Exception as err:  # a missing compiler or ninja shows up as several error types
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return KernelUnavailable(f"building {SOURCE.name} failed: {reason}")
    return torch.ops.expertlora_cpu.moe_lora


@functools.cache
def warn_unavailable(reason: str) -> None:
    warnings.warn(f"expertlora: compiled CPU kernel unavailable ({reason}); using the PyTorch path", stacklevel=3)


def _put_ninja_on_path() -> None:
    """The ``ninja`` package's binary, for environments whose bin folder is not on PATH."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def has_amx() -> bool:
    return "amx_bf16" in _cpu_flags().split()


def _has_avx512() -> bool:
    flags = set(_cpu_flags().split())
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags

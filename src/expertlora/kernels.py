"""The compiled CPU kernel (csrc/moe_lora_cpu.cpp), built on first use and cached.

It is compiled with torch's cpp_extension for the CPU it runs on (-march=native), so the
build is cached per source (the .cpp and csrc/amx.h), torch version and CPU. Where it cannot be
built (no compiler, no AVX512-BF16) the engine says so once and runs the PyTorch path; a failed
build is not retried within the process.

AMX: experts with at least ``amx_from`` tokens (the op's last argument; 0 turns it off) run their
matmuls on AMX tiles where the CPU has them (checked again in the op: CPUID and Linux's
permission); ``amx_from()`` is the engine's default, EXPERTLORA_AMX=0 turns AMX off and
EXPERTLORA_AMX=N sets the threshold. ``cpu_kernel(emulate_amx=True)`` is a second build whose
tile instructions are a scalar emulation, for testing the AMX path on CPUs without AMX.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "moe_lora_cpu.cpp"
HEADERS = (Path(__file__).parent / "csrc" / "amx.h",)
# --exclude-libs: a compiler that links libstdc++ statically (the device image's /opt/gcc does)
# would otherwise export that copy's symbols, half of which the loader binds to torch's
# libstdc++.so: formatting a number in an error message then read the wrong locale facets and
# crashed. Kept private, the static copy is self-consistent; with a shared libstdc++ it is a no-op.
LINK_FLAGS = ["-fopenmp", "-Wl,--exclude-libs,ALL"]
METHOD_CODES = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}
# Tokens per expert from which its rows run on AMX tiles (bf16 / int8 / int4; measured on the
# device's Xeon, BENCHMARKS.md "AMX tiles in the CPU kernel").
AMX_TOKENS_PER_EXPERT = 5


class KernelUnavailable(RuntimeError):
    pass


def cpu_kernel(emulate_amx: bool = False):
    """The op ``torch.ops.expertlora_cpu.moe_lora``; raises KernelUnavailable with the reason.
    ``emulate_amx``: the build whose AMX tiles are emulated in scalar code
    (``torch.ops.expertlora_cpu_emu.moe_lora``, tests only: slow)."""
    result = _build(emulate_amx)
    if isinstance(result, KernelUnavailable):
        raise result
    return result


def kernel_ops(emulate_amx: bool = False):
    """The compiled kernel's op namespace (``torch.ops.expertlora_cpu``: moe_lora and the host
    calls of engine.KernelHostCall); raises KernelUnavailable with the reason."""
    cpu_kernel(emulate_amx)
    return torch.ops.expertlora_cpu_emu if emulate_amx else torch.ops.expertlora_cpu


def amx_from() -> int:
    """The engine's AMX threshold in tokens per expert: AMX_TOKENS_PER_EXPERT where the CPU has
    AMX-BF16, 0 (off) elsewhere; EXPERTLORA_AMX=0 turns it off, EXPERTLORA_AMX=N sets N."""
    env = os.environ.get("EXPERTLORA_AMX", "").strip()
    if env:
        if not re.fullmatch(r"[0-9]{1,7}", env):  # ASCII digits, bounded before int() reads them
            raise ValueError(f"EXPERTLORA_AMX: expected a token count of at most 7 digits (0 turns AMX off), found {env[:40]!r}")
        return int(env) if has_amx() else 0
    return AMX_TOKENS_PER_EXPERT if has_amx() else 0


@functools.cache
def _build(emulate_amx: bool = False):
    if platform.machine() not in ("x86_64", "AMD64") or not _has_avx512():
        return KernelUnavailable("the CPU lacks AVX-512 with BF16 (avx512f/bw/vl/avx512_bf16)")
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    text = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS) + " ".join(LINK_FLAGS).encode()
    key = hashlib.sha256(text + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:12]
    name = f"expertlora_cpu_{'emu_' if emulate_amx else ''}{key}"
    try:
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"]
            + (["-DEXPERTLORA_AMX_EMULATE"] if emulate_amx else []),
            extra_ldflags=LINK_FLAGS,
            is_python_module=False,
            verbose=bool(os.environ.get("EXPERTLORA_VERBOSE_BUILD")),
        )
    except Exception as err:  # a missing compiler or ninja shows up as several error types
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return KernelUnavailable(f"building {SOURCE.name} failed: {reason}")
    return torch.ops.expertlora_cpu_emu.moe_lora if emulate_amx else torch.ops.expertlora_cpu.moe_lora


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

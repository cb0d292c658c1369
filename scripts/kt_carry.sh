#!/usr/bin/env bash
# A trimmed kt-kernel for the device machine (Python 3.12, AVX-512 / AMX Xeon), in .device/kt/,
# small enough for the device tool's carry (the full 0.7.2 wheel is 101 MB):
# the kt_kernel package with only its AMX and AVX512-BF16 extensions, plus kt_kernel.libs and
# gguf, which kt_kernel imports.
#   scripts/kt_carry.sh               then: run(..., carry=[".device/kt"])
# scripts/device_cpu.sh puts .device/kt on PYTHONPATH when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${KT_VERSION:-0.7.2}"
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_35_x86_64 \
  "kt-kernel==$VERSION" gguf -d "$WHEELS"
rm -rf .device/kt && mkdir -p .device/kt
unzip -q "$WHEELS"/kt_kernel-*.whl 'kt_kernel/*' 'kt_kernel.libs/*' -x 'kt_kernel/cli/*' -d .device/kt
unzip -q "$WHEELS"/gguf-*.whl 'gguf/*' -d .device/kt  # kt_kernel imports it; pure Python
find .device/kt/kt_kernel -name '_kt_kernel_ext_*.so' ! -name '*_amx.*' ! -name '*_avx512_bf16.*' -delete
du -sh .device/kt

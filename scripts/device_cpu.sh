#!/usr/bin/env bash
# The device machine's CPU figures in one call (device tool: run this script, read $OUT):
# the engine's tests on that CPU, the MoE layer benchmark and the end-to-end benchmark.
# It uses the device's own torch / transformers / peft; the package runs from src/.
# Usage: scripts/device_cpu.sh [THREADS]   (default: all cores but one)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/expertlora-device}"
mkdir -p "$OUT"
THREADS="${1:-$(( $(nproc) - 1 ))}"
lscpu | grep -E "Model name|^CPU\(s\)|L3" | tee "$OUT/cpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_checkpoint.py tests/test_integration.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
python3 benchmarks/moe_layer.py --threads "$THREADS" --calls 12 --warmup 2 --out "$OUT/moe_layer.md" 2>&1 | grep -v "^|" | tee "$OUT/moe_layer.log"
python3 benchmarks/e2e.py --threads "$THREADS" --out "$OUT/e2e.md" 2>&1 | tail -14 | tee "$OUT/e2e.log"

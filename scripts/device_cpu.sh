#!/usr/bin/env bash
# The device machine's CPU figures, one part per device call (each fits the 10-minute limit):
#   scripts/device_cpu.sh tests            the engine / checkpoint / integration tests there
#   scripts/device_cpu.sh layer SHAPES     benchmarks/moe_layer.py, e.g. qwen3-30b-a3b,deepseek-v2-lite
#   scripts/device_cpu.sh e2e              benchmarks/e2e.py
# It uses the device's own torch / transformers / peft and runs the package from src/.
# Threads: all cores but one (THREADS=N to change). Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/expertlora-device}"
mkdir -p "$OUT"
THREADS="${THREADS:-$(( $(nproc) - 1 ))}"
lscpu | grep -E "Model name|^CPU\(s\)|L3" | tee "$OUT/cpu.txt"
case "${1:-tests}" in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_checkpoint.py tests/test_integration.py 2>&1 | tail -3 | tee "$OUT/tests.txt" ;;
  layer) python3 benchmarks/moe_layer.py --threads "$THREADS" --shapes "${2:-qwen3-30b-a3b,deepseek-v2-lite}" --calls 12 --warmup 2 \
           --out "$OUT/moe_layer.md" 2>&1 | grep -v "^|" | tee "$OUT/moe_layer.log" ;;
  e2e) python3 benchmarks/e2e.py --threads "$THREADS" --out "$OUT/e2e.md" 2>&1 | tail -14 | tee "$OUT/e2e.log" ;;
  *) echo "usage: $0 tests | layer [SHAPES] | e2e" >&2; exit 2 ;;
esac

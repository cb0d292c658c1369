#!/usr/bin/env bash
# The serving engine and graph decode on the device machine: the GPU tests of the engine (graph =
# eager per bucket, hybrid = CPU, CPU experts inside graphs through host nodes), greedy_decode,
# then a short decode throughput check per GPU share (eager vs graphs). Results go to $OUT.
#   scripts/device_engine.sh [tests] [speed]
source "$(dirname "$0")/device_env.sh"
# the random 4-layer checkpoint of benchmarks/e2e.py, built once and shared with scripts/device_prefill.sh e2e
BENCH_DIR="${BENCH_DIR:-/tmp/expertlora-bench}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
for part in "${@:-tests}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case "$part" in
    tests) timeout 420 python3 -m pytest -q -p no:cacheprovider -rfs -x tests/test_hybrid_graph.py tests/test_runtime.py tests/test_decode.py 2>&1 \
             | grep -vE "Writing model shards|^$" | tail -60 | tee "$OUT/engine_tests.txt" ;;
    speed) mkdir -p "$BENCH_DIR"
           timeout 300 python3 scripts/engine_speed.py --polls "0,0;300,0" --workdir "$BENCH_DIR" 2>&1 | tee "$OUT/engine_speed.txt" ;;
    *) echo "usage: $0 [tests] [speed]" >&2; exit 2 ;;
  esac
done

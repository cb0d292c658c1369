#!/usr/bin/env bash
# The serving engine and graph decode on the device machine: the GPU tests of the engine (graph =
# eager per bucket, hybrid = CPU, CPU experts inside graphs through host nodes), greedy_decode,
# then a short decode throughput check per GPU share (eager vs graphs). Results go to $OUT.
#   host_calls        the graph tests with EXPERTLORA_GRAPH_HOST_CALLS=worker (the hand-off to a worker
#                     thread, hybrid_graph.GraphCpuPart; the default with the compiled kernel is KernelHostCalls)
#   host_calls_speed  the two against each other, one process each: the hybrid layer at 1 / 32 tokens,
#                     the engine at 1 / 8 / 32 requests, every expert on the CPU (2 layers)
#   scripts/device_engine.sh [tests] [speed] [host_calls] [host_calls_speed]
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
    host_calls) EXPERTLORA_GRAPH_HOST_CALLS=worker timeout 240 python3 -m pytest -q -p no:cacheprovider -rfs tests/test_hybrid_graph.py \
                  tests/test_decode.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed|^E  " | tail -20 | tee "$OUT/host_calls_tests.txt" ;;
    host_calls_speed) mkdir -p "$BENCH_DIR/2layers"
                      for mode in worker kernel; do
                        echo "-- EXPERTLORA_GRAPH_HOST_CALLS=$mode"
                        EXPERTLORA_GRAPH_HOST_CALLS=$mode timeout 120 python3 benchmarks/gpu_layer.py --parts hybrid --tokens 1,32 --calls 30 \
                          --out "$OUT/hybrid_$mode.md" 2>&1 | grep -v "^|"
                        EXPERTLORA_GRAPH_HOST_CALLS=$mode timeout 150 python3 scripts/engine_speed.py --layers 2 --shares 0 --concurrency 1,8,32 \
                          --new-tokens 16 --polls "300,0" --workdir "$BENCH_DIR/2layers" 2>&1 | grep -vE "^\||Writing"
                      done 2>&1 | tee "$OUT/host_calls_speed.txt" ;;
    *) echo "usage: $0 [tests] [speed] [host_calls] [host_calls_speed]" >&2; exit 2 ;;
  esac
done

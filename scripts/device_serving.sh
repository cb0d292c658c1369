#!/usr/bin/env bash
# The serving benchmark's GPU figures on the device machine (benchmarks/serving.py, 4 layers of the
# Qwen3-30B-A3B shape, requests 32-1024 prompt tokens and 64-256 output tokens, concurrency
# 1 / 8 / 32 / 128), about 8 minutes for every part. Parts, run in the order given:
#   100    every expert on the GPU: the levels; at 32: no LoRA, one adapter, five adapters mixed;
#          one at a time through run's path; transformers' continuous batching (no LoRA)
#   http   every expert on the GPU, through a live `expertlora serve` (and in process at 32 for the
#          HTTP layer's cost): the levels, Poisson arrivals and a burst, RSS across 1,000 requests
#          (in process and the server's)
#   0      no expert on the GPU: the levels, one at a time, and the bound (expert bytes per step /
#          the read bandwidth measured there)
#   50     half of each layer's experts on the GPU: the levels
#   scripts/device_serving.sh                   every part: 100 http 0 50
#   scripts/device_serving.sh 100 0             some parts
#   scripts/device_serving.sh carry             (here, not on the device) .device/serve: the server's
#                                               dependencies for the device's Python 3.12; then
#                                               run(..., carry=[".device/serve"])
# The first part makes the random checkpoint and five adapters in $WORK (default
# /tmp/expertlora-serving) and the later ones reuse them. Each part stops starting runs after its
# budget (--budget-s) and is killed at its time limit (the limits add up to 580 s, under the
# device tool's 10 minutes a call); its rows reach $OUT/serving_PART.jsonl as they are measured,
# its table $OUT/serving.md at its end, its log $OUT/serving_PART.log.
# Threads: all cores but one (THREADS=N to change).
source "$(dirname "$0")/device_env.sh"
THREADS="${THREADS:-$(( $(nproc) - 1 ))}"
WORK="${WORK:-/tmp/expertlora-serving}"
SERVE_PACKAGES="fastapi starlette uvicorn h11 httpx httpcore anyio sniffio pydantic pydantic_core annotated_types
typing_inspection typing_extensions prometheus_client psutil click"

carry() {  # wheels for CPython 3.12 on x86-64 Linux, at the versions installed here, unpacked into .device/serve
  local wheels pins=()
  wheels=$(mktemp -d)
  for p in $SERVE_PACKAGES; do
    pins+=("${p//_/-}==$(python3 -c "import importlib.metadata as m; print(m.version('${p//_/-}'))")")
  done
  pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$wheels" "${pins[@]}" || { rm -rf "$wheels"; exit 1; }
  rm -rf .device/serve && mkdir -p .device/serve
  for w in "$wheels"/*.whl; do unzip -q -o "$w" -d .device/serve; done
  rm -rf "$wheels"
  du -sh .device/serve
}

if [ "${1:-}" = carry ]; then carry; exit; fi
# The carried packages go on the path only where the device lacks one (they would shadow its own).
if ! python3 -c "import fastapi, uvicorn, httpx, pydantic, prometheus_client, psutil" 2>/dev/null && [ -d .device/serve ]; then
  export PYTHONPATH="$PYTHONPATH:$PWD/.device/serve"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/serving_gpu.txt"
COMMON=(--device cuda --threads "$THREADS" --workdir "$WORK" --rounds 1 --out "$OUT/serving.md")

bench() {  # PART TIME_LIMIT_S BUDGET_S ARGS...
  local part=$1 limit=$2 budget=$3
  shift 3
  echo "== serving $part ($(date -u +%H:%M:%S))"
  timeout "$limit" python3 benchmarks/serving.py "${COMMON[@]}" --budget-s "$budget" --json "$OUT/serving_$part.jsonl" "$@" 2>&1 \
    | grep -v "^|" | tee "$OUT/serving_$part.log"
}

[ $# -eq 0 ] && set -- 100 http 0 50
for part in "$@"; do
  case "$part" in
    100) bench 100 230 170 --gpu-experts-ratio 1 --parts levels,adapters,nolora,alone,cb --repeat 2 --cb-limit-s 40 ;;
    http)
      if python3 -c "import fastapi, uvicorn, httpx, pydantic, prometheus_client, psutil" 2>/dev/null; then
        bench http 130 60 --gpu-experts-ratio 1 --parts arrivals --rss --http --repeat 2
      else
        echo "http: fastapi / uvicorn / httpx / pydantic / prometheus_client / psutil missing here; carry .device/serve" \
             "(scripts/device_serving.sh carry on the dev box)" | tee "$OUT/serving_http.log"
      fi ;;
    0) bench 0 140 95 --gpu-experts-ratio 0 --parts levels,alone --min-requests 2 --alone-requests 2 ;;
    50) bench 50 80 50 --gpu-experts-ratio 0.5 --parts levels --min-requests 2 ;;
    *) echo "usage: $0 [100] [http] [0] [50] | carry" >&2; exit 2 ;;
  esac
done

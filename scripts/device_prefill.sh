#!/usr/bin/env bash
# GPU prefill for CPU-resident experts (gpu_prefill.py, issue 16 part 1) on the device machine.
# Parts, run in the order given (keep one call under 10 minutes):
#   tests   tests/test_gpu_prefill.py, its CUDA cases included (page-locked blocks, the copy stream)
#   bench   benchmarks/gpu_prefill.py: per layer at 512 / 2048 tokens against the copy time, and
#           the crossover against the CPU path per method (METHODS, default bf16,int8,int4) over
#           the token counts CROSS (default 16,32,64,128,256)
#   e2e     benchmarks/e2e.py at 0% of the experts on the GPU, a 2048-token prompt (PROMPT), each of
#           METHODS with GPU prefill off and on: the end-to-end prefill gain
#   scripts/device_prefill.sh tests bench
# It uses the device's own torch and runs the package from src/. Results go to $OUT.
source "$(dirname "$0")/device_env.sh"
METHODS="${METHODS:-bf16,int8,int4}"
# the random 4-layer checkpoint of benchmarks/e2e.py, built once and shared with scripts/device_engine.sh speed
BENCH_DIR="${BENCH_DIR:-/tmp/expertlora-bench}"
mkdir -p "$BENCH_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|L3" | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
for part in "${@:-tests}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case "$part" in
    tests) python3 -m pytest -q -p no:cacheprovider -rfs tests/test_gpu_prefill.py 2>&1 | tail -40 | tee "$OUT/prefill_tests.txt" ;;
    e2e) python3 benchmarks/e2e.py --device cuda --gpu-shares 0 --methods "$METHODS" --prompt-tokens "${PROMPT:-2048}" \
           --new-tokens 4 --gpu-prefill --no-peers --workdir "$BENCH_DIR" --out "$OUT/e2e_prefill.md" 2>&1 | tail -12 | tee "$OUT/e2e_prefill.log" ;;
    bench) python3 benchmarks/gpu_prefill.py --methods "$METHODS" --cross "${CROSS:-16,32,64,128,256}" --out "$OUT/gpu_prefill.md" 2>&1 | grep -v "^|" | tee "$OUT/gpu_prefill.log" ;;
    *) echo "usage: $0 [tests] [bench] [e2e]" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# GPU prefill for CPU-resident experts (gpu_prefill.py, issue 16 part 1) on the device machine.
# Parts, run in the order given (keep one call under 10 minutes):
#   tests   tests/test_gpu_prefill.py, its CUDA cases included (page-locked blocks, the copy stream)
#   bench   benchmarks/gpu_prefill.py: per layer at 512 / 2048 tokens against the copy time, and
#           the crossover against the CPU path per method (METHODS, default bf16,int8,int4)
#   scripts/device_prefill.sh tests bench
# It uses the device's own torch and runs the package from src/. Results go to $OUT.
source "$(dirname "$0")/device_env.sh"
METHODS="${METHODS:-bf16,int8,int4}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|L3" | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
for part in "${@:-tests}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case "$part" in
    tests) python3 -m pytest -q -p no:cacheprovider -rfs tests/test_gpu_prefill.py 2>&1 | tail -40 | tee "$OUT/prefill_tests.txt" ;;
    bench) python3 benchmarks/gpu_prefill.py --methods "$METHODS" --out "$OUT/gpu_prefill.md" 2>&1 | grep -v "^|" | tee "$OUT/gpu_prefill.log" ;;
    *) echo "usage: $0 [tests] [bench]" >&2; exit 2 ;;
  esac
done

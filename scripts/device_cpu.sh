#!/usr/bin/env bash
# The device machine's CPU figures. Parts, run in the order given (keep one call under 10 minutes):
#   tests      the engine / checkpoint / integration / kt backend tests there
#   layer      benchmarks/moe_layer.py on SHAPES (default qwen3-30b-a3b,deepseek-v2-lite),
#              METHODS (default all four) and TOKENS (default 1,32,512); LAYER_ARGS adds options
#              (e.g. "--no-peft --no-torch-path")
#   kt_glue    benchmarks/kt_glue.py at 1 and 32 tokens (needs kt-kernel)
#   e2e        benchmarks/e2e.py
#   scripts/device_cpu.sh tests layer kt_glue
# It uses the device's own torch / transformers / peft and runs the package from src/; kt-kernel
# comes from .device/kt where carried (scripts/kt_carry.sh).
# Threads: all cores but one (THREADS=N to change), for ours and kt-kernel alike. Results go to $OUT.
source "$(dirname "$0")/device_env.sh"
THREADS="${THREADS:-$(( $(nproc) - 1 ))}"
SHAPES="${SHAPES:-qwen3-30b-a3b,deepseek-v2-lite}"
METHODS="${METHODS:-fp32,bf16,int8,int4}"
TOKENS="${TOKENS:-1,32,512}"
LAYER_ARGS="${LAYER_ARGS:-}"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core\(s\)|NUMA node\(s\)|L3" | tee "$OUT/cpu.txt"
for part in "${@:-tests}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case "$part" in
    tests) python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_checkpoint.py \
             tests/test_integration.py tests/test_kt_backend.py tests/test_kernel_amx.py 2>&1 | tail -15 | tee "$OUT/tests.txt" ;;
    layer) python3 benchmarks/moe_layer.py --threads "$THREADS" --kt-threads "$THREADS" --shapes "$SHAPES" \
             --methods "$METHODS" --tokens "$TOKENS" $LAYER_ARGS --calls 12 --warmup 2 --out "$OUT/moe_layer.md" 2>&1 | grep -v "^|" | tee -a "$OUT/moe_layer.log" ;;
    kt_glue) for T in 1 32; do python3 benchmarks/kt_glue.py --threads "$THREADS" --tokens "$T" 2>&1 | tail -2; done | tee "$OUT/kt_glue.log" ;;
    e2e) python3 benchmarks/e2e.py --threads "$THREADS" --out "$OUT/e2e.md" 2>&1 | tail -14 | tee "$OUT/e2e.log" ;;
    *) echo "usage: $0 [tests] [layer] [kt_glue] [e2e]" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# The GPU checks and figures on the device machine. Parts, run in the order given (keep one call
# under 10 minutes):
#   tests    the whole test suite, GPU tests included (tests/test_gpu.py, tests/test_hybrid_model.py)
#   layer    benchmarks/gpu_layer.py --parts gpu: the GPU MoE-LoRA layer, three shapes, 1 / 32 / 512 tokens
#   sweep    benchmarks/gpu_layer.py --parts sweep: the fused Triton kernels' block sizes
#   hybrid   benchmarks/gpu_layer.py --parts hybrid: 0 / 25 / 50 / 100% of the experts on the GPU
#   e2e      benchmarks/e2e.py --device cuda at the same GPU shares
#   decode   scripts/decode_check.py: greedy_decode per family and mode, one process each (locates faults);
#            DECODE_FAMILIES="deepseek_v3" MODES=eager,graph,graph-math narrow it
#   scripts/device_check.sh tests layer
#   LAYER_TOKENS=1,4,16 HYBRID_TOKENS=1,32 scripts/device_check.sh layer hybrid   (token counts other than the default)
# It uses the device's own torch / transformers / peft and runs the package from src/; kt-kernel
# comes from .device/kt where carried (scripts/kt_carry.sh; its tests then check the converted-weight
# reader against kt-kernel's AMX build too). Results go to $OUT (default /tmp/expertlora-device).
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|L3" | tee -a "$OUT/gpu.txt"
for part in "${@:-tests}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case "$part" in
    tests) python3 -m pytest -q -p no:cacheprovider -rfs tests 2>&1 | grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|^E  " | tail -40 | tee "$OUT/tests.txt" ;;
    layer) python3 benchmarks/gpu_layer.py --parts gpu ${LAYER_TOKENS:+--tokens $LAYER_TOKENS} --out "$OUT/gpu_layer.md" 2>&1 | grep -v "^|" | tee -a "$OUT/gpu_layer.log" ;;
    sweep) python3 benchmarks/gpu_layer.py --parts sweep --shapes qwen3-30b-a3b,mixtral-8x7b 2>&1 | tee -a "$OUT/sweep.log" ;;
    hybrid) python3 benchmarks/gpu_layer.py --parts hybrid ${HYBRID_TOKENS:+--tokens $HYBRID_TOKENS} --out "$OUT/hybrid.md" 2>&1 | grep -v "^|" | tee -a "$OUT/hybrid.log" ;;
    e2e) python3 benchmarks/e2e.py --device cuda --out "$OUT/e2e_gpu.md" 2>&1 | tail -16 | tee "$OUT/e2e_gpu.log" ;;
    decode) python3 scripts/decode_check.py ${DECODE_FAMILIES:-} 2>&1 | tee "$OUT/decode.log" ;;
    *) echo "usage: $0 [tests] [sweep] [layer] [hybrid] [e2e] [decode]" >&2; exit 2 ;;
  esac
done

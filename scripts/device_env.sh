# Sourced by scripts/device_cpu.sh and scripts/device_check.sh: run from the repository root with
# the package from src/ and, where carried (scripts/kt_carry.sh), kt-kernel from .device/kt;
# results go to $OUT (default /tmp/expertlora-device).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -d .device/kt ] && export PYTHONPATH="$PWD/.device/kt:$PYTHONPATH"
OUT="${OUT:-/tmp/expertlora-device}"
mkdir -p "$OUT"

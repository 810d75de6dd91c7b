#!/usr/bin/env bash
# ncu on the tensor-core W4A16 kernel (one launch each), on the device machine; reports under $OUT.
# e.g. OUT=out bash bench/ncu_w4a16.sh "mma:8B down:1" "mma:8B gate_up:1"
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/runtime EDGELLM_KERNEL_CACHE=/tmp/edgellm-kernel-cache/edgellm
OUT=${OUT:-out}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine" >&2; exit 1; }
for target in "$@"; do
    report=$OUT/ncu-$(echo "$target" | tr ': ' '__').txt
    timeout 90 "$NCU" --clock-control none -k regex:w4a16 -s 2 -c 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats \
        python3 bench/kernels.py --ncu-target "$target" > "$report" 2>&1
    echo "== $target"
    grep -E "Duration|DRAM Throughput|Issued Warp Per Scheduler|No Eligible|Achieved Occupancy|Theoretical Occupancy|Registers Per|Warp Cycles Per Issued|Block Limit|Dynamic Shared" "$report" | sed 's/  */ /g'
done

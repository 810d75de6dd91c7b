#!/usr/bin/env bash
# ncu on the tensor-core W4A16 kernel (one launch each), on the device machine; reports under $OUT.
# e.g. OUT=out bash bench/ncu_w4a16.sh "mma:8B down:1" "mma:8B gate_up:1"
# graph:SHAPE:BATCH profiles the W4A16 kernels of one layer of the decode graph instead, each node on
# its own (ncu serializes them: no overlap with its neighbours) but with the inputs the step gave it
# and warm caches, e.g. "graph:llama-3.1-8b:4". Not yet run (written 2026-12-04 without device time).
# sass:SHAPE:M gives, per SASS instruction of one tensor-core kernel launch, the warp-stall samples
# (ncu's source page), the 30 most stalled printed by bench/ncu_sass_top.py, e.g. "sass:8B gate_up:1":
# what the long-scoreboard stalls wait on (kernels-notes.md, sessions 14 and 15; first run 2026-12-04,
# seventh session).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/runtime EDGELLM_KERNEL_CACHE=/tmp/edgellm-kernel-cache/edgellm
OUT=${OUT:-out}
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine" >&2; exit 1; }
SECTIONS=(--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats)
for target in "$@"; do
    report=$OUT/ncu-$(echo "$target" | tr ': ' '__').txt
    if [[ $target == sass:* ]]; then
        profile=$OUT/ncu-sass-$(echo "${target#sass:}" | tr ': ' '__')  # ncu's report, then its source page as CSV
        timeout 120 "$NCU" --clock-control none -k regex:w4a16_mma_mb -s 2 -c 1 --section SourceCounters \
            --section WarpStateStats -f -o "$profile" python3 bench/kernels.py --ncu-target "mma:${target#sass:}" > "$report" 2>&1
        "$NCU" --import "$profile.ncu-rep" --page source --print-source sass --csv > "$profile.csv" 2>> "$report"
        echo "== $target"
        python3 bench/ncu_sass_top.py "$profile.csv" 30
        continue
    elif [[ $target == graph:* ]]; then
        IFS=: read -r _ shape batch <<< "$target"
        # -s 4 -c 4: past layer 0's four projections, layer 1's q|k|v, o, gate|up and down.
        timeout 240 "$NCU" --profile-from-start off --graph-profiling node --cache-control none --clock-control none \
            -k regex:w4a16_mma -s 4 -c 4 "${SECTIONS[@]}" \
            python3 bench/profile_step.py --shape "$shape" --batch "$batch" --ncu-replays 1 --out "$OUT/unused.json" \
            > "$report" 2>&1
    else
        timeout 90 "$NCU" --clock-control none -k regex:w4a16 -s 2 -c 1 "${SECTIONS[@]}" \
            python3 bench/kernels.py --ncu-target "$target" > "$report" 2>&1
    fi
    echo "== $target"
    grep -E "Duration|DRAM Throughput|Issued Warp Per Scheduler|No Eligible|Achieved Occupancy|Theoretical Occupancy|Registers Per|Warp Cycles Per Issued|Block Limit|Dynamic Shared" "$report" | sed 's/  */ /g'
done

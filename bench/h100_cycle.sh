#!/usr/bin/env bash
# Build-check-benchmark steps on the GPU machine (the `device` tool), results under $OUT.
# Name one or more steps; they run in the order given:
#   tests       every GPU test (-m gpu: kernels, engines vs transformers, INT4 CUDA vs CPU, weights loader, doctor,
#               scheduler and daemon swaps; the OTA test files only where `cryptography` imports)
#   profile     where a decode step's time goes, 8B and 1B shapes, batch $PROFILE_BATCH (default 1; bench/profile_step.py)
#   profile-prefill  the same for an 8B 512-token prefill, each run's time printed (TTFT spread)
#   profile-startup  where a 1B process start to warm goes: imports and load + warm-up (bench/profile_startup.py)
#   probe-load  a load's read-and-verify and warm-up, piece by piece, both shapes (bench/probe_load.py)
#   probe-prefetch  a start's timeline with the weights read beside the import on 0/8/2/4 threads (bench/probe_prefetch.py)
#   kernels     W4A16 kernel table (engine path beside the Triton fallback and cuBLAS) + decode attention
#   lm-head     the final norm + LM head alone: the fused kernel's configurations beside norm + cuBLAS (bench/lm_head.py)
#   attention   the decode attention alone: both shapes, batch 1-8, context 512 and 4096, splits swept
#   sweep       the same + the Triton candidate configurations (bench/kernels.py --sweep, decode shapes)
#   sweep-mma   the tensor-core kernel's K splits and ring depths, early start on and off, every shape, M=1,8
#   ab-kernels  W4A16 kernel sources side by side (bench/ab_kernels.py): AB_SOURCES=current,PATH[,...],
#               AB_SHAPES (every shape), AB_M (1,4), AB_ROUNDS (3)
#   startup     what a fresh process spends on `import torch` and on creating the CUDA context
#   decode      bench/decode.py: both shapes, vs transformers eager and static cache + compile
#               (transformers at batches $HF_BATCHES, default 1,4)
#   decode-ours bench/decode.py without transformers (quicker; DECODE_SHAPES=llama-3.1-8b for one shape)
#   decode-no-pdl  the same with programmatic dependent launch off (EDGELLM_PDL=0), under $OUT/no-pdl
#   decode-no-fold the same with the norm kernels instead of norms folded into the projections (EDGELLM_FOLD_NORMS=0)
#   decode-one-tile the same with one 16-row tile per W4A16 block at every batch (EDGELLM_MMA_TWO_TILES=0), under $OUT/one-tile
#   ab          decode steps under each setting of one switch, in turn in one process (bench/ab_decode.py):
#               AB_SWITCH=NAME=v1,v2 (e.g. EDGELLM_MMA_TWO_TILES=1,0), AB_ROUNDS (3), DECODE_SHAPES (8B), AB_CONTEXT (512)
#   serve-load  the daemon on a 1B-shape INT4 engine under bench/load.py, 5 min
# e.g. bash bench/h100_cycle.sh tests profile decode-ours
# The generated gRPC message code is ignored by git: carry runtime/edgellm/v1/*_pb2.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/runtime:$PWD/tests PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/edgellm-kernel-cache \
    EDGELLM_KERNEL_CACHE=/tmp/edgellm-kernel-cache/edgellm
OUT=${OUT:-out}
mkdir -p "$OUT"
[ $# -gt 0 ] || { sed -n 2,28p "$0" >&2; exit 2; }
for step in "$@"; do
    echo "=== $step ($(date +%T))"
    case $step in
    tests)
        # The OTA tests need `cryptography`, which the device machine lacks (with its cffi backend,
        # for Python 3.12, not downloadable there): without it they are left out, loudly, rather
        # than stopping the collection of every other GPU test.
        not_collected=()
        if ! python3 -c "import cryptography.hazmat.primitives.asymmetric.ed25519" 2>/dev/null; then
            not_collected=(--ignore tests/test_ota_daemon.py --ignore tests/test_ota_offline.py)
            echo "NOT RUN: the GPU tests of tests/test_ota_daemon.py and tests/test_ota_offline.py (no cryptography here)" \
                | tee "$OUT/gpu-tests-not-run.txt"
        fi
        timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu -rs "${not_collected[@]}" tests -s 2>&1 | tee "$OUT/gpu-tests.txt" \
            | grep -E "rel err|relative|error|passed|failed|FAIL|ok |tokens" | tail -60
        ;;
    profile)
        for shape in llama-3.1-8b llama-3.2-1b; do
            timeout 150 python3 bench/profile_step.py --shape $shape --batch "${PROFILE_BATCH:-1}" --out "$OUT/profile-$shape.json" 2>&1 \
                | grep -v Warning | tee -a "$OUT/profile.txt" | head -${PROFILE_LINES:-14}
        done
        ;;
    profile-prefill)
        for shape in ${PREFILL_SHAPES:-llama-3.1-8b}; do
            timeout 200 python3 bench/profile_step.py --shape $shape --prefill 512 --out "$OUT/profile-prefill-$shape.json" 2>&1 \
                | grep -v Warning | tee -a "$OUT/profile-prefill.txt" | head -45
        done
        ;;
    profile-startup)
        timeout 200 python3 bench/profile_startup.py --shape llama-3.2-1b --out "$OUT/profile-startup.txt" 2>&1 | head -45
        ;;
    probe-load)
        for shape in llama-3.2-1b llama-3.1-8b; do
            timeout 150 python3 bench/probe_load.py --shape $shape --out "$OUT/probe-load-$shape.json" 2>&1 | grep -v -i warn | tail -22
        done
        ;;
    probe-prefetch)
        timeout 200 python3 bench/probe_prefetch.py --shape llama-3.2-1b --threads 0,8,2,4,0,8,2,4 2>&1 | grep -v -i warn \
            | tee "$OUT/probe-prefetch-1b.txt" | tail -75
        timeout 150 python3 bench/probe_prefetch.py --shape llama-3.1-8b --threads 0,8,2 2>&1 | grep -v -i warn \
            | tee "$OUT/probe-prefetch-8b.txt" | tail -30
        ;;
    kernels)
        timeout 240 python3 bench/kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" | tail -16
        ;;
    lm-head)
        timeout 240 python3 bench/lm_head.py --out "$OUT/lm_head.json" 2>&1 | grep -v Warning | tee "$OUT/lm_head.txt" | tail -12
        ;;
    attention)
        timeout 240 python3 bench/kernels.py --out "$OUT/attention.json" --attention-only 2>&1 | tee "$OUT/attention.txt" | tail -18
        ;;
    sweep)
        timeout 240 python3 bench/kernels.py --out "$OUT/kernels.json" --sweep --no-prefill \
            --sweep-shapes "${SWEEP_SHAPES:-8B gate_up,8B down,1B qkv}" --sweep-m "${SWEEP_M:-1,4}" --sweep-kinds "${SWEEP_KINDS:-}" 2>&1 | tee "$OUT/kernels.txt" | tail -45
        ;;
    sweep-mma)
        timeout 300 python3 bench/kernels.py --out "$OUT/kernels-sweep.json" --sweep-mma --no-prefill \
            --sweep-shapes "${SWEEP_SHAPES:-1B qkv,1B o,1B gate_up,1B down,8B qkv,8B o,8B gate_up,8B down}" \
            --sweep-m "${SWEEP_M:-1,8}" 2>&1 | tee "$OUT/kernels-sweep.txt" | grep -v "^  sweep" | tail -16
        ;;
    ab-kernels)
        timeout 500 python3 bench/ab_kernels.py --sources "${AB_SOURCES:?AB_SOURCES=current,PATH[,...]}" \
            ${AB_SHAPES:+--shapes "$AB_SHAPES"} --m "${AB_M:-1,4}" --rounds "${AB_ROUNDS:-3}" --out "$OUT" 2>&1 \
            | tee "$OUT/ab-kernels.txt" | grep -v "^round" | tail -24
        ;;
    startup)
        for i in 1 2; do
            python3 -c "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); torch.zeros(1, device='cuda'); torch.cuda.synchronize(); print(f'import torch {t1 - t0:.2f} s, CUDA context {time.perf_counter() - t1:.2f} s')"
        done
        nvidia-smi --query-gpu=persistence_mode --format=csv,noheader | sed 's/^/persistence mode: /'
        ;;
    decode)
        timeout 480 python3 bench/decode.py --out "$OUT" --hf-batches "${HF_BATCHES:-1,4}" 2>&1 | tee "$OUT/decode.txt" | tail -30
        ;;
    decode-ours)
        timeout 300 python3 bench/decode.py --out "$OUT" --skip-hf ${DECODE_SHAPES:+--shapes "$DECODE_SHAPES"} 2>&1 \
            | tee "$OUT/decode.txt" | tail -30
        ;;
    decode-no-fold)
        mkdir -p "$OUT/no-fold"
        EDGELLM_FOLD_NORMS=0 timeout 300 python3 bench/decode.py --out "$OUT/no-fold" --skip-hf ${DECODE_SHAPES:+--shapes "$DECODE_SHAPES"} 2>&1 \
            | tee "$OUT/no-fold/decode.txt" | tail -12
        ;;
    decode-one-tile)
        mkdir -p "$OUT/one-tile"
        EDGELLM_MMA_TWO_TILES=0 timeout 300 python3 bench/decode.py --out "$OUT/one-tile" --skip-hf ${DECODE_SHAPES:+--shapes "$DECODE_SHAPES"} 2>&1 \
            | tee "$OUT/one-tile/decode.txt" | tail -12
        ;;
    ab)
        timeout 400 python3 bench/ab_decode.py --switch "${AB_SWITCH:?AB_SWITCH=NAME=v1,v2}" --rounds "${AB_ROUNDS:-3}" \
            --shapes "${DECODE_SHAPES:-llama-3.1-8b}" --context "${AB_CONTEXT:-512}" --out "$OUT" 2>&1 | tee "$OUT/ab-decode.txt" | grep -v "^  batch" | tail -40
        ;;
    decode-no-pdl)
        mkdir -p "$OUT/no-pdl"
        EDGELLM_PDL=0 timeout 300 python3 bench/decode.py --out "$OUT/no-pdl" --skip-hf 2>&1 | tee "$OUT/no-pdl/decode.txt" | tail -30
        ;;
    serve-load)
        python3 - <<'PY'
from pathlib import Path
import tempfile
from edgellm.engine.demo_tokenizer import train_demo_tokenizer
from edgellm.engine.random_engine import write_random_engine
tok = Path(tempfile.mkdtemp()) / "tok"; tok.mkdir()
train_demo_tokenizer(tok)
write_random_engine(Path("/tmp/llama-1b-int4"), "llama-3.2-1b", tok, max_batch=4, max_seq_len=2048, target_sms=["9.0"], device="cuda")
PY
        timeout 420 python3 bench/load.py --engine /tmp/llama-1b-int4 --device cuda --minutes 5 --out "$OUT/load-gpu.json" 2>&1 \
            | tee "$OUT/load-gpu.txt" | tail -40
        ;;
    *)
        echo "unknown step $step" >&2; sed -n 2,28p "$0" >&2; exit 2 ;;
    esac
done

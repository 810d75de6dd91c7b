#!/usr/bin/env bash
# One build-check-benchmark cycle on the GPU machine (the `device` tool), results under $OUT.
#   bash bench/h100_cycle.sh tests-and-decode   # GPU tests, then bench/decode.py (both shapes, vs transformers)
#   bash bench/h100_cycle.sh serve-load         # the daemon on a 1B-shape INT4 engine under bench/load.py, 5 min
# The generated gRPC message code is ignored by git: carry runtime/edgellm/v1/*_pb2.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/runtime:$PWD/tests PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/edgellm-kernel-cache
OUT=${OUT:-out}
mkdir -p "$OUT"
case ${1:-} in
tests-and-decode)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_kernels_gpu.py tests/test_engine_hf.py \
        tests/test_doctor.py -s 2>&1 | tee "$OUT/gpu-tests.txt" | grep -E "relative|error|passed|failed|PASS|FAIL|doctor|gpu" | tail -40
    timeout 330 python3 bench/decode.py --out "$OUT" --hf-batches 1,4 2>&1 | tee "$OUT/decode.txt" | tail -30
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
    echo "usage: $0 tests-and-decode|serve-load" >&2; exit 2 ;;
esac

"""Timeline of one start with the weights prefetched beside the import (when the prefetch
finished, whether load took it, where load's time went). Caches filled by a first start.

    python3 bench/probe_prefetch.py --shape llama-3.2-1b --threads 0,8,2,0,8,2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT / "bench"))

CHILD = r"""
import time, sys, os
t0 = time.perf_counter()
def at(what): print(f"{time.perf_counter() - t0:7.3f} s  {what}", flush=True)
sys.path.insert(0, os.environ["EDGELLM_RUNTIME"])
from edgellm.engine.cuda_context import start_creating_context
from edgellm.engine import prefetch as prefetch_module
threads = int(sys.argv[2])
prefetch_module.prefetch_threads = lambda: threads
start_creating_context("cuda")
prefetch = prefetch_module.start_prefetching_weights(sys.argv[1]) if threads else None
at(f"prefetch started on {threads} threads: {prefetch is not None}")
import torch
from edgellm.engine.runner import Engine
at("imported")
if prefetch is not None:
    prefetch.join()
    at(f"prefetch done, verified: {prefetch.buffer is not None}")
engine = Engine.load(sys.argv[1], device="cuda", progress=at)
torch.cuda.synchronize()
at(f"loaded {engine.load_timings}")
engine.warm_up()
at("warm")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--threads", default="0,8,2,0,8,2", help="prefetch threads of each start (0: no prefetch)")
    args = ap.parse_args()
    from decode import build_and_start_once, start_env

    engine_dir, cache, _ = build_and_start_once(args.shape, "edgellm-prefetch-")
    for threads in args.threads.split(","):
        print(f"-- start, prefetch threads {threads}", flush=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(engine_dir), threads], capture_output=True, text=True,
                              env=start_env(cache), timeout=300)
        print(proc.stdout + proc.stderr[-2000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where process start to warm goes: the imports (python -X importtime) and load + warm-up
(cProfile), in a fresh process started as bench/decode.py starts one, caches filled.

    python3 bench/profile_startup.py --shape llama-3.2-1b --out profile-startup.txt

Builds a random INT4 engine at the shape (as bench/decode.py does), starts once to fill the
kernel and bytecode caches, then profiles a second start. Prints the slowest imports and the
functions with the most cumulative time; writes both to --out.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT / "bench"))

PROFILED_START = r"""
import cProfile, pstats, sys, os, time, io
t0 = time.perf_counter()
sys.path.insert(0, os.environ["EDGELLM_RUNTIME"])
from edgellm.engine.cuda_context import start_creating_context
from edgellm.engine.prefetch import start_prefetching_weights
start_creating_context("cuda")  # as `edgellm serve` does: the context and the weights beside the import
start_prefetching_weights(sys.argv[1])
import torch
from edgellm.engine.runner import Engine
t_import = time.perf_counter()
profile = cProfile.Profile()
profile.enable()
engine = Engine.load(sys.argv[1], device="cuda")
torch.cuda.synchronize()
t_load = time.perf_counter()
engine.warm_up()
t_warm = time.perf_counter()
profile.disable()
print(f"import {t_import - t0:.2f} s, load {t_load - t_import:.2f} s {engine.load_timings}, warm-up {t_warm - t_load:.2f} s")
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(45)
print(text.getvalue())
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from decode import bench_start_to_warm, build_and_start_once, start_env

    engine_dir, cache, first = build_and_start_once(args.shape, "edgellm-startup-")
    again = bench_start_to_warm(engine_dir, cache)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", PROFILED_START, str(engine_dir)],
                          capture_output=True, text=True, env=start_env(cache), timeout=300)
    imports = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            imports.append((int(m.group(2)), len(m.group(3)), m.group(4)))
    top = sorted((i for i in imports if i[1] <= 5), reverse=True)[:30]  # top levels only: nested ones repeat them
    report = [f"{args.shape}: start to warm, first start {first['to_warm_s']:.2f} s, second {again['to_warm_s']:.2f} s: {again}",
              "slowest imports (cumulative ms, nesting depth, module):"]
    report += [f"  {us / 1e3:8.1f}  {depth:2d}  {name}" for us, depth, name in top]
    report += ["profiled start:", proc.stdout[-12000:]]
    if proc.returncode:
        report += ["stderr:", proc.stderr[-3000:]]
    text = "\n".join(report)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start to warm with the GPU libraries loaded beside the weights' read and without
(edgellm.engine.runner.start_loading_gpu_libraries; EDGELLM_PRELOAD_LIBRARIES=0 is off),
fresh processes taken in turn, caches filled by a first start; medians printed.

    python3 bench/probe_preload.py --shape llama-3.2-1b --rounds 5 --out probe-preload.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--rounds", type=int, default=5, help="fresh starts per way")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from decode import bench_start_to_warm, build_and_start_once

    engine_dir, cache, _ = build_and_start_once(args.shape, "edgellm-preload-")
    starts: dict[str, list[dict]] = {"preloaded": [], "not preloaded": []}
    for _ in range(args.rounds):
        for way in starts:
            os.environ["EDGELLM_PRELOAD_LIBRARIES"] = "1" if way == "preloaded" else "0"
            starts[way].append(bench_start_to_warm(engine_dir, cache))
    os.environ.pop("EDGELLM_PRELOAD_LIBRARIES")
    args.out.write_text(json.dumps(starts, indent=1))

    def median(runs, pick):
        return statistics.median(pick(r) for r in runs)

    print(f"{args.shape}, {args.rounds} starts each, medians (s):")
    print(f"{'libraries':14s} {'to warm':>8s} {'import':>7s} {'load':>6s} {'read+verify':>12s} {'warm-up':>8s}  to warm, each")
    for way, runs in starts.items():
        each = " / ".join(f"{r['to_warm_s']:.2f}" for r in runs)
        print(f"{way:14s} {median(runs, lambda r: r['to_warm_s']):8.3f} {median(runs, lambda r: r['import_s']):7.3f} "
              f"{median(runs, lambda r: r['load_s']):6.3f} {median(runs, lambda r: r['load_stages_s']['read_verify_weights']):12.3f} "
              f"{median(runs, lambda r: r['warm_up_s']):8.3f}  {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

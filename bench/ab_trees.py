"""Decode steps of two (or more) source trees side by side: each tree's runtime and
bench/decode.py run in a fresh process of their own (code that differs in more than one
switch or kernel source, e.g. two commits), alternating the order each round.

    git archive <commit> runtime bench | tar -x -C /tmp/base      # the tree to compare with
    python3 bench/ab_trees.py --trees new=.,base=/tmp/base --shapes llama-3.2-1b,llama-3.1-8b --rounds 3 --out $OUT

The engines are written once, by this tree (their format must load in every tree). Each run
loads the engine, warms it up and measures bench/decode.py's serving-loop steps (greedy, context
512, batch 1/2/4/8) with the tree's own `bench_engine`. Prints each run, then medians over the
rounds and each tree's ratio to the last; writes ab-trees.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(tree: Path, engine_dir: Path) -> None:
    """One run: decode steps with TREE's runtime and bench, printed as one JSON line."""
    sys.path.insert(0, str(tree / "bench"))
    import decode  # puts TREE/runtime first on sys.path

    import edgellm
    from edgellm.engine.runner import Engine

    bandwidth = decode.measure_bandwidth()
    engine = Engine.load(engine_dir, device="cuda")
    engine.warm_up()
    rows = decode.bench_engine(engine, bandwidth)["decode"]
    print("RESULT " + json.dumps({"runtime": edgellm.__file__, "bandwidth_Bps": bandwidth, "rows": rows}))


def write_engines(work: Path, shapes: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "runtime"))
    import torch

    from edgellm.engine.demo_tokenizer import train_demo_tokenizer
    from edgellm.engine.random_engine import write_random_engine
    from edgellm.engine.runner import device_sm

    (work / "tok").mkdir()
    train_demo_tokenizer(work / "tok")
    sm = device_sm(torch.device("cuda"))
    for shape in shapes:
        write_random_engine(work / shape, shape, work / "tok", max_batch=8, max_seq_len=4096, target_sms=[sm], device="cuda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", default="", help="NAME=PATH,NAME=PATH[,...]: repository roots holding runtime/ and bench/")
    ap.add_argument("--shapes", default="llama-3.1-8b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--child", nargs=2, metavar=("TREE", "ENGINE_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]).resolve(), Path(args.child[1]))
        return 0
    trees = dict(item.split("=", 1) for item in args.trees.split(",") if "=" in item)
    if len(trees) < 2:
        ap.error("--trees takes NAME=PATH,NAME=PATH: at least two trees")
    for name, path in trees.items():
        if not (Path(path) / "runtime" / "edgellm").is_dir() or not (Path(path) / "bench" / "decode.py").is_file():
            ap.error(f"tree {name}={path} has no runtime/edgellm or bench/decode.py")
    shapes = args.shapes.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgellm-ab-trees-"))
    write_engines(work, shapes)
    results: dict = {shape: {name: [] for name in trees} for shape in shapes}
    for r in range(args.rounds):
        order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
        for shape in shapes:
            for name, path in order:
                run = subprocess.run([sys.executable, __file__, "--child", path, str(work / shape)],
                                     capture_output=True, text=True)
                line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
                if run.returncode or line is None:
                    print(run.stdout[-2000:], run.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"tree {name} failed on {shape} (exit {run.returncode})")
                res = json.loads(line[len("RESULT "):])
                results[shape][name].append(res)
                print(f"round {r + 1} {shape} {name} ({res['runtime']}): "
                      + " ".join(f"b{row['batch']} {row['step_ms']:.3f}" for row in res["rows"]), flush=True)
    (args.out / "ab-trees.json").write_text(json.dumps({"trees": trees, "results": results}, indent=1))
    names = list(trees)
    for shape in shapes:
        print(f"\n{shape}: ms/step, medians of {args.rounds} rounds, {' / '.join(names)}; ratio to {names[-1]}")
        for i, row in enumerate(results[shape][names[0]][0]["rows"]):
            med = [statistics.median(run["rows"][i]["step_ms"] for run in results[shape][n]) for n in names]
            print(f"  batch {row['batch']}: " + " / ".join(f"{m:.3f}" for m in med) + "   "
                  + " ".join(f"{m / med[-1]:.4f}" for m in med))
    return 0


if __name__ == "__main__":
    sys.exit(main())

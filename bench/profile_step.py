"""Where one decode step's time goes: GPU time per kernel (torch.profiler) beside the
CUDA-graph step time, on a random INT4 engine at a published shape.

    python3 bench/profile_step.py --shape llama-3.1-8b --batch 1 --out profile.json

The profiled steps run eagerly (the same kernels the graph replays, launched one by one),
so each kernel's own GPU time is exact; the graph step time minus the sum of kernel times
is what launch gaps and dependencies cost inside the graph. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runtime"))

from edgellm.engine.random_engine import write_random_engine  # noqa: E402

CONTEXT = 512
STEPS = 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from edgellm.engine.demo_tokenizer import train_demo_tokenizer
    from edgellm.engine.runner import Engine, device_sm

    work = Path(tempfile.mkdtemp(prefix="edgellm-profile-"))
    (work / "tok").mkdir()
    train_demo_tokenizer(work / "tok")
    sm = device_sm(torch.device("cuda"))
    write_random_engine(work / "engine", args.shape, work / "tok", max_batch=max(8, args.batch), max_seq_len=2048,
                        target_sms=[sm], device="cuda")
    engine = Engine.load(work / "engine", device="cuda")
    engine.warm_up()
    b = args.batch
    slots, tokens, positions = list(range(b)), [5] * b, [CONTEXT] * b
    for slot in slots:
        engine.prefill(slot, [7] * CONTEXT)

    def graph_steps(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            engine.decode(slots, tokens, positions).argmax(-1).tolist()
        return (time.perf_counter() - t0) / n

    graph_steps(10)
    graph_ms = statistics.median(graph_steps(STEPS) for _ in range(5)) * 1e3

    graphs, engine._graphs = engine._graphs, {}  # eager: the same kernels, launched one by one
    for _ in range(3):
        engine.decode(slots, tokens, positions).argmax(-1).tolist()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            engine.decode(slots, tokens, positions).argmax(-1).tolist()
        torch.cuda.synchronize()
    engine._graphs = graphs

    per_kernel: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name].append(event.time_range.elapsed_us())
    rows = []
    for name, times in per_kernel.items():
        rows.append({"kernel": name, "calls_per_step": len(times) / STEPS, "us_per_step": sum(times) / STEPS,
                     "us_per_call": statistics.median(times)})
    rows.sort(key=lambda r: -r["us_per_step"])
    kernel_ms = sum(r["us_per_step"] for r in rows) / 1e3
    launches = sum(r["calls_per_step"] for r in rows)
    result = {"shape": args.shape, "batch": b, "graph_step_ms": graph_ms, "kernel_sum_ms": kernel_ms,
              "kernels_per_step": launches, "kernels": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.shape} batch {b}: graph step {graph_ms:.3f} ms (argmax and token read-back included); "
          f"sum of kernel GPU times {kernel_ms:.3f} ms over {launches:.0f} kernels per step")
    print(f"{'us/step':>9} {'calls':>6} {'us/call':>8}  kernel")
    for r in rows[:25]:
        print(f"{r['us_per_step']:9.1f} {r['calls_per_step']:6.1f} {r['us_per_call']:8.2f}  {r['kernel'][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

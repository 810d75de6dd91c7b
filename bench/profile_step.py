"""Where one decode step's time goes: GPU time per kernel (torch.profiler) beside the
CUDA-graph step time, on a random INT4 engine at a published shape. With --prefill N, the
same for the prefill of an N-token prompt (each run's time is printed: its spread too).

    python3 bench/profile_step.py --shape llama-3.1-8b --batch 1 --out profile.json
    python3 bench/profile_step.py --shape llama-3.1-8b --prefill 512 --out profile-prefill.json
    ncu --profile-from-start off --graph-profiling node --cache-control none ... \
        python3 bench/profile_step.py --batch 4 --ncu-replays 2 --out unused.json   (bench/ncu_w4a16.sh graph:...)

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
    ap.add_argument("--prefill", type=int, default=0, help="profile the prefill of a prompt of this many tokens")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ncu-replays", type=int, default=0,
                    help="only replay the decode graph this many times between cudaProfilerStart/Stop, for ncu "
                         "--profile-from-start off (each kernel of the graph profiled with its real inputs), then exit")
    args = ap.parse_args()

    from edgellm.engine.demo_tokenizer import train_demo_tokenizer
    from edgellm.engine.runner import Engine, device_sm

    work = Path(tempfile.mkdtemp(prefix="edgellm-profile-"))
    (work / "tok").mkdir()
    train_demo_tokenizer(work / "tok")
    sm = device_sm(torch.device("cuda"))
    write_random_engine(work / "engine", args.shape, work / "tok", max_batch=max(8, args.batch), max_seq_len=4096,
                        target_sms=[sm], device="cuda")
    engine = Engine.load(work / "engine", device="cuda")
    engine.warm_up()
    if args.prefill:
        return profile_prefill(engine, args)
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

    def replays(n: int) -> float:
        """The graph alone, replayed back to back: the GPU's time per step, no host in between."""
        graph = engine._graphs[b]
        with torch.inference_mode():  # each replay advances the positions (the decode graphs do): n around CONTEXT
            engine._static_inputs[1, :b].fill_(CONTEXT - n // 2)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    if args.ncu_replays:
        graph = engine._graphs[b]
        graph.replay()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for _ in range(args.ncu_replays):
            graph.replay()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    graph_steps(10)
    graph_ms = statistics.median(graph_steps(STEPS) for _ in range(5)) * 1e3
    replay_ms = statistics.median(replays(STEPS) for _ in range(5)) * 1e3

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as graph_prof:
        replays(STEPS)
    in_graph, sequence = marginal_table(graph_prof, STEPS)

    graphs, engine._graphs = engine._graphs, {}  # eager: the same kernels, launched one by one
    for _ in range(3):
        engine.decode(slots, tokens, positions).argmax(-1).tolist()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            engine.decode(slots, tokens, positions).argmax(-1).tolist()
        torch.cuda.synchronize()
    engine._graphs = graphs

    rows = kernel_table(prof, STEPS)
    kernel_ms = sum(r["us_per_step"] for r in rows) / 1e3
    launches = sum(r["calls_per_step"] for r in rows)
    result = {"shape": args.shape, "batch": b, "graph_step_ms": graph_ms, "graph_replay_ms": replay_ms, "kernel_sum_ms": kernel_ms,
              "kernels_per_step": launches, "kernels": rows, "in_graph": in_graph,
              "in_graph_sequence": sequence}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.shape} batch {b}: graph step {graph_ms:.3f} ms (argmax and token read-back included), "
          f"{replay_ms:.3f} ms replayed back to back; sum of kernel GPU times {kernel_ms:.3f} ms over "
          f"{launches:.0f} kernels per step")
    print_table(rows)
    if in_graph:
        print("inside the graph replayed back to back: each kernel's end minus the previous kernel's end "
              "(what it adds to the step, early starts overlapped); sums to the step")
        print_table(in_graph)
        if sequence:
            print("the step's first and last kernels in order (median us: what each adds to the step, its own "
                  "duration, its start after the previous kernel's end):")
            for r in sequence[:13] + sequence[-6:]:
                print(f"  {r['position']:4d} {r['us']:8.2f} {r['own_us']:8.2f} {r['start_after_previous_end_us']:8.2f}  "
                      f"{r['kernel'][:80]}")
    else:
        print("(the profiler recorded no kernels inside the graph replays)")
    return 0


def profile_prefill(engine, args) -> int:
    """Wall time of each prefill run (synchronised), then GPU time per kernel over a few runs."""
    prompt = [7 + i % 1000 for i in range(args.prefill)]

    def run() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.prefill(0, prompt).argmax().item()
        return (time.perf_counter() - t0) * 1e3

    def first_token() -> float:  # as bench/decode.py times TTFT: prefill, then the sampler's token
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample_batch(engine.prefill(0, prompt)[None], [sampler])
        return (time.perf_counter() - t0) * 1e3

    from edgellm.engine.sampling import Sampler, SamplingParams, sample_batch

    sampler = Sampler(SamplingParams(), engine.config.vocab_size, engine.device, prompt)
    run()
    runs = [run() for _ in range(15)]
    print(f"{args.shape} prefill {args.prefill} tokens, ms per run: " + " ".join(f"{t:.1f}" for t in runs))
    first_token()
    print("prefill + sample_batch, ms per run: " + " ".join(f"{first_token():.1f}" for _ in range(7)))
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            first_token()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    rows = kernel_table(prof, steps)
    kernel_ms = sum(r["us_per_step"] for r in rows) / 1e3
    args.out.write_text(json.dumps({"shape": args.shape, "prefill_tokens": args.prefill, "runs_ms": runs,
                                    "kernel_sum_ms": kernel_ms, "kernels": rows}, indent=1))
    print(f"median {statistics.median(runs):.1f} ms; sum of kernel GPU times {kernel_ms:.1f} ms per prefill")
    print_table(rows)
    return 0


def kernel_table(prof, steps: int) -> list[dict]:
    per_kernel: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name].append(event.time_range.elapsed_us())
    rows = [{"kernel": name, "calls_per_step": len(times) / steps, "us_per_step": sum(times) / steps,
             "us_per_call": statistics.median(times)} for name, times in per_kernel.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def marginal_table(prof, steps: int) -> tuple[list[dict], list[dict]]:
    """Kernels of graph replays in the order they ended: each kernel's end minus the end of
    the kernel before it, per kernel name, and per position in the step (the step's kernels
    in order, median over steps: which projection is which). Under early starts (PDL) a
    kernel's own duration includes its wait for the previous one; this does not, and the
    rows sum to the step. Per position also the kernel's own duration (end minus start) and its
    start minus the previous kernel's end (negative: it started early, overlapping that one)."""
    kernels = sorted(((e.time_range.end, e.time_range.start, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    per_kernel: dict[str, list[float]] = collections.defaultdict(list)
    marginals = [(name, end - prev_end, end - start, start - prev_end)
                 for (prev_end, _, _), (end, start, name) in zip(kernels, kernels[1:])]
    for name, t, _, _ in marginals:
        per_kernel[name].append(t)
    rows = [{"kernel": name, "calls_per_step": len(times) / steps, "us_per_step": sum(times) / steps,
             "us_per_call": statistics.median(times)} for name, times in per_kernel.items()]
    sequence = []
    per_step = len(kernels) // steps if kernels and len(kernels) % steps == 0 else 0
    if per_step:  # position i of step s is marginals[s * per_step + i - 1] (the very first kernel has none)
        for i in range(per_step):
            at = [marginals[s * per_step + i - 1] for s in range(steps) if s * per_step + i >= 1]
            sequence.append({"position": i, "kernel": kernels[i][2], "us": statistics.median(m[1] for m in at),
                             "own_us": statistics.median(m[2] for m in at),
                             "start_after_previous_end_us": statistics.median(m[3] for m in at)})
    return sorted(rows, key=lambda r: -r["us_per_step"]), sequence


def print_table(rows: list[dict]) -> None:
    print(f"{'us/step':>9} {'calls':>6} {'us/call':>8}  kernel")
    for r in rows[:25]:
        print(f"{r['us_per_step']:9.1f} {r['calls_per_step']:6.1f} {r['us_per_call']:8.2f}  {r['kernel'][:110]}")


if __name__ == "__main__":
    sys.exit(main())

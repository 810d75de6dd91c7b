"""W4A16 kernel sources side by side, per shape and M, in one process: each round times every
source on every shape in turn (bench/kernels.py's method: CUDA-graph medians over more weight
copies than L2 holds, the configuration pick_config chooses), so that clock drift falls on
every source alike. First prints how far each source's output lies from the first's; then each
round, then medians over the rounds and each source's ratio to the first's; writes
ab-kernels.json under --out.

    python3 bench/ab_kernels.py --sources current,bench/_w4a16_variant.py --shapes "8B gate_up,1B down" --m 1,4

A source is "current" (the runtime's own) or a copy of w4a16_source.py whose SOURCE has the same
entries and arguments (bench/kernel_source.py), compiled with NVRTC on first use.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_source import use_kernel_source  # noqa: E402
from kernels import L2_BYTES, SHAPES, bench_mma, print_medians, random_weights, read_bandwidth, w4_bytes  # noqa: E402
from edgellm.engine.kernels import sm_count, w4a16_cuda  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", required=True, help="current,PATH[,...]: the kernel sources to compare")
    ap.add_argument("--shapes", default=",".join(name for name, _, _ in SHAPES), help="names as in bench/kernels.py")
    ap.add_argument("--m", default="1,4", help="rows of x")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args()
    sources = args.sources.split(",")
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    if len(sources) < 2 or not shapes:
        ap.error(f"--sources needs at least two sources and --shapes some of: {', '.join(s[0] for s in SHAPES)}")
    ms = [int(v) for v in args.m.split(",")]
    g = args.group_size
    ok, why = w4a16_cuda.available()
    if not ok:
        print(f"the tensor-core kernel is not available here: {why}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    read_bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: read-only bandwidth {read_bw:.0f} GB/s", flush=True)
    weights = {}
    for name, n, k in shapes:
        copies = random_weights(n, k, g, max(2, math.ceil(3 * L2_BYTES / w4_bytes(1, n, k, g))), gen)
        weights[name] = [w4a16_cuda.MmaWeights.from_rowpacked(qw, s, z, g) for qw, s, z in copies]
        del copies
    # Each source's output against the first's on the same x (printed, not asserted: a variant made
    # for timing only, with the arithmetic taken out, is expected to differ).
    xs = {m: torch.randn(m, max(k for _, _, k in shapes), device="cuda", generator=gen).half() for m in ms}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for src in sources:
        use_kernel_source(src)
        outputs[src] = {f"{name} M={m}": w4a16_cuda.w4a16_mma_linear(xs[m][:, :k].contiguous(), weights[name][0]).float()
                        for name, n, k in shapes for m in ms}
    errors = {src: {key: ((out - outputs[sources[0]][key]).abs().max() / outputs[sources[0]][key].abs().max()).item()
                    for key, out in outputs[src].items()} for src in sources[1:]}
    for src in sources[1:]:
        worst = max(errors[src], key=errors[src].get)
        print(f"{src} against {sources[0]}: max relative difference {errors[src][worst]:.2e} ({worst})", flush=True)
    del outputs
    times: dict[str, dict[str, list[float]]] = {}  # [shape and M][source]
    for r in range(args.rounds):
        for src in sources:
            use_kernel_source(src)
            for name, n, k in shapes:
                for m in ms:
                    t = bench_mma(m, n, k, g, weights[name], gen)
                    times.setdefault(f"{name} M={m}", {}).setdefault(src, []).append(t)
                    print(f"round {r + 1} {src}: {name} M={m} {t:.2f} us", flush=True)
    use_kernel_source("current")
    rows = []
    sms, shared_limit = sm_count(torch.device("cuda")), w4a16_cuda.max_shared_bytes(torch.cuda.current_device())
    medians = print_medians(times, sources, [Path(s).stem for s in sources], shapes, ms, g, read_bw, args.rounds)
    for name, n, k in shapes:
        for m in ms:
            key = f"{name} M={m}"
            rows.append(dict(shape=name, N=n, K=k, M=m, config=w4a16_cuda.pick_config(n, k, sms, m, shared_limit, g == 64).__dict__,
                             us=times[key], median_us=dict(zip(sources, medians[key])),
                             max_rel_diff={s: errors[s][key] for s in sources[1:]}))
    (args.out / "ab-kernels.json").write_text(json.dumps(dict(read_gbps=read_bw, sources=sources, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

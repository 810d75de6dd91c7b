"""The bulk-streamed W4A16 kernel beside the ring kernel, per shape and M, in one process (SM 9.0+).

Each round times, per shape and M, the ring kernel (pick_config's choice) and the bulk kernel under
each setting of --bulk (blocks per SM : stage cap [: fewest K splits]), in turn (bench/kernels.py's method: CUDA-graph
medians over more weight copies than L2 holds), so that clock drift falls on all alike. First
prints each kernel's relative error against the dequantized fp32 product; then each round, then
medians, ratios to the ring kernel and % of the read-only bandwidth; writes ab-bulk.json under --out.

    python3 bench/ab_bulk.py --shapes "8B gate_up,8B down" --m 1,4 --bulk 2:12,1:16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import L2_BYTES, SHAPES, bench_mma, print_medians, random_weights, read_bandwidth, w4_bytes  # noqa: E402
from edgellm.engine.kernels import sm_count, w4a16_cuda  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(name for name, _, _ in SHAPES), help="names as in bench/kernels.py")
    ap.add_argument("--m", default="1,4,8", help="rows of x")
    ap.add_argument("--bulk", default="2:12,1:16", help="bulk settings, BLOCKS_PER_SM:MAX_STAGES[:MIN_SPLIT][,...]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args()
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    if not shapes:
        ap.error(f"--shapes takes some of: {', '.join(s[0] for s in SHAPES)}")
    ms = [int(v) for v in args.m.split(",")]
    settings = [tuple(int(v) for v in s.split(":")) for s in args.bulk.split(",")]
    g = args.group_size
    ok, why = w4a16_cuda.available()
    if not ok or torch.cuda.get_device_capability()[0] < 9:
        print(f"the bulk kernel needs SM 9.0+ and the tensor-core kernels: {why or 'SM < 9.0'}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    sms, dev = sm_count(device), torch.cuda.current_device()
    sm_shared, block_limit = w4a16_cuda.shared_bytes_per_sm(dev), w4a16_cuda.max_shared_bytes(dev)
    gen = torch.Generator(device="cuda").manual_seed(0)
    read_bw = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, read-only bandwidth {read_bw:.0f} GB/s", flush=True)

    def configs(n, k, m):
        out = {"ring": w4a16_cuda.pick_config(n, k, sms, m, block_limit, g == 64)}
        for setting in settings:
            out["bulk " + ":".join(map(str, setting))] = w4a16_cuda.pick_bulk_config(n, k, sms, m, sm_shared, *setting)
        return out

    weights, rows = {}, []
    for name, n, k in shapes:
        copies = random_weights(n, k, g, max(2, math.ceil(3 * L2_BYTES / w4_bytes(1, n, k, g))), gen)
        weights[name] = [w4a16_cuda.MmaWeights.from_rowpacked(qw, s, z, g) for qw, s, z in copies]
        qw, s, z = copies[0]
        shifts = 4 * torch.arange(8, device="cuda", dtype=torch.int32)
        q = ((qw.unsqueeze(-1) >> shifts) & 0xF).view(n, k).float()
        dense = ((q.view(n, k // g, g) - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1)).view(n, k)
        del copies
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=gen).half()
            ref = x.float() @ dense.t()
            for label, cfg in configs(n, k, m).items():
                out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
                w4a16_cuda.w4a16_mma_linear(x, weights[name][0], out=out, config=cfg)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                print(f"{name} M={m} {label} {cfg}: rel err {err:.2e}", flush=True)
        del dense, q
    times: dict[str, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for name, n, k in shapes:
            for m in ms:
                for label, cfg in configs(n, k, m).items():
                    t = bench_mma(m, n, k, g, weights[name], gen, cfg)
                    times.setdefault(f"{name} M={m}", {}).setdefault(label, []).append(t)
                    print(f"round {r + 1}: {name} M={m} {label} {t:.2f} us", flush=True)
    labels = ["ring"] + ["bulk " + ":".join(map(str, setting)) for setting in settings]
    medians = print_medians(times, labels, labels, shapes, ms, g, read_bw, args.rounds)
    for name, n, k in shapes:
        for m in ms:
            key = f"{name} M={m}"
            rows.append(dict(shape=name, N=n, K=k, M=m, us=times[key], median_us=dict(zip(labels, medians[key])),
                             configs={lab: str(c) for lab, c in configs(n, k, m).items()}))
    (args.out / "ab-bulk.json").write_text(json.dumps(dict(read_gbps=read_bw, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The LM head alone: the final norm + cuBLAS GEMM the step ran before, beside the fused Triton
kernel (kernels/lm_head.py) under each candidate configuration.

    PYTHONPATH=runtime python3 bench/lm_head.py --out lm_head.json [--configs 128x128x4x4 64x256x3x4 ...]

At the vocabulary and hidden sizes of Llama-3.2-1B and Llama-3.1-8B (128256 x 2048 / 4096 fp16) and
1, 2, 4 and 8 rows: medians of CUDA-graph replays (launched with early start, as the decode graph
launches them), the weight bytes over the time against the read-only and the copy bandwidth
measured first, and each configuration's largest relative error against an fp32 reference.
Prints a table last, writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from kernels import copy_bandwidth, graph_time_us, read_bandwidth  # noqa: E402  (bench/kernels.py)

from edgellm.engine.kernels import fused, lm_head  # noqa: E402

SHAPES = [("1B", 128256, 2048), ("8B", 128256, 4096)]
ROWS = [1, 2, 4, 8]
CONFIGS = ["128x128x4x4", "128x128x3x4", "128x128x4x8", "64x128x4x4", "64x128x6x4", "64x256x3x4", "64x256x4x4",
           "128x64x6x4", "128x256x3x8", "256x64x4x8", "256x128x3x8", "32x256x4x4"]
EPS = 1e-5


def reference(x, g, w):
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * g.float()).half()
    return F.linear(normed.float(), w.float())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="BLOCK_NxBLOCK_KxSTAGESxWARPS each")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--out", type=Path, default=Path("lm_head.json"))
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    copy_bw, read_bw = copy_bandwidth(), read_bandwidth()
    print(f"copy bandwidth {copy_bw:.0f} GB/s (read + written), read-only {read_bw:.0f} GB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for shape, v, k in SHAPES:
        w = (torch.randn(v, k, device="cuda", generator=gen) * 0.02).half()
        g = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).half()
        weight_bytes = v * k * 2
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", generator=gen).half()
            ref = reference(x, g, w)
            rows = [("norm + cuBLAS (before)", lambda x=x, g=g, w=w: F.linear(fused.add_rms_norm(x, None, g, EPS)[0], w), None),
                    ("cuBLAS alone", lambda x=x, w=w: F.linear(x, w), None)]
            for cfg in args.configs:
                rows.append((f"fused {cfg}", lambda x=x, g=g, w=w: lm_head.lm_head(x, None, g, EPS, w), cfg))
            for name, call, cfg in rows:
                if cfg is not None:
                    os.environ["EDGELLM_LM_HEAD_CONFIG"] = cfg
                try:
                    err = None
                    if cfg is not None:
                        got = call().float()
                        err = ((got - ref).abs().max() / ref.abs().max()).item()
                    t = graph_time_us([call] * 10, reps=15)
                except Exception as e:  # a configuration the compiler or the GPU refuses: say so, go on
                    print(f"{shape} M={m} {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                finally:
                    os.environ.pop("EDGELLM_LM_HEAD_CONFIG", None)
                row = {"shape": shape, "rows": m, "method": name, "us": t, "read_pct": 100 * weight_bytes / (t * 1e3) / read_bw,
                       "copy_pct": 100 * weight_bytes / (t * 1e3) / copy_bw, "rel_err": err}
                results.append(row)
                print(f"{shape} M={m} {name:<24} {t:8.1f} us  {row['read_pct']:5.1f}% read  "
                      f"{row['copy_pct']:5.1f}% copy" + (f"  rel err {err:.1e}" if err is not None else ""), flush=True)
        del w
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"copy_GBps": copy_bw, "read_GBps": read_bw, "device": torch.cuda.get_device_name(),
                                    "results": results}, indent=1))
    print(f"\n{'shape':<5} {'M':>2} {'before us':>10} {'best fused':>12} {'us':>8} {'ratio':>6} {'read %':>7}")
    for shape, _, _ in SHAPES:
        for m in rows_list:
            mine = [r for r in results if r["shape"] == shape and r["rows"] == m]
            before = next((r for r in mine if r["method"].startswith("norm")), None)
            fused_rows = [r for r in mine if r["method"].startswith("fused")]
            if before and fused_rows:
                best = min(fused_rows, key=lambda r: r["us"])
                print(f"{shape:<5} {m:>2} {before['us']:>10.1f} {best['method'][6:]:>12} {best['us']:>8.1f} "
                      f"{best['us'] / before['us']:>6.3f} {best['read_pct']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is the W4A16 kernel's cost at M > 1 the rows of x? Times each decode shape with M distinct
rows of x beside the same row repeated M times (a stride-0 view: the kernel does the same
mma work, but every block reads one row of x from L2 instead of M). Prints one line per
shape and M. GPU only; CUDA-graph medians as bench/kernels.py times them.

    PYTHONPATH=runtime python3 bench/x_rows_probe.py
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402  (bench/kernels.py: weights, graph timing)

from edgellm.engine.kernels import w4a16_cuda  # noqa: E402

SHAPES = [("8B gate_up", 28672, 4096), ("8B down", 4096, 14336), ("8B qkv", 6144, 4096)]

gen = torch.Generator(device="cuda").manual_seed(0)
for name, n, k in SHAPES:
    # Enough weight copies that L2 cannot hold them: each call reads its weights from memory.
    copies = kb.random_weights(n, k, 128, max(2, math.ceil(3 * kb.L2_BYTES / kb.w4_bytes(1, n, k, 128))), gen)
    weights = [w4a16_cuda.MmaWeights.from_rowpacked(qw, s, z, 128) for qw, s, z in copies]
    for m in (1, 2, 4, 8):
        distinct = torch.randn(m, k, device="cuda", generator=gen).half()
        repeated = distinct[:1].expand(m, k)
        times = []
        for x in (distinct, repeated):
            out = torch.empty(m, n, dtype=torch.float16, device="cuda")
            calls = [lambda w=w, x=x: w4a16_cuda.w4a16_mma_linear(x, w, out=out) for w in weights * 4]
            times.append(kb.graph_time_us(calls))
        print(f"{name} M={m}: distinct rows {times[0]:6.2f} us, one row repeated {times[1]:6.2f} us", flush=True)
    del copies, weights
    torch.cuda.empty_cache()

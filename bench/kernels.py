"""Microbenchmark of the decode kernels: W4A16 linear and decode attention.

    PYTHONPATH=runtime python3 bench/kernels.py --out kernels.json [--sweep]
    ncu ... python3 bench/kernels.py --ncu-target gemv1   # one kernel, a few launches

First measures device-to-device copy bandwidth (bytes read + written), the ceiling every
kernel here is held to. Then, for each weight shape and M, the W4A16 time of the path
engines take (the tensor-core kernel of w4a16_cuda.py where NVRTC is usable) and its share
of that bandwidth (bytes = qweight + scales + zeros + x + out), beside the Triton kernels
(the fallback path) and cuBLAS on the same shape with fp16 weights. A read-only reduction gives the read ceiling as well (cuBLAS GEMV
reads faster than the copy's read + write figure). Times are medians of CUDA-graph
replays (as the engine runs decode), each replay cycling through enough weight copies
that L2 (50 MB on an H100) cannot serve them. --sweep also times the candidate configurations the fixed table in
w4a16.pick_config was chosen from. Prints a table last, writes everything as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from edgellm.engine.kernels import decode_attention as attn  # noqa: E402
from edgellm.engine.kernels import pdl, w4a16, w4a16_cuda  # noqa: E402

# (name, N, K): Llama-3.2-1B and Llama-3.1-8B projections (qkv and gate|up fused)
SHAPES = [
    ("1B qkv", 3072, 2048),
    ("1B o", 2048, 2048),
    ("1B gate_up", 16384, 2048),
    ("1B down", 2048, 8192),
    ("8B qkv", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B gate_up", 28672, 4096),
    ("8B down", 4096, 14336),
]
DECODE_M = [1, 2, 3, 4, 8]
PREFILL_M = [16, 77, 512]
PREFILL_SHAPES = ("1B qkv", "8B o", "8B gate_up")
SWEEP_SHAPES = ("1B qkv", "8B o", "8B gate_up", "8B down")
L2_BYTES = 50 * 2**20


def graph_time_us(calls, reps: int = 20) -> float:
    """Median time of one call: a CUDA graph runs `calls` (a list of thunks) back to back,
    launched as the engine's decode graphs launch them (early start where enabled)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with pdl.early_starts():  # launched as in the engine's decode graphs
        with torch.cuda.stream(stream):
            for c in calls[: min(3, len(calls))]:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth() -> float:
    n = 2**30 // 2  # 1 GiB of fp16
    a = torch.randn(n, device="cuda", dtype=torch.float16)
    b = torch.empty_like(a)
    t = graph_time_us([lambda: b.copy_(a)] * 10, reps=10)
    del a, b
    return 2 * n * 2 / (t * 1e-6) / 1e9  # GB/s, read + written


def read_bandwidth() -> float:
    """A reduction over 1 GiB: what a kernel that only reads can expect."""
    a = torch.randn(2**29, device="cuda", dtype=torch.float16)
    t = graph_time_us([lambda: a.sum(dtype=torch.float32)] * 10, reps=10)
    del a
    return 2**30 / (t * 1e-6) / 1e9


def random_weights(n: int, k: int, g: int, copies: int, gen: torch.Generator):
    """Random packed weights (all nibble values), small positive scales, integer zeros."""
    out = []
    for _ in range(copies):
        qweight = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda", generator=gen)
        scales = (torch.rand(n, k // g, device="cuda", generator=gen) * 0.01 + 0.001).half()
        zeros = torch.randint(0, 16, (n, k // g), device="cuda", generator=gen).half()
        out.append((qweight, scales, zeros))
    return out


def w4_bytes(m: int, n: int, k: int, g: int) -> int:
    return n * k // 2 + 2 * n * (k // g) * 2 + m * k * 2 + m * n * 2


def print_medians(times: dict, columns: list[str], headers: list[str], shapes, ms, g: int, read_bw: float,
                  rounds: int, width: int = 26) -> dict[str, list[float]]:
    """The A/B scripts' table: per shape and M (key "NAME M=m"), the median over the rounds of each
    column's times (times[key][column], us), its ratio to the first column's and its % of the
    read-only bandwidth (GB/s). Returns the medians by key, in column order."""
    print(f"\nmedians over {rounds} rounds, us (ratio to {headers[0]}; % of the read-only bandwidth):")
    print(f"{'shape':18s} " + " ".join(f"{h:>{width}s}" for h in headers))
    medians = {}
    for name, n, k in shapes:
        for m in ms:
            key = f"{name} M={m}"
            med = medians[key] = [statistics.median(times[key][c]) for c in columns]
            cells = [f"{t:7.2f} ({t / med[0]:.3f}) {100 * w4_bytes(m, n, k, g) / t / 1e3 / read_bw:4.0f}%" for t in med]
            print(f"{key:18s} " + " ".join(f"{c:>{width}s}" for c in cells))
    return medians


def candidates(m: int, n: int, k: int, g: int, sms: int):
    """Configurations the table is chosen from (--sweep)."""
    C = w4a16.W4A16Config
    split = w4a16._split_for
    out = []
    if m <= 16:
        if m <= 4:
            bm = 1 if m == 1 else 2 if m == 2 else 4
            # Tile shapes: rows per program x K per iteration (longer contiguous row segments
            # per warp at larger BK), warps, programs per SM (split K), prefetch.
            for bn, bk, warps in ((64, 128, 4), (128, 128, 8), (32, 256, 4), (16, 512, 4), (32, 512, 8), (64, 256, 8)):
                out.append(C("gemv", bm, bn, bk, split(w4a16.cdiv(n, bn), w4a16.cdiv(k, bk), sms, waves=4), warps, 1))
        for waves in (1, 2):
            out.append(C("mma", 16, 64, 128, split(w4a16.cdiv(n, 64), w4a16.cdiv(k, 128), sms, waves=waves), 4, 3))
            out.append(C("mma", 16, 128, 128, split(w4a16.cdiv(n, 128), w4a16.cdiv(k, 128), sms, waves=waves), 8, 3))
    else:
        out += [C("mma", 64, 64, 128, 1, 4, 3), C("mma", 128, 128, 64, 1, 8, 3), C("dense")]
    return list(dict.fromkeys(out))


def bench_w4a16(m, n, k, g, copies, cfg, gen):
    xs = [torch.randn(m, k, device="cuda", generator=gen).half() for _ in range(2)]
    outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(2)]
    calls = []
    for i in range(max(len(copies) * 2, 8)):
        qw, s, z = copies[i % len(copies)]
        x, o = xs[i % 2], outs[i % 2]
        calls.append(lambda qw=qw, s=s, z=z, x=x, o=o: w4a16.w4a16_linear(x, qw, s, z, g, config=cfg, out=o))
    return graph_time_us(calls)


def bench_mma(m, n, k, g, copies, gen, cfg=None):
    """The tensor-core kernel on weights in its own layout (MmaWeights copies)."""
    xs = [torch.randn(m, k, device="cuda", generator=gen).half() for _ in range(2)]
    outs = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(2)]
    calls = []
    for i in range(max(len(copies) * 2, 8)):
        w, x, o = copies[i % len(copies)], xs[i % 2], outs[i % 2]
        calls.append(lambda w=w, x=x, o=o: w4a16_cuda.w4a16_mma_linear(x, w, out=o, config=cfg))
    return graph_time_us(calls)


def mma_candidates(n: int, k: int, sms: int, m: int, g: int):
    """Tensor-core kernel configurations (--sweep-mma): the chosen one with and without early
    start (programmatic dependent launch), then each K split and ring depth, with one tile per
    block and (up to 8 rows) two."""
    C = w4a16_cuda.MmaConfig
    chosen = w4a16_cuda.pick_config(n, k, sms, m, w4a16_cuda.max_shared_bytes(torch.cuda.current_device()), g == 64)
    out = [chosen, dataclasses.replace(chosen, early_start=False)]
    out += [C(warps, stages) for warps in (2, 4, 8, 16) for stages in (4, 5, 8)
            if k // 128 >= 2 * warps and (w4a16_cuda.block_threads(warps), stages) in w4a16_cuda.BLOCK_SHAPES]
    if m <= 8:
        out += [C(warps, stages, tiles=2) for warps in (4, 8, 16) for stages in (3, 4)
                if k // 128 >= 2 * warps and (w4a16_cuda.block_threads(warps), stages) in w4a16_cuda.TWO_TILE_SHAPES]
    return list(dict.fromkeys(out))


def bench_cublas(m, n, k, gen):
    copies = max(2, math.ceil(3 * L2_BYTES / (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", generator=gen).half() for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    calls = [lambda w=w: torch.matmul(x, w.t()) for w in ws * 4]
    t = graph_time_us(calls)
    del ws
    return t, n * k * 2 + m * k * 2 + m * n * 2


# (name, Hq, Hkv, D) of decode_attention_rope at the engines' shapes
ATTENTION_SHAPES = [("8B", 32, 8, 128), ("1B", 32, 8, 64)]


def bench_attention(gen, bw, batches, seq_lens, splits_factors, min_chunks, s_max: int = 4096) -> list[dict]:
    """decode_attention_rope (the engine's decode attention: rope, KV write, split attention
    and merge) per shape, batch and context, at pick_splits' choice and at that choice times
    each of `splits_factors`, each with chunks of at least each of `min_chunks` positions (0: one
    tile). Bytes = the K and V read + q|k|v in + out."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, hq, hkv, d in ATTENTION_SHAPES:
        cos = torch.rand(s_max, d, device="cuda", generator=gen)
        sin = torch.rand(s_max, d, device="cuda", generator=gen)
        for b in batches:
            for seq in seq_lens:
                read = 2 * b * hkv * seq * d * 2
                copies = max(2, math.ceil(3 * L2_BYTES / read))
                caches = [(torch.randn(b, hkv, s_max, d, device="cuda", generator=gen).half(),
                           torch.randn(b, hkv, s_max, d, device="cuda", generator=gen).half()) for _ in range(copies)]
                qkv = torch.randn(b, (hq + 2 * hkv) * d, device="cuda", generator=gen).half()
                slots = torch.arange(b, device="cuda")
                positions = torch.full((b,), seq - 1, device="cuda")
                counters = torch.zeros(b * hkv, dtype=torch.int32, device="cuda")
                picked = attn.pick_splits(b, hkv, s_max, sms, attn._tiles(hq, hkv, d)[2], d)
                for factor in [1.0] + [f for f in splits_factors if f != 1.0]:
                    for min_chunk in [0] + [c for c in min_chunks if c]:
                        splits = max(1, round(picked * factor))
                        calls = [lambda kc=kc, vc=vc, n=splits, mc=min_chunk or None: attn.decode_attention_rope(
                            qkv, positions, slots, cos, sin, kc, vc, hq, hkv, d ** -0.5, counters, splits=n, min_chunk=mc)
                            for kc, vc in caches * max(1, 30 // copies)]
                        t = graph_time_us(calls)
                        nbytes = read + b * (hq + 2 * hkv) * d * 2 + b * hq * d * 2
                        picked_now = factor == 1.0 and not min_chunk
                        rows.append(dict(shape=name, B=b, Hq=hq, Hkv=hkv, D=d, S_max=s_max, seq_len=seq, splits=splits,
                                         min_chunk=min_chunk, picked=picked_now, us=t, bytes=nbytes,
                                         pct_bw=100 * nbytes / t / 1e3 / bw))
                        print(f"  attention {name} B={b} seq {seq} splits {splits:3d} min chunk {min_chunk:4d}"
                              f"{' (picked)' if picked_now else '         '}: {t:6.2f} us {rows[-1]['pct_bw']:5.1f}% bw",
                              flush=True)
                del caches
                torch.cuda.empty_cache()
    return rows


def ncu_target(which: str, g: int, sms: int) -> None:
    """A few launches of one kernel for ncu: "gemv1" / "mma8" (Triton, 8B gate_up), or
    mma:SHAPE:M for the tensor-core kernel (e.g. "mma:8B down:1")."""
    if ":" in which:
        _, shape, m = which.split(":")
        n, k = next((n, k) for name, n, k in SHAPES if name == shape)
        m = int(m)
        gen = torch.Generator(device="cuda").manual_seed(0)
        (qw, s, z), = random_weights(n, k, g, 1, gen)
        w = w4a16_cuda.MmaWeights.from_rowpacked(qw, s, z, g)
        x = torch.randn(m, k, device="cuda", generator=gen).half()
        cfg = w4a16_cuda.pick_config(n, k, sms, m, w4a16_cuda.max_shared_bytes(torch.cuda.current_device()), g == 64)
        print(which, cfg)
        for _ in range(5):
            w4a16_cuda.w4a16_mma_linear(x, w, config=cfg)
        torch.cuda.synchronize()
        return
    n, k = 28672, 4096
    m = 1 if which == "gemv1" else 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    (qw, s, z), = random_weights(n, k, g, 1, gen)
    x = torch.randn(m, k, device="cuda", generator=gen).half()
    cfg = w4a16.pick_config(m, n, k, g, sms)
    print(which, cfg)
    for _ in range(5):
        w4a16.w4a16_linear(x, qw, s, z, g, config=cfg)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON results path")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="also time the candidate configurations")
    ap.add_argument("--sweep-shapes", default=",".join(SWEEP_SHAPES), help="shapes to sweep (names as in SHAPES)")
    ap.add_argument("--sweep-m", default="1,2,3,4,8", help="M values to sweep")
    ap.add_argument("--sweep-kinds", default="", help="only these Triton kernel kinds in the sweep (e.g. gemv,mma)")
    ap.add_argument("--sweep-mma", action="store_true", help="time the tensor-core kernel's K splits and ring depths "
                    "on the sweep shapes and M values")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--attention-only", action="store_true", help="only the decode attention table")
    ap.add_argument("--attention-batches", default="1,2,4,8")
    ap.add_argument("--attention-seq", default="512,4096", help="context lengths for the attention table")
    ap.add_argument("--attention-splits", default="0.5,2",
                    help="also time the attention at pick_splits' choice times these factors")
    ap.add_argument("--attention-min-chunks", default="128,256", help="also time the attention with these least chunks")
    ap.add_argument("--ncu-target", help="only run one kernel a few times (for ncu): gemv1, mma8 or mma:SHAPE:M")
    ap.add_argument("--w4a16-source", help="time the tensor-core kernels of this copy of w4a16_source.py instead "
                    "(bench/kernel_source.py)")
    args = ap.parse_args()
    if args.w4a16_source:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernel_source import use_kernel_source

        use_kernel_source(args.w4a16_source)
    g = args.group_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    t0 = time.time()
    if args.ncu_target:
        return ncu_target(args.ncu_target, g, sms)
    if not args.out:
        ap.error("--out is required")
    bw = copy_bandwidth()
    read_bw = read_bandwidth()
    print(f"device {props.name}, {sms} SMs; copy bandwidth (read + write) {bw:.0f} GB/s; "
          f"read-only (sum) {read_bw:.0f} GB/s", flush=True)
    mma_ok, why = w4a16_cuda.available()
    print(f"tensor-core W4A16 kernel (NVRTC): {'yes' if mma_ok else 'no: ' + why}", flush=True)
    result = dict(device=props.name, sms=sms, copy_gbps=bw, read_gbps=read_bw, group_size=g, decode=[], prefill=[],
                  sweep=[], attention=[])

    for name, n, k in [] if args.attention_only else SHAPES:
        wbytes = w4_bytes(1, n, k, g)
        copies = random_weights(n, k, g, max(2, math.ceil(3 * L2_BYTES / wbytes)), gen)
        mma_copies = [w4a16_cuda.MmaWeights.from_rowpacked(qw, s, z, g) for qw, s, z in copies] if mma_ok else None
        for m in DECODE_M + ([] if args.no_prefill else PREFILL_M):
            if m not in DECODE_M and name not in PREFILL_SHAPES:
                continue
            cfg = w4a16.pick_config(m, n, k, g, sms)
            if args.sweep and name in args.sweep_shapes.split(",") and str(m) in args.sweep_m.split(","):
                for cand in candidates(m, n, k, g, sms):
                    if args.sweep_kinds and cand.kind not in args.sweep_kinds.split(","):
                        continue
                    try:
                        t = bench_w4a16(m, n, k, g, copies, cand, gen)
                    except Exception as e:  # a candidate that does not compile is reported, not fatal
                        print(f"  sweep {name} M={m} {cand}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    result["sweep"].append(dict(shape=name, N=n, K=k, M=m, config=cand.__dict__, us=t))
                    shape = (f"bm{cand.block_m} bn{cand.block_n} bk{cand.block_k} split{cand.split_k} "
                             f"w{cand.num_warps} s{cand.num_stages}")
                    print(f"  sweep {name} M={m} {cand.kind} {shape}: {t:.1f} us", flush=True)
            if (args.sweep_mma and mma_ok and name in args.sweep_shapes.split(",")
                    and str(m) in args.sweep_m.split(",")):
                for cand in mma_candidates(n, k, sms, m, g):
                    try:
                        t = bench_mma(m, n, k, g, mma_copies, gen, cand)
                    except ValueError as e:  # e.g. more shared memory than this GPU has
                        print(f"  sweep {name} M={m} {cand}: skipped: {e}", flush=True)
                        continue
                    result["sweep"].append(dict(shape=name, N=n, K=k, M=m, config=cand.__dict__, us=t))
                    print(f"  sweep {name} M={m} warps {cand.warps} stages {cand.stages} tiles {cand.tiles} "
                          f"early start {cand.early_start}: {t:.1f} us "
                          f"{100 * w4_bytes(m, n, k, g) / t / 1e3 / bw:5.1f}% bw", flush=True)
            t_triton = bench_w4a16(m, n, k, g, copies, cfg, gen)
            t = bench_mma(m, n, k, g, mma_copies, gen) if mma_ok else t_triton
            nbytes = w4_bytes(m, n, k, g)
            tc, cbytes = bench_cublas(m, n, k, gen)
            row = dict(shape=name, N=n, K=k, M=m, path="mma" if mma_ok else "triton", us=t, triton_config=cfg.__dict__,
                       triton_us=t_triton, bytes=nbytes, gbps=nbytes / t / 1e3, pct_bw=100 * nbytes / t / 1e3 / bw,
                       cublas_us=tc, cublas_pct_bw=100 * cbytes / tc / 1e3 / bw, floor_us=nbytes / bw / 1e3)
            result["decode" if m in DECODE_M else "prefill"].append(row)
            print(f"{name:11s} M={m:<3d} {row['path']:6s} {t:8.1f} us  {row['pct_bw']:5.1f}% bw   "
                  f"Triton {cfg.kind} {t_triton:8.1f} us   cuBLAS fp16 {tc:8.1f} us", flush=True)
        del copies, mma_copies
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive a timeout

    floats = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    result["attention"] = bench_attention(gen, bw, [int(v) for v in floats(args.attention_batches)],
                                          [int(v) for v in floats(args.attention_seq)], floats(args.attention_splits),
                                          [int(v) for v in floats(args.attention_min_chunks)])
    result["seconds"] = time.time() - t0
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"\ncopy bandwidth {bw:.0f} GB/s (read + write), read-only {read_bw:.0f} GB/s; W4A16 group size {g}; "
          "times are CUDA-graph medians; %bw = bytes / time / copy bandwidth")
    if result["decode"]:
        print(f"engine path: {result['decode'][0]['path']}; in brackets: the Triton kernels (fallback) on the same shape")
        print(f"{'shape':11s} {'N':>6s} {'K':>6s} | " + " | ".join(f"M={m}: us   %bw (Triton)" for m in DECODE_M)
              + " | cuBLAS M=1 %bw")
        for name, n, k in SHAPES:
            rows = {r["M"]: r for r in result["decode"] if r["shape"] == name}
            cells = " | ".join(f"{rows[m]['us']:7.1f} {rows[m]['pct_bw']:5.1f} ({rows[m]['triton_us']:5.1f})" for m in DECODE_M)
            print(f"{name:11s} {n:6d} {k:6d} | {cells} | {rows[1]['cublas_pct_bw']:5.1f}")
    if result["prefill"]:
        print("prefill:", "; ".join(f"{r['shape']} M={r['M']} {r['us']:.0f} us (Triton {r['triton_us']:.0f}, "
                                    f"cuBLAS fp16 {r['cublas_us']:.0f})" for r in result["prefill"]))
    print("decode attention (rope + KV write + splits + merge, one kernel), us at pick_splits' choice "
          "[the fastest measured: us]:")
    for r in result["attention"]:
        if r["picked"]:
            same = [o for o in result["attention"] if (o["shape"], o["B"], o["seq_len"]) == (r["shape"], r["B"], r["seq_len"])]
            best = min(same, key=lambda o: o["us"])
            print(f"  {r['shape']} B={r['B']} seq {r['seq_len']:5d}: splits {r['splits']:3d} {r['us']:6.2f} us "
                  f"{r['pct_bw']:5.1f}% bw   [{best['splits']} splits, min chunk {best['min_chunk']}: {best['us']:.2f}]")


if __name__ == "__main__":
    main()

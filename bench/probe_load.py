"""Where an engine load's read-and-verify and its warm-up go, piece by piece, on the GPU.

    python3 bench/probe_load.py --shape llama-3.2-1b --out probe-load.json

Builds a random INT4 engine at the shape, starts once to fill the kernel caches (as
bench/decode.py does), then in a second fresh process loads the engine and times, each on
its own: pinning the staging buffers, reading the file with the loader's threads, hashing it,
copying it to the GPU from pinned and from pageable memory, load_weights with and without
verification; then the warm-up, with the runner's CUDA-graph capture or the torch.cuda.graph
capture it replaced, each in --rounds fresh processes taken in turn (medians printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT / "bench"))

PROBE = r"""
import json, os, sys, time, hashlib
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, os.environ["EDGELLM_RUNTIME"])
t0 = time.perf_counter()
import torch
from edgellm.engine.runner import Engine
from edgellm.engine import weights as W
from edgellm.engine.manifest import read_manifest, hash_threads, chunk_spans, read_into, CHUNK_SIZE
t_import = time.perf_counter() - t0
engine_dir = sys.argv[1]
engine = Engine.load(engine_dir, device="cuda")
torch.cuda.synchronize()
out = {"import_s": t_import, "load_stages_s": engine.load_timings}
path = os.path.join(engine_dir, W.WEIGHTS_NAME)
size = os.path.getsize(path)
threads = hash_threads()
spans = chunk_spans(size, CHUNK_SIZE)
out.update(size_bytes=size, threads=threads, chunks=len(spans))

def timed(name, fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    out[name] = time.perf_counter() - t
    return r

def pin():
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: torch.empty(CHUNK_SIZE, dtype=torch.uint8, pin_memory=True), range(threads)))
W._release_pinned_staging()
staging = timed("pin_staging_s", pin)
buf = bytearray(size)
view = memoryview(buf)
fd = os.open(path, os.O_RDONLY)
def read_all():
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: read_into(fd, view[s[0]:s[1]], s[0]), spans))
timed("read_file_s", read_all)
os.close(fd)
def hash_all():
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: hashlib.sha256(view[s[0]:s[1]]).hexdigest(), spans))
timed("sha256_s", hash_all)
dev = torch.empty(size, dtype=torch.uint8, device="cuda")
def h2d_pinned():
    streams = [torch.cuda.Stream() for _ in range(threads)]
    for i, (a, b) in enumerate(spans):
        k = i % threads
        with torch.cuda.stream(streams[k]):
            streams[k].synchronize()
            staging[k][:b - a].copy_(torch.frombuffer(view[a:b], dtype=torch.uint8))
            dev[a:b].copy_(staging[k][:b - a], non_blocking=True)
timed("memcpy_then_h2d_pinned_s", h2d_pinned)
pageable = torch.frombuffer(buf, dtype=torch.uint8)
timed("h2d_pageable_s", lambda: dev.copy_(pageable))
del staging, pageable
W._release_pinned_staging()
m = read_manifest(engine_dir)
timed("load_weights_verify_s", lambda: W.load_weights(engine_dir, m, torch.device("cuda"), verify=True))
timed("load_weights_no_verify_s", lambda: W.load_weights(engine_dir, m, torch.device("cuda"), verify=False))

# The runner's capture before d8de656, through torch.cuda.graph (which synchronizes the
# device and empties the allocator's caches before each capture, in global capture mode).
def torch_graph_capture(self, step, pool):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        r = step()
    return graph, r

capture_way = sys.argv[2]
if capture_way == "torch.cuda.graph":
    Engine._capture = torch_graph_capture
torch.cuda.synchronize()
t = time.perf_counter()
engine.warm_up()
torch.cuda.synchronize()
out["warm_up_s"] = time.perf_counter() - t
out["capture_way"] = capture_way
print("PROBE", json.dumps(out), flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per capture way")
    args = ap.parse_args()

    from decode import build_and_start_once, start_env

    engine_dir, cache, start = build_and_start_once(args.shape, "edgellm-probe-")
    ways = ["runner", "torch.cuda.graph"]
    probes = []
    for _ in range(args.rounds):  # the two capture ways in turn, each in a fresh process
        for way in ways:
            proc = subprocess.run([sys.executable, "-c", PROBE, str(engine_dir), way], capture_output=True,
                                  text=True, env=start_env(cache), timeout=300)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("PROBE")), None)
            if line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            probes.append(json.loads(line.split(" ", 1)[1]))
    args.out.write_text(json.dumps({"start_to_warm": start, "probes": probes}, indent=1))

    first = probes[0]
    for k, v in first.items():
        if k not in ("capture_way", "warm_up_s"):
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"start to warm: {start}")
    print("warm-up (the first in a fresh process: one eager prefill, then each graph's eager run and capture):")
    for way in ways:
        warm = sorted(p["warm_up_s"] for p in probes if p["capture_way"] == way)
        print(f"  capture through {way:17s} median {statistics.median(warm):.3f} s ({' / '.join(f'{w:.3f}' for w in warm)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

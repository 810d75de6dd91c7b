"""Where an engine load's read-and-verify and its warm-up go, piece by piece, on the GPU.

    python3 bench/probe_load.py --shape llama-3.2-1b --out probe-load.json

Builds a random INT4 engine at the shape, starts once to fill the kernel caches (as
bench/decode.py does), then in a second fresh process loads the engine and times, each on
its own: pinning the staging buffers, reading the file with the loader's threads, hashing it,
copying it to the GPU from pinned and from pageable memory, load_weights with and without
verification; then the warm-up with each capture's eager run and capture timed apart.
"""

from __future__ import annotations

import argparse
import json
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

captures = []
def capture(self, step, pool):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.cuda.stream(side):
        step()
    torch.cuda.synchronize()
    t_eager = time.perf_counter() - t
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    t = time.perf_counter()
    with torch.cuda.graph(graph, pool=pool):
        r = step()
    torch.cuda.synchronize()
    captures.append({"eager_s": t_eager, "capture_s": time.perf_counter() - t})
    return graph, r
Engine._capture = capture
t = time.perf_counter()
engine.warm_up()
out["warm_up_s"] = time.perf_counter() - t
out["captures"] = captures
print("PROBE", json.dumps(out), flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from decode import build_and_start_once, start_env

    engine_dir, cache, start = build_and_start_once(args.shape, "edgellm-probe-")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(engine_dir)], capture_output=True, text=True,
                          env=start_env(cache), timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PROBE")), None)
    if line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    probe = json.loads(line.split(" ", 1)[1])
    probe["start_to_warm"] = start
    args.out.write_text(json.dumps(probe, indent=1))
    captures = probe.pop("captures")
    for k, v in probe.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print("captures (eager s, capture s), prefill lengths largest first, then decode batches largest first:")
    print("  " + ", ".join(f"({c['eager_s']:.3f}, {c['capture_s']:.3f})" for c in captures))
    print(f"  eager total {sum(c['eager_s'] for c in captures):.3f} s, capture total {sum(c['capture_s'] for c in captures):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

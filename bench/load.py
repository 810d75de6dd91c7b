"""Load benchmark for the daemon: N concurrent clients streaming for M minutes.

Against a running daemon:
    .venv/bin/python bench/load.py --target unix:///run/edgellm/edgellm.sock \
        --admin-target unix:///run/edgellm/admin.sock --clients 16 --minutes 10 --out load.json
Or let it start one (sockets in a temporary directory):
    .venv/bin/python bench/load.py --engine ENGINE_DIR --device cpu --minutes 1

Prints requests/s, tokens/s, p50/p90/p99 time to first token and inter-token latency as the
clients saw them, errors by gRPC code, and the daemon's RSS at start and end (sampled through
Admin.GetInfo every few seconds, with its trend); --out writes the same as JSON.
Each client sends one request after another; RESOURCE_EXHAUSTED is counted and retried
after a short pause, as a kiosk app would.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from edgellm.serving.client import Client, GenerationError  # noqa: E402

WORDS = ("the kiosk shows the weather and the train times for the next hour while people wait at the station "
         "with coffee and a map of the city the river the park and the museum").split()
RSS_EVERY = 5.0


def prompts(n: int, min_words: int, max_words: int) -> list[str]:
    """Deterministic prompts of varied lengths, so prefill and decode both get exercised."""
    out = []
    for i in range(n):
        length = min_words + (i * 7) % (max_words - min_words + 1)
        out.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)))
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.ok = 0
        self.tokens = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.finish: collections.Counter[str] = collections.Counter()


def client_loop(target: str, stop_at: float, work: list[str], offset: int, max_tokens: int, stats: Stats,
                temperature: float) -> None:
    client = Client(target)
    i = offset
    while time.monotonic() < stop_at:
        prompt = work[i % len(work)]
        i += 1
        sent = last = time.monotonic()
        first = None
        gaps = []
        tokens = 0
        try:
            for delta in client.stream(prompt, max_tokens=max_tokens, temperature=temperature, seed=i, timeout=300):
                now = time.monotonic()
                if delta.token_ids:
                    if first is None:
                        first = now - sent
                    else:
                        gaps.append(now - last)
                    last = now
                    tokens += len(delta.token_ids)
                if delta.finish_reason:
                    with stats.lock:
                        stats.ok += 1
                        stats.tokens += tokens
                        stats.finish[delta.finish_reason] += 1
                        if first is not None:
                            stats.ttft.append(first)
                        stats.itl.extend(gaps)
        except GenerationError as e:
            with stats.lock:
                stats.errors[e.code] += 1
            if e.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                time.sleep(0.05)
    client.close()


def sample_rss(admin_target: str, stop: threading.Event, samples: list[tuple[float, int]], start: float) -> None:
    with Client(admin_target) as admin:
        while True:
            try:
                samples.append((time.monotonic() - start, int(admin.info()["process_rss_bytes"])))
            except GenerationError as e:
                print(f"load: GetInfo failed: {e}", file=sys.stderr)
            if stop.wait(RSS_EVERY):
                return


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares RSS trend over the second half of the run (after warm caches settle)."""
    half = samples[len(samples) // 2:]
    if len(half) < 3:
        return None
    xs = [t / 60 for t, _ in half]
    ys = [r / 2**20 for _, r in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


def spawn_daemon(args, tmp: Path) -> tuple[subprocess.Popen, str, str]:
    kiosk, admin = f"unix://{tmp}/kiosk.sock", f"unix://{tmp}/admin.sock"
    log = open(tmp / "daemon.log", "w")
    cmd = [sys.executable, "-m", "edgellm", "serve", "--engine", str(args.engine), "--device", args.device,
           "--listen", kiosk, "--admin-listen", admin, "--metrics-listen", ""]
    if args.queue_depth is not None:
        cmd += ["--queue-depth", str(args.queue_depth)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "runtime")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"load: the daemon exited with {proc.returncode}; see {tmp / 'daemon.log'}")
        try:
            with Client(admin) as c:
                if c.info(timeout=2)["state"] == "SERVING_STATE_SERVING":
                    return proc, kiosk, admin
        except GenerationError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("load: the daemon did not become ready in 10 minutes")



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", help="generation address of a running daemon")
    src.add_argument("--engine", type=Path, help="start a daemon on this engine for the run")
    p.add_argument("--admin-target", help="admin address (for RSS); default: the spawned daemon's")
    p.add_argument("--device", default="auto", help="device for a spawned daemon")
    p.add_argument("--queue-depth", type=int, help="queue depth for a spawned daemon")
    p.add_argument("--clients", type=int, help="concurrent clients (default: 4 x the engine's max batch)")
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--prompt-words", default="4-48", help="prompt length range in words, MIN-MAX")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)

    tmp = None
    proc = None
    if args.engine:
        tmp = tempfile.TemporaryDirectory(prefix="edgellm-load-")
        print(f"load: starting a daemon on {args.engine}", file=sys.stderr)
        proc, target, admin_target = spawn_daemon(args, Path(tmp.name))
    else:
        target, admin_target = args.target, args.admin_target
    try:
        info = None
        if admin_target:
            with Client(admin_target) as admin:
                info = admin.info()
        max_batch = info["engine"]["max_batch"] if info and info["engine"] else 4
        clients = args.clients or 4 * max_batch
        lo, hi = (int(x) for x in args.prompt_words.split("-"))
        work = prompts(97, lo, hi)
        stats = Stats()
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        start = time.monotonic()
        stop_at = start + args.minutes * 60
        sampler = None
        if admin_target:
            sampler = threading.Thread(target=sample_rss, args=(admin_target, stop, samples, start), daemon=True)
            sampler.start()
        threads = [threading.Thread(target=client_loop, args=(target, stop_at, work, 13 * k, args.max_tokens, stats,
                                                              args.temperature)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        if sampler:
            stop.set()
            sampler.join()
            with Client(admin_target) as admin:
                samples.append((time.monotonic() - start, int(admin.info()["process_rss_bytes"])))
        result = {
            "engine": info["engine"]["engine_id"] if info and info["engine"] else None,
            "device": (info or {}).get("device", {}).get("device"),
            "gpu": (info or {}).get("device", {}).get("gpu_name"),
            "clients": clients, "minutes": args.minutes, "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
            "seconds": elapsed, "requests_ok": stats.ok, "requests_per_s": stats.ok / elapsed,
            "tokens": stats.tokens, "tokens_per_s": stats.tokens / elapsed,
            "ttft_ms": {q: (percentile(stats.ttft, v) or 0) * 1e3 for q, v in (("p50", .5), ("p90", .9), ("p99", .99))},
            "itl_ms": {q: (percentile(stats.itl, v) or 0) * 1e3 for q, v in (("p50", .5), ("p90", .9), ("p99", .99))},
            "errors": dict(stats.errors), "finish_reasons": dict(stats.finish),
            "rss_mib": {"start": samples[0][1] / 2**20 if samples else None, "end": samples[-1][1] / 2**20 if samples else None,
                        "max": max(r for _, r in samples) / 2**20 if samples else None,
                        "trend_mib_per_min": slope_mib_per_min(samples)},
            "rss_samples": [(round(t, 1), r) for t, r in samples],
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)
            tmp.cleanup()

    r = result
    print(f"\nload: {r['clients']} clients x {r['minutes']:g} min, {r['max_tokens']} new tokens per request, "
          f"engine {r['engine']} on {r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''}")
    rows = [
        ("requests ok", f"{r['requests_ok']}"),
        ("requests/s", f"{r['requests_per_s']:.2f}"),
        ("tokens/s", f"{r['tokens_per_s']:.1f}"),
        ("TTFT p50 / p90 / p99 (ms)", " / ".join(f"{r['ttft_ms'][q]:.1f}" for q in ("p50", "p90", "p99"))),
        ("inter-token p50 / p90 / p99 (ms)", " / ".join(f"{r['itl_ms'][q]:.1f}" for q in ("p50", "p90", "p99"))),
        ("errors by code", ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"),
        ("finish reasons", ", ".join(f"{k} {v}" for k, v in sorted(r["finish_reasons"].items()))),
    ]
    rss = r["rss_mib"]
    if rss["start"] is not None:
        trend = rss["trend_mib_per_min"]
        rows.append(("RSS start / end / max (MiB)", f"{rss['start']:.0f} / {rss['end']:.0f} / {rss['max']:.0f}"))
        rows.append(("RSS trend, 2nd half (MiB/min)", "-" if trend is None else f"{trend:+.2f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"load: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode benchmark on one GPU: edgellm INT4 engines vs the memory-bandwidth floor and vs
Hugging Face transformers FP16, side by side in one run.

    python3 bench/decode.py --out $OUT            # both shapes
    python3 bench/decode.py --shapes llama-3.2-1b --skip-hf

For each shape (Llama-3.2-1B, Llama-3.1-8B; random weights at the published configs):
  - measured copy bandwidth (device-to-device, bytes read + written)
  - decode tokens/s at batch 1, 2, 4, 8 with 512 tokens of context, and % of roofline,
    where the floor of one step = (weight bytes read + KV bytes read) / bandwidth; each step
    is the serving loop's (greedy sampling, every token read back to the host, the host one
    step behind the GPU as in the daemon's scheduler)
  - TTFT for 128, 512, 2048-token prompts
  - process start to warm (a fresh subprocess, spawn to warm-up done: import, verify, load,
    graph capture; median of three starts; its exit is timed apart)
  - peak GPU memory
  - transformers FP16 generate (eager; static cache + torch.compile when it works) at the
    same shape, prompt length and new tokens, and our speed-up over each
Prints a table last; writes decode.json and decode.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runtime"))

from edgellm.engine.random_engine import SHAPES, shape_config, write_random_engine  # noqa: E402

CONTEXT = 512
BATCHES = (1, 2, 4, 8)
DECODE_STEPS = 64
TTFT_PROMPTS = (128, 512, 2048)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy (median of 20)."""
    n = 1 << 30  # 1 GiB each way: far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def weight_bytes_per_step(engine) -> int:
    """Bytes every decode step must read: all projection and norm weights plus the LM head
    (embedding lookups read b rows only). INT4 layers on the tensor-core path hold their
    weights in the kernel's layout: the same bytes, under other buffer names."""
    total = 0
    for name, t in engine.model.state_dict().items():
        if name.startswith("tok_embeddings") and not engine.config.tie_word_embeddings:
            continue
        if "kv_cache" in name:
            continue
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_step(config, batch: int, context: int) -> int:
    return 2 * config.num_layers * batch * config.num_kv_heads * context * config.head_dim * 2


def cuda_time(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def bench_engine(engine, bandwidth: float, seed: int = 0) -> dict:
    from edgellm.engine.sampling import SamplingParams, Sampler

    g = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    rows = []
    for b in BATCHES:
        if b > engine.max_batch:
            continue
        for slot in range(b):
            engine.prefill(slot, torch.randint(3, vocab, (CONTEXT,), generator=g).tolist())
        samplers = [Sampler(SamplingParams(), vocab, engine.device, [1]) for _ in range(b)]
        seqs = list(range(b))

        def steps(n=DECODE_STEPS):
            # The serving loop's steady state (scheduler._step): step i + 1 starts from step i's
            # sampled tokens at the next position, then step i's tokens are read. The positions
            # run from CONTEXT - n / 2 to CONTEXT + n / 2 - 1 (the cache was filled to CONTEXT), so
            # a step reads CONTEXT + 1/2 positions of KV on average: the floor below.
            first = CONTEXT - n // 2
            pending = engine.decode_sample(seqs, seqs, [5] * b, [first] * b, samplers)
            for i in range(1, n):
                following = engine.decode_sample(seqs, seqs, pending.tokens, [first + i] * b, samplers)
                pending.result()
                pending = following
            pending.result()

        steps(8)
        per_step = [t / DECODE_STEPS for t in cuda_time(steps, 5)]
        step = statistics.median(per_step)
        floor = (weight_bytes_per_step(engine) + kv_bytes_per_step(engine.config, b, CONTEXT + 0.5)) / bandwidth
        rows.append({"batch": b, "step_ms": step * 1e3, "decode_tok_s": b / step, "floor_ms": floor * 1e3,
                     "roofline_pct": 100 * floor / step, "step_ms_runs": [t * 1e3 for t in per_step]})
        log(f"  batch {b}: {step * 1e3:.3f} ms/step, {b / step:.0f} tok/s, floor {floor * 1e3:.3f} ms -> {100 * floor / step:.1f}%")
    return {"decode": rows}


def bench_ttft(engine) -> list[dict]:
    from edgellm.engine.sampling import SamplingParams, Sampler, sample_batch

    out = []
    g = torch.Generator().manual_seed(1)
    for n in TTFT_PROMPTS:
        if n >= engine.max_seq_len:
            continue
        prompt = torch.randint(3, engine.config.vocab_size, (n,), generator=g).tolist()
        sampler = Sampler(SamplingParams(), engine.config.vocab_size, engine.device, prompt)

        def first_token():
            logits = engine.prefill(0, prompt)
            sample_batch(logits[None], [sampler])

        first_token()
        times = cuda_time(first_token, 7)
        out.append({"prompt_tokens": n, "ttft_ms": statistics.median(times) * 1e3})
        log(f"  TTFT {n} tokens: {statistics.median(times) * 1e3:.1f} ms")
    return out


START_TO_WARM = r"""
import time, sys, os
t_started = time.clock_gettime(time.CLOCK_MONOTONIC)  # the clock the parent read before spawning us
t0 = time.perf_counter()
sys.path.insert(0, os.environ["EDGELLM_RUNTIME"])
from edgellm.engine.cuda_context import start_creating_context
from edgellm.engine.prefetch import start_prefetching_weights
start_creating_context("cuda")  # as `edgellm serve` does: the context and the weights beside the import
start_prefetching_weights(sys.argv[1])
import torch
from edgellm.engine.runner import Engine
t_import = time.perf_counter()
engine = Engine.load(sys.argv[1], device="cuda")
torch.cuda.synchronize()
t_load = time.perf_counter()
engine.warm_up()
t_warm = time.perf_counter()
import json
print("TIMES", json.dumps({"started_at": t_started, "warm_at": time.clock_gettime(time.CLOCK_MONOTONIC),
      "import_s": t_import - t0, "load_s": t_load - t_import, "warm_up_s": t_warm - t_load,
      "load_stages_s": engine.load_timings}), flush=True)
"""
STARTS = 3  # measured starts per shape (caches filled); the median is reported


def start_env(kernel_cache: Path) -> dict[str, str]:
    """The environment of a measured start: kernel and bytecode caches under kernel_cache."""
    env = dict(os.environ, EDGELLM_RUNTIME=str(ROOT / "runtime"), TRITON_CACHE_DIR=str(kernel_cache),
               EDGELLM_KERNEL_CACHE=str(kernel_cache / "edgellm"), PYTHONPYCACHEPREFIX=str(kernel_cache / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def bench_start_to_warm(engine_dir: Path, kernel_cache: Path) -> dict:
    """A fresh process, started as the daemon starts: the CUDA context created and the weights
    read and verified on threads beside the imports (edgellm.engine.prefetch), then load
    (verify the other files, place the weights), warm up (kernels, graph capture).
    to_warm_s: from just before the spawn to the end of warm-up, read on CLOCK_MONOTONIC, which
    Linux keeps one for all processes (the moment the daemon would say READY=1); interpreter_s
    is its part before the child's first line; exit_s, from warm to the process gone (CUDA and
    interpreter teardown), is reported beside it, as is total_s = spawn to exit.
    Kernel binaries are cached in kernel_cache (TRITON_CACHE_DIR, EDGELLM_KERNEL_CACHE), as the
    daemon caches them under /var/cache/edgellm: the first start on a device compiles, later ones reuse.
    Python bytecode is cached there too: an installed appliance has it (pip and dpkg compile
    .pyc at install), while a machine that sets PYTHONDONTWRITEBYTECODE and ships packages
    without .pyc (the H100 box does both) would compile ~1000 modules' source at every start."""
    spawned_at = time.clock_gettime(time.CLOCK_MONOTONIC)
    proc = subprocess.run([sys.executable, "-c", START_TO_WARM, str(engine_dir)], capture_output=True, text=True,
                          env=start_env(kernel_cache), timeout=300)
    ended_at = time.clock_gettime(time.CLOCK_MONOTONIC)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("TIMES")), None)
    if line is None:
        raise RuntimeError(f"start-to-warm subprocess failed:\n{proc.stderr[-3000:]}")
    times = json.loads(line.split(" ", 1)[1])
    started_at, warm_at = times.pop("started_at"), times.pop("warm_at")
    return {"to_warm_s": warm_at - spawned_at, "interpreter_s": started_at - spawned_at, **times,
            "exit_s": ended_at - warm_at, "total_s": ended_at - spawned_at}


def build_and_start_once(shape: str, prefix: str) -> tuple[Path, Path, dict]:
    """For the start-up probes: a random INT4 engine at `shape` built as main() builds them, in a
    fresh directory, and one start (as bench_start_to_warm) to fill its kernel and bytecode
    cache. Returns (engine_dir, cache, that first start's times)."""
    from edgellm.engine.demo_tokenizer import train_demo_tokenizer
    from edgellm.engine.runner import device_sm

    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "tok").mkdir()
    train_demo_tokenizer(work / "tok")
    engine_dir, cache = work / "engine", work / "cache"
    write_random_engine(engine_dir, shape, work / "tok", max_batch=max(BATCHES), max_seq_len=4096,
                        target_sms=[device_sm(torch.device("cuda"))], device="cuda")
    return engine_dir, cache, bench_start_to_warm(engine_dir, cache)


def median_start(engine_dir: Path, kernel_cache: Path, starts: int = STARTS) -> dict:
    """The start (as bench_start_to_warm) with the median to_warm_s of `starts`, each start's
    to_warm_s listed beside it."""
    runs = sorted((bench_start_to_warm(engine_dir, kernel_cache) for _ in range(starts)), key=lambda r: r["to_warm_s"])
    return {**runs[len(runs) // 2], "to_warm_runs_s": [r["to_warm_s"] for r in runs]}


def bench_hf(config, batch: int, prompt_len: int, new_tokens: int, compile_too: bool) -> dict:
    """transformers FP16 generate on the same shape: per-token decode time from the
    difference of two generation lengths (cancels the prefill)."""
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, rope_scaling=config.rope_scaling, max_position_embeddings=131072,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_config).half().eval()
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    results = {}

    def per_token(**kw) -> float:
        def run(n):
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)

        run(8)
        short = statistics.median(cuda_time(lambda: run(8), 3))
        long = statistics.median(cuda_time(lambda: run(8 + new_tokens), 3))
        return (long - short) / new_tokens

    with torch.inference_mode():
        t = per_token()
        results["eager_tok_s"] = batch / t
        log(f"  transformers eager batch {batch}: {batch / t:.0f} tok/s")
        if compile_too:
            try:
                # With a static cache, transformers' generate compiles the forward itself
                # (torch.compile, CUDA graphs); compiling it again by hand breaks its graphs.
                t = per_token(cache_implementation="static")
                results["compiled_tok_s"] = batch / t
                log(f"  transformers static cache + torch.compile batch {batch}: {batch / t:.0f} tok/s")
            except Exception as e:  # report, do not hide
                results["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"  transformers compile failed: {results['compiled_error']}")
    del model
    torch.cuda.empty_cache()
    return results


def plot(records: list[dict], bandwidth: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not available: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shape in sorted({r["shape"] for r in records}):
        rs = [r for r in records if r["shape"] == shape]
        ax.plot([r["batch"] for r in rs], [r["decode_tok_s"] for r in rs], "o-", label=f"{shape} edgellm INT4")
        ax.plot([r["batch"] for r in rs], [r["batch"] / (r["floor_ms"] / 1e3) for r in rs], "--", label=f"{shape} roofline")
        hf = [r for r in rs if r.get("hf_eager_tok_s")]
        if hf:
            ax.plot([r["batch"] for r in hf], [r["hf_eager_tok_s"] for r in hf], "x:", label=f"{shape} transformers FP16 eager")
        compiled = [r for r in rs if r.get("hf_compiled_tok_s")]
        if compiled:
            ax.plot([r["batch"] for r in compiled], [r["hf_compiled_tok_s"] for r in compiled], "+:",
                    label=f"{shape} transformers FP16 static cache + compile")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s (aggregate)")
    ax.set_yscale("log")
    ax.set_title(f"Decode at context {CONTEXT}, measured bandwidth {bandwidth / 1e12:.2f} TB/s")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-batches", default="1,4")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from edgellm.engine.demo_tokenizer import train_demo_tokenizer
    from edgellm.engine.runner import Engine, device_sm

    sm = device_sm(torch.device("cuda"))
    log(f"GPU: {torch.cuda.get_device_name()} (SM {sm}), torch {torch.__version__}")
    bandwidth = measure_bandwidth()
    log(f"measured copy bandwidth: {bandwidth / 1e12:.3f} TB/s")
    records, summary = [], {"gpu": torch.cuda.get_device_name(), "sm": sm, "bandwidth_Bps": bandwidth, "shapes": {}}
    work = Path(tempfile.mkdtemp(prefix="edgellm-bench-"))
    tok_dir = work / "tokenizer"
    tok_dir.mkdir()
    train_demo_tokenizer(tok_dir)
    for shape in args.shapes.split(","):
        log(f"== {shape}")
        engine_dir = work / shape
        t0 = time.perf_counter()
        write_random_engine(engine_dir, shape, tok_dir, max_batch=max(BATCHES), max_seq_len=4096, target_sms=[sm], device="cuda")
        log(f"  wrote engine in {time.perf_counter() - t0:.1f} s")
        kernel_cache = work / f"kernel-cache-{shape}"
        cold = bench_start_to_warm(engine_dir, kernel_cache)
        warm = median_start(engine_dir, kernel_cache)
        warm["cold_cache_to_warm_s"] = cold["to_warm_s"]
        log(f"  start to warm, empty kernel and bytecode caches: {cold}")
        log(f"  start to warm, kernel cache filled: {warm}")
        # The engine's own peak: what earlier shapes' runs (transformers included) left allocated is not its.
        torch.cuda.reset_peak_memory_stats()
        held_before = torch.cuda.memory_allocated()
        engine = Engine.load(engine_dir, device="cuda")
        engine.warm_up()
        decode = bench_engine(engine, bandwidth)["decode"]
        ttft = bench_ttft(engine)
        peak = (torch.cuda.max_memory_allocated() - held_before) / 2**30
        engine.free()
        del engine
        torch.cuda.empty_cache()
        hf = {}
        if not args.skip_hf:
            for b in map(int, args.hf_batches.split(",")):
                hf[b] = bench_hf(shape_config(shape), b, CONTEXT, 64, compile_too=(b == 1 and not args.no_compile))
        for row in decode:
            rec = {"shape": shape, **row}
            h = hf.get(row["batch"], {})
            if "eager_tok_s" in h:
                rec["hf_eager_tok_s"] = h["eager_tok_s"]
                rec["speedup_vs_hf_eager"] = row["decode_tok_s"] / h["eager_tok_s"]
            if "compiled_tok_s" in h:
                rec["hf_compiled_tok_s"] = h["compiled_tok_s"]
                rec["speedup_vs_hf_compiled"] = row["decode_tok_s"] / h["compiled_tok_s"]
            if "compiled_error" in h:
                rec["hf_compiled_error"] = h["compiled_error"]
            records.append(rec)
        summary["shapes"][shape] = {"ttft": ttft, "start_to_warm": warm, "peak_gpu_mem_gib": peak}
        # Written after every shape, so a run cut short keeps what it measured.
        (args.out / "decode.json").write_text(json.dumps({"summary": summary, "records": records}, indent=2))
    plot(records, bandwidth, args.out / "decode.png")

    print(f"\nGPU {summary['gpu']} (SM {sm}); copy bandwidth {bandwidth / 1e12:.2f} TB/s; context {CONTEXT}; medians")
    print(f"{'shape':<14}{'batch':>6}{'ms/step':>9}{'tok/s':>9}{'floor ms':>10}{'roofline':>10}{'HF eager':>10}{'x eager':>9}{'HF compiled':>12}{'x compiled':>11}")
    for r in records:
        he = f"{r['hf_eager_tok_s']:.0f}" if "hf_eager_tok_s" in r else "-"
        xe = f"{r['speedup_vs_hf_eager']:.2f}" if "speedup_vs_hf_eager" in r else "-"
        hc = f"{r['hf_compiled_tok_s']:.0f}" if "hf_compiled_tok_s" in r else "-"
        xc = f"{r['speedup_vs_hf_compiled']:.2f}" if "speedup_vs_hf_compiled" in r else "-"
        print(f"{r['shape']:<14}{r['batch']:>6}{r['step_ms']:>9.3f}{r['decode_tok_s']:>9.0f}{r['floor_ms']:>10.3f}{r['roofline_pct']:>9.1f}%{he:>10}{xe:>9}{hc:>12}{xc:>11}")
    for shape, s in summary["shapes"].items():
        ttft = ", ".join(f"{t['prompt_tokens']}: {t['ttft_ms']:.1f} ms" for t in s["ttft"])
        w = s["start_to_warm"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in w["load_stages_s"].items())
        print(f"{shape}: TTFT {ttft}; peak GPU memory {s['peak_gpu_mem_gib']:.2f} GiB")
        runs = "/".join(f"{t:.2f}" for t in w["to_warm_runs_s"])
        print(f"  start to warm {w['to_warm_s']:.2f} s (median of {runs}) with kernel and bytecode caches filled "
              f"({w['cold_cache_to_warm_s']:.2f} s on first start): interpreter {w['interpreter_s']:.2f}, "
              f"import {w['import_s']:.2f}, load {w['load_s']:.2f} ({stages}), warm-up {w['warm_up_s']:.2f}; "
              f"then exit {w['exit_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

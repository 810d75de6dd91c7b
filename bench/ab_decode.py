"""Decode steps under two (or more) settings of one environment switch, side by side in one
process: the engine is built once, then loaded, warmed up (graphs captured under the setting)
and measured with bench/decode.py's serving-loop steps once per setting, in turn, for several
rounds, so that drift of the GPU's clocks falls on every setting alike.

    python3 bench/ab_decode.py --switch EDGELLM_MMA_TWO_TILES=1,0 --rounds 3 --shapes llama-3.1-8b --out $OUT

Prints each round's ms/step, then a table of medians over the rounds and the ratio of each
setting's step to the first's; writes ab-decode.json under --out. The switches the runtime reads
at load or launch work (EDGELLM_MMA_TWO_TILES, EDGELLM_FOLD_NORMS); EDGELLM_PDL, which it
remembers per process, is forgotten before each load. --context N: a step reads N positions
of KV per row (default bench/decode.py's 512).

W4A16_SOURCE=current,PATH.py compares W4A16 kernel sources instead: each PATH is a copy of
w4a16_source.py whose SOURCE (same entries and arguments) replaces the runtime's before the load
("current": the runtime's own), compiled with NVRTC on first use:

    python3 bench/ab_decode.py --switch W4A16_SOURCE=current,/tmp/w4a16_before.py --rounds 3

ATTENTION_SOURCE=current,PATH.py likewise compares copies of engine/kernels/decode_attention.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402
from decode import BATCHES, bench_engine, log, measure_bandwidth  # noqa: E402
from kernel_source import use_attention_source, use_kernel_source  # noqa: E402
from edgellm.engine.random_engine import write_random_engine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", required=True, help="NAME=value1,value2[,...]: the settings to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shapes", default="llama-3.1-8b")
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--context", type=int, default=decode.CONTEXT,
                    help=f"positions of KV a step reads on average (default {decode.CONTEXT}; the engine holds 4096)")
    args = ap.parse_args()
    name, _, values = args.switch.partition("=")
    settings = values.split(",")
    if not name or len(settings) < 2:
        ap.error("--switch takes NAME=value1,value2: at least two settings of one variable")
    args.out.mkdir(parents=True, exist_ok=True)
    half = decode.DECODE_STEPS // 2  # the measured steps run from context - half to context + half - 1
    if not half <= args.context <= 4096 - half:
        ap.error(f"--context takes {half}..{4096 - half} (the measured steps' positions run {half} either side of it, "
                 "in the engine's 4096)")
    decode.CONTEXT = args.context  # bench_engine reads it at each call

    from edgellm.engine.demo_tokenizer import train_demo_tokenizer
    from edgellm.engine.kernels import pdl
    from edgellm.engine.runner import Engine, device_sm

    sm = device_sm(torch.device("cuda"))
    bandwidth = measure_bandwidth()
    log(f"GPU: {torch.cuda.get_device_name()} (SM {sm}); copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    work = Path(tempfile.mkdtemp(prefix="edgellm-ab-"))
    tok_dir = work / "tokenizer"
    tok_dir.mkdir()
    train_demo_tokenizer(tok_dir)
    results: dict = {"switch": name, "settings": settings, "context": args.context, "bandwidth_Bps": bandwidth,
                     "shapes": {}}
    for shape in args.shapes.split(","):
        engine_dir = work / shape
        t0 = time.perf_counter()
        write_random_engine(engine_dir, shape, tok_dir, max_batch=max(BATCHES), max_seq_len=4096, target_sms=[sm], device="cuda")
        log(f"== {shape}: wrote engine in {time.perf_counter() - t0:.1f} s")
        runs: dict[str, list[dict]] = {v: [] for v in settings}
        for r in range(args.rounds):
            for value in settings:
                if name == "W4A16_SOURCE":
                    use_kernel_source(value)
                elif name == "ATTENTION_SOURCE":
                    use_attention_source(value)
                else:
                    os.environ[name] = value
                pdl.enabled.cache_clear()  # read once per process otherwise
                engine = Engine.load(engine_dir, device="cuda")
                engine.warm_up()  # the graphs are captured under this setting
                log(f"  round {r + 1}, {name}={value}")
                runs[value].append(bench_engine(engine, bandwidth)["decode"])
                engine.free()
                del engine
                torch.cuda.empty_cache()
        table = []
        for value in settings:
            for i, b in enumerate(row["batch"] for row in runs[value][0]):
                step = statistics.median(run[i]["step_ms"] for run in runs[value])
                table.append({"setting": value, "batch": b, "step_ms": step,
                              "step_ms_rounds": [run[i]["step_ms"] for run in runs[value]],
                              "roofline_pct": 100 * runs[value][0][i]["floor_ms"] / step})
        first = {row["batch"]: row["step_ms"] for row in table if row["setting"] == settings[0]}
        for row in table:
            row["vs_first"] = row["step_ms"] / first[row["batch"]]
        results["shapes"][shape] = table
        (args.out / "ab-decode.json").write_text(json.dumps(results, indent=2))
        print(f"\n{shape}, context {args.context}: {name}, median of {args.rounds} rounds (ms/step; ratio to "
              f"{name}={settings[0]})")
        print(f"{'setting':>8} {'batch':>5} {'ms/step':>8} {'roofline':>8} {'ratio':>6}  rounds")
        for row in table:
            rounds = " ".join(f"{t:.3f}" for t in row["step_ms_rounds"])
            print(f"{row['setting']:>8} {row['batch']:>5} {row['step_ms']:>8.3f} {row['roofline_pct']:>7.1f}% "
                  f"{row['vs_first']:>6.3f}  {rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

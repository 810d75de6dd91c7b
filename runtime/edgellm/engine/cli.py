"""Engine commands: `edgellm build`, `edgellm demo-engine`, `edgellm run`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgellm.errors import ConfigError, RequestError
from edgellm.tomlfile import read_toml

PROFILE_KEYS = {"quant", "group_size", "kv_dtype", "max_batch", "max_seq_len", "target_sm", "calib_samples", "calib_seq_len"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build an engine from a Hugging Face checkpoint directory")
    p.add_argument("hf_dir", type=Path, help="checkpoint directory: config.json, *.safetensors, tokenizer files")
    p.add_argument("-o", "--output", type=Path, required=True, help="engine directory to create (must not exist)")
    p.add_argument("--profile", type=Path, help="device-class profile, e.g. engines/profiles/orin-nano-8gb.toml")
    p.add_argument("--quant", choices=("int4-awq", "int4-rtn", "fp16"), help="weight format (default int4-awq)")
    p.add_argument("--group-size", type=int, help="INT4 group size along the in-features (default 128)")
    p.add_argument("--kv-dtype", choices=("fp16",), help="KV cache dtype (default fp16)")
    p.add_argument("--max-batch", type=int, help="sequences served at once (default 4)")
    p.add_argument("--max-seq-len", type=int, help="prompt + generated tokens per sequence (default 2048)")
    p.add_argument("--target-sm", help="comma-separated SMs this engine may run on, e.g. 8.7,8.9, or cpu "
                                       "(default: this machine's GPU)")
    p.add_argument("--calib", type=Path, help="calibration text file (default: the built-in English text)")
    p.add_argument("--calib-samples", type=int, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration window (default 256)")
    p.add_argument("--engine-id", help="name recorded in the manifest (default: checkpoint dir name + quantization)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("demo-engine", help="build the tiny random demo engine offline (its text is meaningless)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.set_defaults(func=cmd_demo_engine)

    p = sub.add_parser("run", help="generate from an engine directory in this process")
    p.add_argument("engine_dir", type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--chat", action="store_true", help="apply the engine's chat template to the prompt as a user message")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_run)


def load_profile(path: Path) -> dict:
    data = read_toml(path, "profile", "profiles live in engines/profiles/")
    build = data.get("build", data)
    unknown = set(build) - PROFILE_KEYS
    if unknown:
        raise ConfigError(f"profile {path} has unknown keys {sorted(unknown)}; allowed: {sorted(PROFILE_KEYS)}")
    return build


def cmd_build(args) -> int:
    from edgellm.engine.builder import BuildOptions, build_engine, default_target_sms

    settings = load_profile(args.profile) if args.profile else {}
    for key in PROFILE_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    target = settings.pop("target_sm", None)
    if isinstance(target, str):
        target_sms = [t for t in target.split(",") if t.strip()]
    elif isinstance(target, list):
        target_sms = [str(t) for t in target]
    else:
        target_sms = default_target_sms()
    options = BuildOptions(target_sms=target_sms, calib_path=args.calib, engine_id=args.engine_id, **settings)
    build_engine(args.hf_dir, args.output, options, progress=lambda msg: print(f"build: {msg}", file=sys.stderr, flush=True))
    return 0


def cmd_demo_engine(args) -> int:
    from edgellm.engine.demo import build_demo_engine

    build_demo_engine(args.output, args.max_batch, args.max_seq_len,
                      progress=lambda msg: print(f"demo-engine: {msg}", file=sys.stderr, flush=True))
    return 0


def cmd_run(args) -> int:
    from edgellm.engine.cuda_context import start_creating_context

    start_creating_context(args.device)  # beside the torch import below
    from edgellm.engine.generate import BatchGeneration
    from edgellm.engine.runner import Engine
    from edgellm.engine.sampling import SamplingParams

    engine = Engine.load(args.engine_dir, device=args.device,
                         progress=lambda msg: print(f"run: {msg}", file=sys.stderr, flush=True))
    if engine.int4_fallback:
        print(f"run: warning: {engine.int4_fallback}", file=sys.stderr, flush=True)
    if args.prompt_ids is not None:
        if args.chat:
            raise RequestError("--chat needs --prompt text, not --prompt-ids")
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise RequestError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
    elif not args.prompt:
        raise RequestError("the prompt is empty: give --prompt some text (or --prompt-ids)")
    elif args.chat:
        prompt_ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = engine.tokenizer.encode(args.prompt)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
    )
    batch = BatchGeneration(engine, [prompt_ids], [params])
    for _, delta in batch:
        if not args.json:
            sys.stdout.write(delta)
            sys.stdout.flush()
    result = batch.results[0]
    if args.json:
        print(json.dumps(result.to_json_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"run: {len(result.token_ids)} tokens, finish reason: {result.finish_reason}", file=sys.stderr)
    return 0

"""Serving commands: `edgellm serve` (also `edgellmd`), `edgellm generate`, `edgellm info`.

The engine-store part (edgellm.ota.daemon), when present, extends `serve`:
    add_serve_arguments(parser)     adds its options (e.g. --trust-dir)
    attach(daemon, config, args)    adds its admin service, sets daemon.engine_source
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from edgellm.errors import ConfigError

STORE_EXTENSION = "edgellm.ota.daemon"


def _store_extension():
    """(the module, None) or (None, why it cannot be used). A missing optional dependency of
    the update part (e.g. cryptography on a GPU box) must not stop `serve --engine`."""
    try:
        return importlib.import_module(STORE_EXTENSION), None
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name in (STORE_EXTENSION, "edgellm.ota"):
            return None, "this build has no engine-update part (edgellm.ota)"
        return None, f"the engine-update part cannot be loaded ({e})"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the daemon (edgellmd): gRPC on unix sockets, under systemd",
                       description="Serve one engine to local apps over gRPC. Settings come from the config file "
                                   "(default /etc/edgellm/edgellm.toml if it exists), overridden by these options.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--engine", type=Path, help="engine directory to serve")
    src.add_argument("--store", type=Path, help="engine store directory: serve its current engine, take updates")
    p.add_argument("--config", type=Path, help="TOML config file (default /etc/edgellm/edgellm.toml when present)")
    p.add_argument("--listen", help="generation socket, unix:///PATH (default unix:///run/edgellm/edgellm.sock)")
    p.add_argument("--admin-listen", help="admin socket, unix:///PATH (default unix:///run/edgellm/admin.sock)")
    p.add_argument("--tcp-listen", help="also serve generation on HOST:PORT (TLS when [tls] is configured)")
    p.add_argument("--metrics-listen", help='Prometheus HOST:PORT (default 127.0.0.1:9464; "" turns it off)')
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--queue-depth", type=int, help="requests that may wait for a slot (default 16)")
    p.add_argument("--prefill-chunk", type=int, help="prompt tokens a slot prefills per iteration (default 128)")
    p.add_argument("--grace-period", type=float, help="seconds in-flight streams get on SIGTERM (default 30)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    extension, _ = _store_extension()
    if extension is not None and hasattr(extension, "add_serve_arguments"):
        extension.add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="stream a completion from a running daemon")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--target", default=None, help="daemon address, unix:///PATH or HOST:PORT (default unix:///run/edgellm/edgellm.sock)")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user chat message (engine's chat template)")
    p.add_argument("--max-tokens", type=int, default=0, help="new tokens at most (default: the daemon's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, finish reason, usage)")
    _tls_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="print a running daemon's GetInfo (engine, limits, device, load)")
    p.add_argument("--target", default=None, help="admin address (default unix:///run/edgellm/admin.sock)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _tls_arguments(p)
    p.set_defaults(func=cmd_info)


def _tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", type=Path, help="CA certificate to verify the daemon (turns TLS on)")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")


def cmd_serve(args) -> int:
    if importlib.util.find_spec("torch") is None:
        raise ConfigError("PyTorch is not installed for this Python: the daemon runs engines with it. Install "
                          "JetPack's torch wheel (Jetson) or `pip install torch`, then run `edgellm doctor`")
    from edgellm.serving.config import load_config
    from edgellm.serving.server import serve

    overrides = {
        "engine": args.engine, "store": args.store, "listen": args.listen, "admin_listen": args.admin_listen,
        "tcp_listen": args.tcp_listen, "metrics_listen": args.metrics_listen, "device": args.device,
        "queue_depth": args.queue_depth, "prefill_chunk": args.prefill_chunk, "grace_period": args.grace_period,
        "log_level": args.log_level,
    }
    config = load_config(args.config, overrides)
    # The GPU's context comes up beside the torch import and socket set-up, not after them.
    from edgellm.engine.cuda_context import start_creating_context

    start_creating_context(config.device)
    attach, engine_dir = None, config.engine
    if config.store is not None:
        extension, why = _store_extension()
        if extension is None:
            raise ConfigError(f"serving from an engine store needs the engine-update part, but {why}; "
                              "install what it needs, or serve an engine directory with --engine")
        attach = lambda daemon: extension.attach(daemon, config, args)  # noqa: E731
        engine_dir = extension.current_engine_dir(config.store)
    if engine_dir is not None and config.device != "cpu":
        # Its weights are read and verified beside the torch import too (edgellm.engine.prefetch).
        from edgellm.engine.prefetch import start_prefetching_weights

        start_prefetching_weights(engine_dir)
    return serve(config, attach)


def _client(args, default_target: str):
    from edgellm.serving.client import Client

    return Client(args.target or default_target, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def cmd_generate(args) -> int:
    from edgellm.serving.client import DEFAULT_TARGET

    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, timeout=args.timeout)
    if args.chat:
        kwargs["messages"] = [{"role": "user", "content": args.prompt}]
        prompt = None
    else:
        prompt = args.prompt
    with _client(args, DEFAULT_TARGET) as client:
        if args.json:
            print(json.dumps(client.generate(prompt, **kwargs).to_json_dict(), ensure_ascii=False))
            return 0
        last = None
        for delta in client.stream(prompt, **kwargs):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            last = delta
        sys.stdout.write("\n")
        usage = last.usage or {}
        print(f"generate: {usage.get('completion_tokens', 0)} tokens, finish reason: {last.finish_reason}, "
              f"first token after {usage.get('time_to_first_token_ms', 0):.0f} ms", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from edgellm.serving.client import DEFAULT_ADMIN_TARGET

    with _client(args, DEFAULT_ADMIN_TARGET) as client:
        info = client.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_info(info))
    return 0


def format_info(info: dict) -> str:
    lines = [
        f"state:          {info['state'].removeprefix('SERVING_STATE_').lower()}",
        f"runtime:        edgellm {info['runtime_version']}, up {info['uptime_seconds']:.0f} s",
    ]
    engine = info.get("engine")
    if engine:
        lines += [
            f"engine:         {engine['engine_id']} (version {engine['engine_version']}), {engine['architecture']}, "
            f"{engine['quantization']}" + (f" g{engine['group_size']}" if engine["group_size"] else ""),
            f"limits:         max batch {engine['max_batch']}, max seq len {engine['max_seq_len']}, "
            f"targets {', '.join(engine['target_sms'])}",
            f"engine dir:     {engine['engine_dir']} (loaded in {engine['load_seconds']:.1f} s)",
        ]
        if engine.get("int4_kernel"):
            lines.append(f"int4 kernel:    {engine['int4_kernel']}")
    else:
        lines.append("engine:         none installed")
    for old in info.get("retiring_engines", []):
        lines.append(f"retiring:       {old['engine_id']} (version {old['engine_version']}) finishing its streams")
    device = info.get("device") or {}
    if device.get("device"):
        gpu = f", {device['gpu_name']} (SM {device['sm']})" if device.get("gpu_name") else ""
        mem = ""
        if device.get("gpu_memory_total_bytes"):
            mem = f", GPU memory {device['gpu_memory_used_bytes'] / 2**30:.1f}/{device['gpu_memory_total_bytes'] / 2**30:.1f} GiB"
        lines.append(f"device:         {device['device']}{gpu}{mem}")
    lines += [
        f"slots:          {info['slots_busy']}/{info['slots_total']} busy, queue {info['queue_depth']}/{info['queue_capacity']}",
        f"served:         {info['requests_total']} requests, {info['tokens_generated']} tokens",
        f"memory:         RSS {info['process_rss_bytes'] / 2**20:.0f} MiB",
    ]
    return "\n".join(lines)

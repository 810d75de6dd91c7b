"""`edgellm push`, `engines`, `activate`, `rollback`: the Updates service from the command line.

The admin endpoint is a root-only unix socket on the device, or TCP with mutual TLS from
the fleet manager (--cert/--key/--ca).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Iterator

from edgellm.errors import ConfigError, EdgeLLMError

DEFAULT_ADMIN_TARGET = "unix:///run/edgellm/admin.sock"
CHUNK_BYTES = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    def target_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default=DEFAULT_ADMIN_TARGET, help=f"admin endpoint (default {DEFAULT_ADMIN_TARGET}; "
                                                                       "HOST:PORT for TCP with mutual TLS)")
        p.add_argument("--cert", type=Path, help="client certificate (PEM) for TCP")
        p.add_argument("--key", type=Path, help="client private key (PEM) for TCP")
        p.add_argument("--ca", type=Path, help="CA that signed the daemon's certificate (PEM) for TCP")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the daemon (default 600)")

    p = sub.add_parser("push", help="push a signed bundle to a daemon; it installs and serves it without dropping requests")
    p.add_argument("bundle", type=Path)
    p.add_argument("--stage-only", action="store_true", help="install without serving it (activate later)")
    target_options(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("engines", help="list the engine versions in a daemon's store")
    target_options(p)
    p.set_defaults(func=cmd_engines)

    p = sub.add_parser("activate", help="serve an installed engine version (it must be newer than the current one)")
    p.add_argument("version", type=int)
    target_options(p)
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("rollback", help="serve the kept previous engine version again")
    target_options(p)
    p.set_defaults(func=cmd_rollback)


def connect(args):
    """A channel and an Updates stub for args.target."""
    import grpc

    from edgellm.serving import rpc

    target = args.target
    if target.startswith("unix:"):
        channel = grpc.insecure_channel(target)
    else:
        if not (args.cert and args.key and args.ca):
            raise ConfigError(f"{target} is TCP: the admin endpoint needs mutual TLS, pass --cert, --key and --ca")
        creds = grpc.ssl_channel_credentials(args.ca.read_bytes(), args.key.read_bytes(), args.cert.read_bytes())
        channel = grpc.secure_channel(target, creds)
    return channel, rpc.Stub(channel, rpc.service_descriptor("updates", "Updates"))


def call(fn, *args, **kwargs):
    """Run an RPC; a refusal comes back as the matching UpdateRejected subclass."""
    import grpc

    from edgellm.ota.errors import all_reasons
    from edgellm.ota.service import REASON_KEY

    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:
        reason = dict(e.trailing_metadata() or ()).get(REASON_KEY)
        details = e.details() or ""
        if reason:
            cls = all_reasons().get(reason)
            if cls is not None:
                raise cls(details.removeprefix(f"[{reason}] ")) from None
        raise EdgeLLMError(f"the daemon answered {e.code().name}: {details}") from None


def push_requests(bundle: Path, stage_only: bool = False) -> Iterator:
    from edgellm.engine.manifest import sha256_file
    from edgellm.serving import rpc

    pb = rpc.proto_module("updates")
    size = bundle.stat().st_size
    yield pb.PushRequest(header=pb.PushHeader(size=size, sha256=sha256_file(bundle), stage_only=stage_only))
    with open(bundle, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield pb.PushRequest(chunk=chunk)


def describe(v) -> str:
    state = {1: "current", 2: "previous", 3: "installed"}.get(v.state, "?")
    when = dt.datetime.fromtimestamp(v.installed_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if v.installed_at else "?"
    key = v.key_id[:16] if v.key_id else "unsigned"
    expires = f"  expires {v.expires}" if v.expires else ""
    return f"{v.version:>6}  {state:<9}  {v.engine_id:<28} {v.size_bytes / 1e6:8.1f} MB  key {key}  installed {when}{expires}"


def cmd_push(args) -> int:
    if not args.bundle.is_file():
        raise ConfigError(f"bundle {args.bundle} not found; make one with `edgellm sign`")
    channel, stub = connect(args)
    with channel:
        reply = call(stub.Push, push_requests(args.bundle, args.stage_only), timeout=args.timeout)
    how = f"serving it ({reply.swap_mode} swap)" if reply.activated else "installed, not serving (edgellm activate)"
    print(f"pushed {args.bundle.name}: engine {reply.engine.engine_id} version {reply.engine.version}, {how}")
    return 0


def cmd_engines(args) -> int:
    from edgellm.serving import rpc

    pb = rpc.proto_module("updates")
    channel, stub = connect(args)
    with channel:
        reply = call(stub.List, pb.ListEnginesRequest(), timeout=args.timeout)
    if not reply.engines:
        print("the store is empty: push an engine with `edgellm push`")
    for v in reply.engines:
        print(describe(v))
    return 0


def cmd_activate(args) -> int:
    from edgellm.serving import rpc

    pb = rpc.proto_module("updates")
    channel, stub = connect(args)
    with channel:
        reply = call(stub.Activate, pb.ActivateRequest(version=args.version), timeout=args.timeout)
    print(f"serving engine {reply.engine.engine_id} version {reply.engine.version} ({reply.swap_mode} swap)")
    return 0


def cmd_rollback(args) -> int:
    from edgellm.serving import rpc

    pb = rpc.proto_module("updates")
    channel, stub = connect(args)
    with channel:
        reply = call(stub.Rollback, pb.RollbackRequest(), timeout=args.timeout)
    print(f"rolled back from version {reply.from_version} to {reply.engine.engine_id} version {reply.engine.version}")
    return 0

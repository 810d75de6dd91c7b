"""The Updates service from the fleet side: UpdatesClient, and the commands `edgellm push`,
`engines`, `activate`, `rollback` built on it.

The admin endpoint is a root-only unix socket on the device, or TCP with mutual TLS from
the fleet manager (--tls-ca/--tls-cert/--tls-key, as `edgellm info` takes them).
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Iterator

from edgellm.errors import ConfigError, EdgeLLMError

DEFAULT_ADMIN_TARGET = "unix:///run/edgellm/admin.sock"
CHUNK_BYTES = 1 << 20


class UpdatesClient:
    """A refusal raises the matching edgellm.ota.errors class (its .reason as the daemon sent it)."""

    def __init__(self, target: str = DEFAULT_ADMIN_TARGET, *, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None):
        from edgellm.serving import rpc

        self.channel = rpc.open_channel(target, tls_ca, tls_cert, tls_key, require_mutual_tls=True)
        self.pb = rpc.proto_module("updates")
        self._stub = rpc.Stub(self.channel, rpc.service_descriptor("updates", "Updates"))

    def __enter__(self) -> "UpdatesClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def push(self, bundle: Path, stage_only: bool = False, timeout: float | None = None):
        return self._call(self._stub.Push, self.push_requests(Path(bundle), stage_only), timeout=timeout)

    def push_raw(self, size: int, sha256: str, chunks: Iterator[bytes], stage_only: bool = False, timeout: float | None = None):
        """Push exactly these bytes under this header (the header need not be true: tests)."""
        def requests():
            yield self.pb.PushRequest(header=self.pb.PushHeader(size=size, sha256=sha256, stage_only=stage_only))
            for chunk in chunks:
                yield self.pb.PushRequest(chunk=chunk)
        return self._call(self._stub.Push, requests(), timeout=timeout)

    def list(self, timeout: float | None = 30.0):
        return list(self._call(self._stub.List, self.pb.ListEnginesRequest(), timeout=timeout).engines)

    def activate(self, version: int, timeout: float | None = None):
        return self._call(self._stub.Activate, self.pb.ActivateRequest(version=version), timeout=timeout)

    def rollback(self, timeout: float | None = None):
        return self._call(self._stub.Rollback, self.pb.RollbackRequest(), timeout=timeout)

    def push_requests(self, bundle: Path, stage_only: bool = False) -> Iterator:
        from edgellm.engine.manifest import sha256_file

        yield self.pb.PushRequest(header=self.pb.PushHeader(size=bundle.stat().st_size, sha256=sha256_file(bundle),
                                                            stage_only=stage_only))
        with open(bundle, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield self.pb.PushRequest(chunk=chunk)

    @staticmethod
    def _call(fn, *args, **kwargs):
        import grpc

        from edgellm.ota.errors import all_reasons
        from edgellm.ota.service import REASON_KEY

        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as e:
            reason = dict(e.trailing_metadata() or ()).get(REASON_KEY)
            details = e.details() or ""
            cls = all_reasons().get(reason) if reason else None
            if cls is not None:
                raise cls(details.removeprefix(f"[{reason}] ")) from None
            raise EdgeLLMError(f"the daemon answered {e.code().name}: {details}") from None


# ---- commands -----------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    def target_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default=DEFAULT_ADMIN_TARGET,
                       help=f"admin endpoint (default {DEFAULT_ADMIN_TARGET}; HOST:PORT for TCP with mutual TLS)")
        p.add_argument("--tls-ca", type=Path, help="CA that signed the daemon's certificate (TCP)")
        p.add_argument("--tls-cert", type=Path, help="client certificate (TCP, mutual TLS)")
        p.add_argument("--tls-key", type=Path, help="client private key (TCP, mutual TLS)")
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


def _client(args) -> UpdatesClient:
    return UpdatesClient(args.target, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


def describe(v) -> str:
    state = {1: "current", 2: "previous", 3: "installed"}.get(v.state, "?")
    when = dt.datetime.fromtimestamp(v.installed_at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if v.installed_at else "?"
    key = v.key_id[:16] if v.key_id else "unsigned"
    expires = f"  expires {v.expires}" if v.expires else ""
    return f"{v.version:>6}  {state:<9}  {v.engine_id:<28} {v.size_bytes / 1e6:8.1f} MB  key {key}  installed {when}{expires}"


def cmd_push(args) -> int:
    if not args.bundle.is_file():
        raise ConfigError(f"bundle {args.bundle} not found; make one with `edgellm sign`")
    with _client(args) as client:
        reply = client.push(args.bundle, args.stage_only, timeout=args.timeout)
    how = f"serving it ({reply.swap_mode} swap)" if reply.activated else "installed, not serving (edgellm activate)"
    print(f"pushed {args.bundle.name}: engine {reply.engine.engine_id} version {reply.engine.version}, {how}")
    return 0


def cmd_engines(args) -> int:
    with _client(args) as client:
        engines = client.list(timeout=args.timeout)
    if not engines:
        print("the store is empty: push an engine with `edgellm push`")
    for v in engines:
        print(describe(v))
    return 0


def cmd_activate(args) -> int:
    with _client(args) as client:
        reply = client.activate(args.version, timeout=args.timeout)
    print(f"serving engine {reply.engine.engine_id} version {reply.engine.version} ({reply.swap_mode} swap)")
    return 0


def cmd_rollback(args) -> int:
    with _client(args) as client:
        reply = client.rollback(timeout=args.timeout)
    print(f"rolled back from version {reply.from_version} to {reply.engine.engine_id} version {reply.engine.version}")
    return 0

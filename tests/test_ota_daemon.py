"""Engine updates against the real daemon: a subprocess on real unix sockets, pushed to over gRPC.

First boot from an empty store, every refusal with the live engine still serving, a push
under 2x max-batch concurrent streams (beside and drain swaps), SIGKILL at each install
stage followed by a restart, rollback and automatic rollback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from edgellm.engine.manifest import describe_files, read_manifest, verify_files, write_manifest
from edgellm.ota import hooks
from edgellm.ota.audit import AuditLog
from edgellm.ota.client import UpdatesClient
from edgellm.ota.errors import UpdateRejected
from edgellm.ota.identity import cpu_identity
from edgellm.ota.store import EngineStore
from edgellm.ota.trust import TrustStore
from edgellm.ota.updater import Updater
from edgellm.ota.verify import Verifier
from edgellm.serving.client import Client, GenerationError
from test_ota_offline import CASES, engine_copy, make_keys, push_file, sign_bundle, store_snapshot

MAX_BATCH = 4  # the demo engine's
READY = "INFO edgellm.serving.server: ready:"


class DaemonProcess:
    """`edgellm serve --store` in a subprocess, on sockets in a short private directory."""

    def __init__(self, store: Path, trust: Path, log: Path, *args: str, env: dict[str, str] | None = None, device: str = "cpu"):
        self.sockets = Path(tempfile.mkdtemp(prefix="eo-", dir="/tmp"))  # unix socket paths are short
        self.kiosk = f"unix://{self.sockets}/k.sock"
        self.admin = f"unix://{self.sockets}/a.sock"
        self.log = log
        self._readies_before = log.read_text(errors="replace").count(READY) if log.exists() else 0
        cmd = [sys.executable, "-m", "edgellm", "serve", "--store", str(store), "--trust-dir", str(trust), "--device", device,
               "--listen", self.kiosk, "--admin-listen", self.admin, "--metrics-listen", "", *args]
        self._log_file = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 120.0) -> "DaemonProcess":
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            text = self.log.read_text(errors="replace")
            if text.count(READY) > self._readies_before:
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"the daemon exited with {self.proc.returncode}:\n{text[-4000:]}")
            time.sleep(0.05)
        pytest.fail(f"the daemon was not ready within {timeout} s:\n{self.log.read_text()[-4000:]}")

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        shutil.rmtree(self.sockets, ignore_errors=True)

    def info(self) -> dict:
        with Client(self.admin) as c:
            return c.info()

    def generate(self, **kwargs):
        with Client(self.kiosk) as c:
            return c.generate(prompt_token_ids=[1, 5, 9], **kwargs)

    def updates(self) -> UpdatesClient:
        return UpdatesClient(self.admin)


def start_daemon(store, trust, log, *args, env=None, device="cpu") -> DaemonProcess:
    return DaemonProcess(store, trust, log, *args, env=env, device=device).wait_ready()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, demo_engine, keys):
    """Signed demo-engine bundles: good versions 1..5, a renamed engine as v2, a broken one."""
    root = tmp_path_factory.mktemp("bundles")
    out = {v: sign_bundle(demo_engine, root / f"v{v}.bundle", keys.fleet_key, v) for v in (1, 3, 5)}
    renamed = engine_copy(demo_engine, root / "demo-v2", engine_id="demo-v2")
    out[2] = sign_bundle(renamed, root / "v2.bundle", keys.fleet_key, 2)
    broken = engine_copy(demo_engine, root / "demo-broken", engine_id="demo-broken")
    out["broken"] = sign_bundle(broken, root / "broken.bundle", keys.fleet_key, 3)
    return out


def preinstall(store_dir: Path, keys, bundle_paths: list[Path]) -> EngineStore:
    """Install and point at versions offline, as a factory image would."""
    store = EngineStore(store_dir)
    updater = Updater(store, Verifier(TrustStore.load(keys.trust_dir), cpu_identity("test")), AuditLog(store_dir / "audit.jsonl"))
    for b in bundle_paths:
        push_file(updater, b)
    return store


def nan_engine_bundle(demo_engine: Path, root: Path, key: Path, version: int) -> Path:
    """A signed, well-formed engine whose weights make every logit NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    eng = engine_copy(demo_engine, root / "nan-engine")
    weights = load_file(eng / "model.safetensors")
    weights["norm.weight"] = torch.full_like(weights["norm.weight"], float("nan"))
    save_file(weights, str(eng / "model.safetensors"), metadata={"format": "pt"})
    manifest = read_manifest(eng)
    manifest.files = describe_files(eng, list(manifest.files))
    write_manifest(eng, manifest)
    return sign_bundle(eng, root / "nan.bundle", key, version)


def test_first_boot_then_every_refusal_keeps_the_live_engine_serving(tmp_path, demo_engine, keys, bundles):
    import grpc

    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    from grpc_health.v1 import health_pb2_grpc

    store_dir = tmp_path / "store"
    with start_daemon(store_dir, keys.trust_dir, tmp_path / "daemon.log") as d:
        # First boot: an empty store is valid; nothing is served until a push.
        assert d.info()["state"] == "SERVING_STATE_NO_ENGINE"
        with grpc.insecure_channel(d.kiosk) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(GenerationError) as e:
            d.generate(max_tokens=4)
        assert e.value.code == "UNAVAILABLE"
        with d.updates() as u:
            reply = u.push(bundles[5])
        assert (reply.engine.version, reply.activated) == (5, True)
        assert d.info()["engine"]["engine_version"] == 5
        assert d.generate(max_tokens=4).finish_reason in ("length", "stop")

        store = EngineStore(store_dir)
        before = store_snapshot(store_dir)
        work = tmp_path / "craft"
        pushed = {}
        with d.updates() as u:
            for case, (craft, options, reason) in CASES.items():
                if "limits" in options:
                    continue  # device limits are set per daemon; the announced-size case below covers them
                case_dir = work / case.replace(" ", "-")
                case_dir.mkdir(parents=True)
                bundle = craft(demo_engine, case_dir, keys)
                data = bundle.read_bytes()
                cut = options.get("cut", len(data))
                chunks = [data[i:min(i + 65536, cut)] for i in range(0, cut, 65536)]
                sha = options.get("sha256") or hashlib.sha256(data).hexdigest()
                with pytest.raises(UpdateRejected) as e:
                    u.push_raw(len(data), sha, iter(chunks))
                pushed[case] = e.value.reason
                assert e.value.reason == reason, (case, str(e.value))
            with pytest.raises(UpdateRejected) as e:
                u.push_raw(1 << 40, "0" * 64, iter([b"x" * 1024]))
            assert e.value.reason == "oversized"
            with pytest.raises(UpdateRejected) as e:
                u.push(nan_engine_bundle(demo_engine, work, keys.fleet_key, 6))
            assert e.value.reason == "smoke-failed"
            assert [v.version for v in u.list()] == [5]
        assert store_snapshot(store_dir) == before
        info = d.info()
        assert info["engine"]["engine_version"] == 5 and info["state"] == "SERVING_STATE_SERVING"
        assert d.generate(max_tokens=4).finish_reason in ("length", "stop")
    events = AuditLog(store_dir / "audit.jsonl").read()
    rejected = [e["reason"] for e in events if e["event"] == "rejected"]
    assert rejected == [*pushed.values(), "oversized", "smoke-failed"]


@pytest.mark.parametrize("mode", ["beside", "drain"])
def test_push_under_concurrent_streams_drops_nothing(mode, tmp_path, keys, bundles):
    from edgellm.serving.server import STALL_ENV

    store_dir = tmp_path / "store"
    preinstall(store_dir, keys, [bundles[1]])
    streams, max_tokens = 2 * MAX_BATCH, 120
    stall = tmp_path / "stall"  # while it exists the scheduler loop holds still (serving's test hook)
    args = ("--swap-mode", mode, "--queue-depth", "16")
    with start_daemon(store_dir, keys.trust_dir, tmp_path / "daemon.log", *args, env={STALL_ENV: str(stall)}) as d:
        results, errors = [None] * streams, []

        def run(i):
            try:
                results[i] = d.generate(max_tokens=max_tokens, temperature=0.8, seed=i, timeout=300)
            except Exception as e:  # noqa: BLE001 - collected and asserted on below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        wait_for(lambda: d.info()["requests_total"] == streams)
        # Freeze the streams mid-flight so the swap lands while some run and some wait.
        stall.touch()
        wait_for(lambda: _unchanged(lambda: d.info()["tokens_generated"]))
        at_push = d.info()
        assert at_push["slots_busy"] > 0 and at_push["queue_depth"] > 0, at_push
        replies = []

        def push():
            with d.updates() as u:
                replies.append(u.push(bundles[2]))

        pusher = threading.Thread(target=push)
        pusher.start()
        if mode == "beside":
            pusher.join()  # the new engine goes in beside the frozen streams
        else:
            wait_for(lambda: d.info()["state"] == "SERVING_STATE_SWAPPING")  # admission held
        stall.unlink()
        pusher.join()
        assert (replies[0].activated, replies[0].swap_mode) == (True, mode)
        for t in threads:
            t.join(300)
        assert not errors, errors
        for r in results:
            assert r is not None and r.finish_reason in ("length", "stop")
            assert r.finish_reason == "stop" or len(r.token_ids) == max_tokens
        # Streams running at the swap finished on the old engine; those queued ran on the new one.
        assert {r.engine_id for r in results} == {"demo-llama-int4-awq", "demo-v2"}
        info = d.info()
        assert info["engine"]["engine_version"] == 2 and info["engine"]["engine_id"] == "demo-v2"
        assert d.generate(max_tokens=4).engine_id == "demo-v2"
    store = EngineStore(store_dir)
    assert (store.current_version(), store.previous_version()) == (2, 1)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the daemon never reached the awaited state"
        time.sleep(0.02)


def _unchanged(read) -> bool:
    first = read()
    time.sleep(0.3)
    return read() == first


def test_sigkill_at_each_install_stage_restarts_on_a_complete_engine(tmp_path, keys, bundles):
    store_dir = tmp_path / "store"
    preinstall(store_dir, keys, [bundles[1]])
    log = tmp_path / "daemon.log"
    expected = 1
    for stage in (*hooks.STAGES, None):
        env = {hooks.CRASH_ENV: stage} if stage else {}
        d = start_daemon(store_dir, keys.trust_dir, log, env=env)
        try:
            # Whatever the last crash left: one complete engine, the one `current` names, no leftovers.
            store = EngineStore(store_dir)
            assert store.current_version() == expected
            assert d.info()["engine"]["engine_version"] == expected
            verify_files(store.engine_dir(expected), read_manifest(store.engine_dir(expected)))
            assert not list((store_dir / "staging").iterdir()), stage
            assert not list(store_dir.glob("*.tmp"))
            assert d.generate(max_tokens=4).finish_reason in ("length", "stop")
            if stage is None:
                break
            with d.updates() as u, pytest.raises(Exception):
                u.push(bundles[2], timeout=120)
            assert d.proc.wait(60) == -signal.SIGKILL, stage
        finally:
            d.stop()
        # Only a crash after `current` moved serves the new engine.
        expected = 2 if stage == "activated" else 1
    assert expected == 2


def test_rollback_and_automatic_rollback(tmp_path, keys, bundles):
    store_dir = tmp_path / "store"
    preinstall(store_dir, keys, [bundles[1]])
    args = ("--health-window", "60", "--health-interval", "0.2")
    env = {hooks.BREAK_ENV: "demo-broken"}
    with start_daemon(store_dir, keys.trust_dir, tmp_path / "daemon.log", *args, env=env) as d, d.updates() as u:
        u.push(bundles[2])
        assert d.info()["engine"]["engine_version"] == 2
        reply = u.rollback()
        assert (reply.engine.version, reply.from_version) == (1, 2)
        assert d.info()["engine"]["engine_version"] == 1
        assert d.generate(max_tokens=4).engine_id == "demo-llama-int4-awq"
        assert {v.version: v.state for v in u.list()} == {1: u.pb.EngineVersion.STATE_CURRENT, 2: u.pb.EngineVersion.STATE_INSTALLED}
        with pytest.raises(UpdateRejected) as e:
            u.rollback()
        assert e.value.reason == "no-previous"

        # Version 3 passes every check and its smoke test, then fails on real requests.
        reply = u.push(bundles["broken"])
        assert reply.activated and reply.engine.version == 3
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and d.info()["engine"]["engine_version"] != 1:
            time.sleep(0.1)
        assert d.info()["engine"]["engine_version"] == 1
        assert d.generate(max_tokens=4).finish_reason in ("length", "stop")
    events = AuditLog(store_dir / "audit.jsonl").read()
    rollbacks = [(e["from_version"], e["version"], e["automatic"]) for e in events if e["event"] == "rolled-back"]
    assert rollbacks == [(2, 1, False), (3, 1, True)]
    assert EngineStore(store_dir).current_version() == 1
    assert json.loads((store_dir / "current").read_text()) == 1


@pytest.mark.gpu
def test_push_on_gpu_swaps_beside_using_cuda_python_memory(tmp_path, keys, bundles):
    store_dir = tmp_path / "store"
    preinstall(store_dir, keys, [bundles[1]])
    with start_daemon(store_dir, keys.trust_dir, tmp_path / "daemon.log", device="cuda") as d, d.updates() as u:
        assert d.info()["engine"]["engine_version"] == 1
        reply = u.push(bundles[2])
        assert (reply.activated, reply.swap_mode) == (True, "beside")  # a tiny engine next to a big GPU
        assert d.generate(max_tokens=8).engine_id == "demo-v2"
        assert d.info()["device"]["device"].startswith("cuda")
    assert "device has" in (tmp_path / "daemon.log").read_text()


@pytest.mark.gpu
def test_push_on_gpu_while_streams_run_drops_nothing(tmp_path, keys, bundles):
    """The new engine loads and captures its CUDA graphs beside the live one while that one
    keeps serving streams on the scheduler's thread (a capture in CUDA's global mode would
    forbid that thread's synchronizing calls)."""
    store_dir = tmp_path / "store"
    preinstall(store_dir, keys, [bundles[1]])
    with start_daemon(store_dir, keys.trust_dir, tmp_path / "daemon.log", "--swap-mode", "beside", device="cuda") as d:
        done = threading.Event()
        finished, errors = [], []  # (monotonic time, engine id) of each completed stream

        def run(i):
            while not done.is_set():
                try:
                    r = d.generate(max_tokens=48, temperature=0.8, seed=i, timeout=120)
                except Exception as e:  # noqa: BLE001 - collected and asserted on below
                    errors.append(e)
                    return
                finished.append((time.monotonic(), r.engine_id))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(MAX_BATCH)]
        for t in threads:
            t.start()
        wait_for(lambda: len(finished) >= MAX_BATCH or bool(errors))
        began = time.monotonic()
        with d.updates() as u:
            reply = u.push(bundles[2])
        ended = time.monotonic()
        wait_for(lambda: any(engine == "demo-v2" for _, engine in finished) or bool(errors))
        done.set()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert (reply.activated, reply.swap_mode) == (True, "beside")
        during = [engine for at, engine in finished if began < at < ended]
        assert "demo-llama-int4-awq" in during, f"no stream finished while the push loaded: {finished}"
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_boot_reads_the_current_engine_while_importing(tmp_path, keys, bundles):
    """Not --device cpu: the daemon reads and verifies the store's current engine beside the
    torch import (edgellm.engine.prefetch), and the load takes its bytes from there."""
    store_dir = tmp_path / "store"
    preinstall(store_dir, keys, [bundles[1], bundles[2]])
    with start_daemon(store_dir, keys.trust_dir, tmp_path / "daemon.log", device="auto") as d:
        assert d.info()["engine"]["engine_version"] == 2
        assert d.generate(max_tokens=4).finish_reason in ("length", "stop")
    assert "read and verified during start-up" in (tmp_path / "daemon.log").read_text()


def test_boot_falls_back_to_previous_when_current_is_damaged(tmp_path, keys, bundles):
    store_dir = tmp_path / "store"
    store = preinstall(store_dir, keys, [bundles[1], bundles[2]])
    weights = store.engine_dir(2) / "model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as f:  # bit rot in the current version
        f.seek(100)
        f.write(b"\xff" * 16)
    # device auto: the damaged version is also the one read at start-up (edgellm.engine.prefetch)
    with start_daemon(store_dir, keys.trust_dir, tmp_path / "daemon.log", device="auto") as d:
        assert d.info()["engine"]["engine_version"] == 1
        assert d.generate(max_tokens=4).finish_reason in ("length", "stop")
    assert (store.current_version(), store.previous_version()) == (1, None)
    last = AuditLog(store_dir / "audit.jsonl").read()[-1]
    assert (last["event"], last["version"], last["automatic"]) == ("rolled-back", 1, True)

"""The daemon as systemd runs it: a subprocess with NOTIFY_SOCKET pointing at a datagram
socket this test binds. READY only after warm-up, watchdog pings from the scheduler loop
(none while it is stalled by the EDGELLM_DEBUG_STALL_FILE test hook), and on SIGTERM:
STOPPING, no new requests, in-flight streams completed, exit 0."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgellm.serving.client import Client, GenerationError

WATCHDOG_USEC = 400_000  # pings every 0.2 s when healthy


class NotifyListener:
    """The systemd side of sd_notify: every datagram received, in order."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while self._running:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.extend(data.decode().split("\n"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def count(self, line: str) -> int:
        return self.snapshot().count(line)

    def wait_for(self, predicate, what: str, proc: subprocess.Popen, timeout: float = 120.0, log: Path | None = None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.snapshot()):
                return
            if proc.poll() is not None:
                tail = "\n".join(log.read_text().splitlines()[-15:]) if log else ""
                raise AssertionError(f"the daemon exited ({proc.returncode}) while waiting for {what}\n{tail}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; got {self.snapshot()[-10:]}")

    def close(self):
        self._running = False
        self._thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def daemon(demo_engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("systemd")
    listener = NotifyListener(root / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(root / "notify.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC),
           "EDGELLM_DEBUG_STALL_FILE": str(root / "stall"), "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_PID", None)
    (root / "edgellm.toml").write_text('[scheduler]\nqueue_depth = 4\n[log]\nlevel = "debug"\n')
    log = open(root / "daemon.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "serve", "--engine", str(demo_engine), "--device", "cpu",
         "--listen", f"unix://{root}/kiosk.sock", "--admin-listen", f"unix://{root}/admin.sock",
         "--metrics-listen", "", "--grace-period", "60", "--config", str(root / "edgellm.toml")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    yield proc, listener, root
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    listener.close()
    log.close()


def test_ready_only_after_warm_up_then_watchdog_pings(daemon):
    proc, listener, root = daemon
    listener.wait_for(lambda m: "READY=1" in m, "READY=1", proc)
    messages = listener.snapshot()
    ready = messages.index("READY=1")
    statuses = [m for m in messages[:ready] if m.startswith("STATUS=")]
    assert any("warming up" in s for s in statuses), statuses  # READY came after warm-up...
    with Client(f"unix://{root}/kiosk.sock") as client:  # ...and the daemon serves at once
        assert client.generate("hello", max_tokens=4).finish_reason in ("stop", "length")
    after_ready = listener.count("WATCHDOG=1")
    listener.wait_for(lambda m: m.count("WATCHDOG=1") >= after_ready + 3, "watchdog pings", proc)


def test_no_watchdog_pings_while_the_loop_is_stalled(daemon):
    proc, listener, root = daemon
    listener.wait_for(lambda m: "READY=1" in m, "READY=1", proc)
    stall = root / "stall"
    stall.touch()
    try:
        with Client(f"unix://{root}/admin.sock") as admin, Client(f"unix://{root}/kiosk.sock") as client:
            # A request sent now stays queued: proof the loop is stuck, not just slow.
            outcome = []

            def send():
                try:
                    client.generate("stuck", timeout=2.0)
                except GenerationError as e:
                    outcome.append(e.code)

            stuck = threading.Thread(target=send)
            stuck.start()
            end = time.monotonic() + 60
            while not any(r["state"] == "STATE_QUEUED" for r in admin.list_requests()):
                assert time.monotonic() < end, "the request never queued"
                time.sleep(0.02)
            time.sleep(0.5)  # a ping sent just before the loop stopped may still be on its way
            before = listener.count("WATCHDOG=1")
            time.sleep(5 * WATCHDOG_USEC / 2 / 1e6)  # five ping intervals of a healthy loop
            assert listener.count("WATCHDOG=1") == before
            stuck.join(60)
            assert outcome == ["DEADLINE_EXCEEDED"]
    finally:
        stall.unlink()
    resumed = listener.count("WATCHDOG=1")
    listener.wait_for(lambda m: m.count("WATCHDOG=1") > resumed, "pings to resume", proc)


def test_sigterm_stops_new_requests_and_finishes_in_flight_streams_then_exits_0(daemon):
    proc, listener, root = daemon
    listener.wait_for(lambda m: "READY=1" in m, "READY=1", proc)
    stall = root / "stall"
    client = Client(f"unix://{root}/kiosk.sock")
    stream = client.stream("a long answer", max_tokens=200)
    deltas = [next(stream)]
    stall.touch()  # hold the stream mid-flight while the daemon is told to stop
    try:
        proc.send_signal(signal.SIGTERM)
        listener.wait_for(lambda m: "STOPPING=1" in m, "STOPPING=1", proc)
        with Client(f"unix://{root}/kiosk.sock") as other, pytest.raises(GenerationError) as e:
            other.generate("too late", max_tokens=4, timeout=30)
        assert e.value.code == "UNAVAILABLE" and "stopping" in e.value.details
    finally:
        stall.unlink()
    deltas.extend(stream)
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length")  # completed, not cut off
    assert last.usage["completion_tokens"] == sum(len(d.token_ids) for d in deltas)
    client.close()
    assert proc.wait(timeout=60) == 0
    assert not (root / "kiosk.sock").exists() and not (root / "admin.sock").exists()


BLOCK_OPTIONAL = """
import sys

class Missing:
    # As on the GPU boxes: no health/reflection packages, no systemd-python, no cryptography, no NVML.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"grpc_health", "grpc_reflection", "systemd", "cryptography", "pynvml"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Missing())
from edgellm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_daemon_serves_without_the_optional_packages(demo_engine, tmp_path):
    log_path = tmp_path / "daemon.log"
    (tmp_path / "empty.toml").write_text("")  # not the machine's /etc/edgellm/edgellm.toml
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCK_OPTIONAL, "serve", "--engine", str(demo_engine), "--device", "cpu",
             "--listen", f"unix://{tmp_path}/kiosk.sock", "--admin-listen", f"unix://{tmp_path}/admin.sock",
             "--metrics-listen", "127.0.0.1:0", "--config", str(tmp_path / "empty.toml")],
            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}, stdout=log, stderr=subprocess.STDOUT,
        )
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        listener.wait_for(lambda m: "READY=1" in m, "READY=1", proc, log=log_path)
        with Client(f"unix://{tmp_path}/kiosk.sock") as client:
            assert client.generate("hello", max_tokens=4).finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    text = log_path.read_text()
    assert "grpcio-health-checking is not usable" in text and "grpcio-reflection is not usable" in text
    assert "Traceback" not in text


def test_notifier_speaks_to_abstract_sockets_and_rate_limits_pings():
    from edgellm.serving.systemd import Notifier

    name = f"edgellm-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "60000000"})
        assert notifier.ping_every == 30.0  # half of WatchdogSec
        notifier.ready("serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        for _ in range(100):  # the loop calls this every iteration; one ping per half interval goes out
            notifier.watchdog()
        notifier.stopping("bye")
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        # The watchdog is for the main process only: WATCHDOG_PID naming another turns it off.
        assert Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).ping_every is None
        assert not Notifier({}).enabled
    finally:
        sock.close()


def test_logs_go_to_the_journal_when_stderr_is_the_journal(monkeypatch):
    import logging

    pytest.importorskip("systemd.journal")
    from edgellm.serving.systemd import setup_logging

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        st = os.fstat(2)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("info")
        assert [type(h).__name__ for h in root.handlers] == ["JournalHandler"]
        monkeypatch.delenv("JOURNAL_STREAM")
        setup_logging("warning")
        assert [type(h).__name__ for h in root.handlers] == ["StreamHandler"] and root.level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])

"""The daemon: scheduler + gRPC servers on their sockets + health + reflection + metrics +
systemd notifications + signal handling, and its life from start to a clean exit.

Two gRPC servers, so privilege follows the endpoint:
  kiosk  Generator, Health, reflection   unix socket 0660 (+ optional TCP, TLS/mTLS)
  admin  Admin, Health, reflection, and  unix socket 0600 (+ optional TCP, mutual TLS only)
         whatever add_admin_service adds (engine updates)
Health and reflection come from grpcio-health-checking / grpcio-reflection when installed;
without them the daemon logs a warning and serves the rest.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc

from edgellm.errors import ConfigError
from edgellm.serving import rpc
from edgellm.serving.config import ServeConfig, split_host_port, unix_socket_path
from edgellm.serving.metrics import GpuReader, Metrics, MetricsServer
from edgellm.serving.scheduler import Scheduler
from edgellm.serving.service import AdminService, GeneratorService, admin_pb
from edgellm.serving.systemd import Notifier, setup_logging

log = logging.getLogger("edgellm.serving.server")

STALL_ENV = "EDGELLM_DEBUG_STALL_FILE"  # test hook, see scheduler.py
KIOSK_SOCKET_MODE = 0o660
ADMIN_SOCKET_MODE = 0o600
GENERATOR_SERVICE = "edgellm.v1.Generator"
# Each stream holds a server thread for its whole life, queued ones included: enough for the
# queue plus the slots of any engine an edge box runs, plus health checks.
_SPARE_THREADS = 64
_STOP_RPC_GRACE = 5.0  # seconds for handler threads to write the last chunks after the scheduler is idle
_STATUS_EVERY = 5.0


class Daemon:
    def __init__(self, config: ServeConfig, notifier: Notifier | None = None):
        self.config = config
        self.notifier = notifier or Notifier({})
        self.started = time.monotonic()
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            queue_depth=config.queue_depth, prefill_chunk=config.prefill_chunk,
            default_max_tokens=config.default_max_tokens, metrics=self.metrics,
            on_iteration=self.notifier.watchdog, debug_stall_file=os.environ.get(STALL_ENV) or None,
        )
        self.metrics.watch(self.scheduler)
        self.scheduler.on_change.append(self._refresh_health)
        self.stopping = False
        # Startup hook: installs the first engine (--engine loads a directory; the engine
        # store part replaces it). Runs after the sockets are up, before READY=1.
        self.engine_source: Callable[["Daemon"], None] = lambda d: d.load_engine(config.engine)
        self._admin_services: list[Callable[[grpc.Server], str]] = []
        self._health = None
        self._servers: list[grpc.Server] = []
        self._sockets: list[Path] = []
        self._metrics_server: MetricsServer | None = None
        self._gpu: GpuReader | None = None
        self.tcp_ports: dict[str, int] = {}  # "kiosk"/"admin" -> bound TCP port (port 0 picks one)

    # ---- wiring -----------------------------------------------------------------------
    def add_admin_service(self, add: Callable[[grpc.Server], str]) -> None:
        """For other parts (engine updates): add(server) registers a servicer on the admin
        server and returns its full service name (for reflection). Call before start()."""
        self._admin_services.append(add)

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    def start(self) -> None:
        cfg = self.config
        health, reflection = _optional_grpc_parts()
        if health is not None:
            self._health = health.HealthServicer()
            self._refresh_health()

        kiosk = grpc.server(ThreadPoolExecutor(cfg.queue_depth + _SPARE_THREADS, thread_name_prefix="edgellm-rpc"))
        kiosk_names = [rpc.add_service(kiosk, rpc.service_descriptor("generator", "Generator"), GeneratorService(self.scheduler))]
        admin = grpc.server(ThreadPoolExecutor(16, thread_name_prefix="edgellm-admin"))
        admin_service = AdminService(self.scheduler, self.metrics, self.started, self.device_info, self._drain)
        admin_names = [rpc.add_service(admin, rpc.service_descriptor("admin", "Admin"), admin_service)]
        admin_names += [add(admin) for add in self._admin_services]
        for server, names in ((kiosk, kiosk_names), (admin, admin_names)):
            if self._health is not None:
                health.add_service(server, self._health)
                names.append(health.SERVICE_NAME)
            if reflection is not None:
                reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)

        if cfg.listen:
            self._bind_unix(kiosk, cfg.listen, KIOSK_SOCKET_MODE, cfg.socket_group)
        if cfg.tcp_listen:
            self._bind_tcp(kiosk, cfg.tcp_listen, "kiosk")
        if cfg.admin_listen:
            self._bind_unix(admin, cfg.admin_listen, ADMIN_SOCKET_MODE, "")
        if cfg.admin_tcp_listen:
            self._bind_tcp(admin, cfg.admin_tcp_listen, "admin")
        kiosk.start()
        admin.start()
        self._servers = [kiosk, admin]
        if cfg.metrics_listen:
            host, port = split_host_port(cfg.metrics_listen, "metrics listen address")
            try:
                self._metrics_server = MetricsServer(self.metrics.registry, host, port)
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {cfg.metrics_listen} ({e}); pick a free port or set metrics listen to \"\"") from None
            log.info("metrics on http://%s:%d/metrics", host, self._metrics_server.port)

    def _bind_unix(self, server: grpc.Server, address: str, mode: int, group: str) -> None:
        path = unix_socket_path(address)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        # The socket is created by the bind: a umask makes it never exist with wider rights.
        old = os.umask(0o777 & ~mode)
        try:
            port = server.add_insecure_port(f"unix:{path}")
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {path} ({e}); check the directory's permissions") from None
        finally:
            os.umask(old)
        if port == 0:
            raise ConfigError(f"cannot listen on {path}; check the directory's permissions")
        os.chmod(path, mode)
        if group:
            try:
                shutil.chown(path, group=group)
            except (LookupError, PermissionError) as e:
                raise ConfigError(f"cannot give socket {path} to group {group!r} ({e}); create the group or fix socket_group") from None
        self._sockets.append(path)
        log.info("listening on unix:%s (mode %o)", path, mode)

    def _bind_tcp(self, server: grpc.Server, address: str, role: str) -> None:
        cfg = self.config
        host, _ = split_host_port(address)
        if cfg.tls_cert is None:
            if host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("%s serves generation over TCP without TLS on a non-loopback address", address)
            port = server.add_insecure_port(address)
        else:
            ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())], root_certificates=ca,
                require_client_auth=ca is not None,
            )
            if role == "admin" and ca is None:
                raise ConfigError(f"{address} serves the admin API: it needs mutual TLS ([tls] client_ca)")
            port = server.add_secure_port(address, creds)
        if port == 0:
            raise ConfigError(f"cannot listen on {address}: the port is in use or the address is not this host's")
        self.tcp_ports[role] = port
        log.info("listening on %s (%s)", address, "mutual TLS" if cfg.tls_client_ca else "TLS" if cfg.tls_cert else "plaintext")

    # ---- engine -----------------------------------------------------------------------
    def load_engine(self, engine_dir: Path, version: int = 0) -> None:
        from edgellm.engine.runner import Engine

        self.status(f"loading engine {engine_dir}")
        engine = Engine.load(engine_dir, device=self.config.device, verify=self.config.verify,
                             progress=lambda msg: self.status(f"loading engine: {msg}"))
        self.status(f"warming up engine {engine.engine_id} on {engine.device}")
        engine.warm_up()
        self.install_engine(engine, version)

    def status(self, line: str) -> None:
        """What the daemon is doing, for the log and `systemctl status`."""
        log.info("%s", line)
        self.notifier.status(line)

    def install_engine(self, engine, version: int = 0) -> None:
        """First engine (warm); swaps go through self.scheduler.swap_engine."""
        self.scheduler.set_engine(engine, version)
        self._gpu_reader(engine)
        log.info("serving engine %s (version %d) on %s, %d slots, max seq len %d, loaded in %.1f s",
                 engine.engine_id, version, engine.device, engine.max_batch, engine.max_seq_len, engine.load_seconds)
        if engine.int4_fallback:
            log.warning("engine %s: %s", engine.engine_id, engine.int4_fallback)

    def device_info(self):
        engine = self.scheduler.engine
        if engine is None:
            return admin_pb.DeviceInfo()
        from edgellm.engine.runner import device_sm

        info = admin_pb.DeviceInfo(device=str(engine.device), sm=device_sm(engine.device))
        gpu = self._gpu_reader(engine)
        if gpu is not None:
            reading = gpu.read()
            info.gpu_name = gpu.name()
            info.gpu_memory_total_bytes = int(reading.get("memory_total_bytes", 0))
            info.gpu_memory_used_bytes = int(reading.get("memory_used_bytes", 0))
        return info

    def _gpu_reader(self, engine) -> GpuReader | None:
        """The reader for the engine's GPU (shared with the metrics), None on CPU."""
        if engine.device.type != "cuda":
            return None
        if self._gpu is None or self._gpu.device != engine.device:
            self._gpu = self.metrics.gpu = GpuReader(engine.device)
        return self._gpu

    # ---- state ------------------------------------------------------------------------
    def _refresh_health(self) -> None:
        if self._health is None:
            return
        from grpc_health.v1 import health_pb2

        serving = self.scheduler.serving and not self.stopping
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", GENERATOR_SERVICE):
            self._health.set(name, status)

    def _drain(self, draining: bool) -> None:
        if draining:
            self.scheduler.set_accepting(False, "the daemon is draining (Admin.Drain); retry later", "draining")
            log.info("draining: new requests are refused, %d in flight finish", len(self.scheduler.snapshot().requests))
        elif not self.stopping:
            self.scheduler.set_accepting(True)
            log.info("resumed: taking requests")

    def status_line(self) -> str:
        snap = self.scheduler.snapshot()
        if snap.current is None:
            return "no engine installed: generation answers UNAVAILABLE until one is pushed"
        busy = f"{snap.slots_busy}/{snap.slots_total} slots busy, {snap.queue_depth} queued"
        return f"{snap.state}: engine {snap.current.engine.engine_id} on {snap.current.engine.device}, {busy}"

    def stop(self, grace: float, force: threading.Event | None = None) -> None:
        """Refuse new requests, let accepted ones finish within `grace` seconds, then close."""
        self.stopping = True
        in_flight = len(self.scheduler.snapshot().requests)
        self.notifier.stopping(f"stopping: finishing {in_flight} requests (grace period {grace:g} s)")
        log.info("stopping: %d requests in flight, grace period %g s", in_flight, grace)
        self.scheduler.set_accepting(False, "the daemon is stopping; retry when it is back", "stopping")
        deadline = time.monotonic() + grace
        while not self.scheduler.wait_idle(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or (force is not None and force.is_set()):
                ended = self.scheduler.end_all()
                log.warning("grace period over: %d requests ended with finish reason cancelled", ended)
                break
        events = [server.stop(_STOP_RPC_GRACE) for server in self._servers]
        for event in events:
            event.wait()
        self.scheduler.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.close()
        for path in self._sockets:
            path.unlink(missing_ok=True)
        log.info("stopped")


def _optional_grpc_parts():
    """(health module, reflection module), None for each that is not installed."""
    health = reflection = None
    try:
        from grpc_health.v1 import health as health_module
        from grpc_health.v1 import health_pb2_grpc

        class _Health:
            SERVICE_NAME = health_module.SERVICE_NAME
            HealthServicer = health_module.HealthServicer

            @staticmethod
            def add_service(server, servicer):
                health_pb2_grpc.add_HealthServicer_to_server(servicer, server)

        health = _Health
    except Exception as e:  # ImportError, or generated code refusing this grpcio version
        log.warning("grpcio-health-checking is not usable (%s): no grpc.health.v1.Health service", e)
    try:
        from grpc_reflection.v1alpha import reflection as reflection_module

        reflection = reflection_module
    except Exception as e:
        log.warning("grpcio-reflection is not usable (%s): no server reflection (grpcurl needs the .proto files)", e)
    return health, reflection


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a daemon that died is removed; a live one, or a non-socket, is an error."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it or choose another listen path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise ConfigError(f"another process is listening on {path}: is edgellmd already running?")


def serve(config: ServeConfig, attach: Callable[[Daemon], None] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code.

    attach(daemon), when given, runs before the sockets open: the engine-store part uses
    it to add its admin service and replace daemon.engine_source.
    """
    setup_logging(config.log_level)
    notifier = Notifier()
    stop, force = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():
            force.set()  # a second signal: end in-flight streams now
        stop.set()
        log.info("received %s", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(config, notifier)
    if attach is not None:
        attach(daemon)
    try:
        daemon.start()
        daemon.engine_source(daemon)
    except BaseException as e:
        notifier.notify(f"STATUS=failed to start: {e}")
        daemon.stop(0)
        raise
    if daemon.scheduler.snapshot().stalled:
        log.warning("the scheduler loop is stalled by %s (test hook)", STALL_ENV)
    status = daemon.status_line()
    notifier.ready(status)
    log.info("ready: %s", status)
    while not stop.wait(_STATUS_EVERY):
        line = daemon.status_line()
        if line != status:
            notifier.notify(f"STATUS={line}")
            status = line
    daemon.stop(config.grace_period, force)
    return 0

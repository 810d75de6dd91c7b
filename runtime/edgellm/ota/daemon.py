"""The daemon side of engine updates: `edgellm serve --store DIR --trust-dir DIR`.

serving/cli.py calls add_serve_arguments(parser) and attach(daemon, config, args). attach
opens the engine store (locks it, cleans crash leftovers), adds the Updates service to the
admin endpoint and replaces the daemon's boot step: serve the store's current engine, fall
back to the previous one if it will not load, or start empty (first boot: generation
answers UNAVAILABLE, health NOT_SERVING, until a push installs an engine).

Switching engines (DaemonSwitcher): load and warm the new engine, smoke-test it (tokens
come out, logits finite), then let the scheduler swap it in between two iterations:
"beside" the live engine when device memory holds both, else "drain" (admission held,
running streams finish, old engine freed, new one loaded; the old one is reloaded if that
fails). After an activation a health watch runs for a window: probe requests go through
the scheduler, and a failed one rolls back to the previous version on its own.

Settings: [updates] in the config file, overridden by the command-line options below.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.engine.manifest import read_manifest
from edgellm.errors import ConfigError, EdgeLLMError
from edgellm.ota import identity
from edgellm.ota.audit import AuditLog
from edgellm.ota.bundle import Limits
from edgellm.ota.errors import LoadFailed, SmokeFailed, SwapFailed, UpdateRejected
from edgellm.ota.store import DEFAULT_KEEP, EngineStore
from edgellm.ota import DEFAULT_TRUST_DIR
from edgellm.ota.trust import TrustStore
from edgellm.ota.updater import Updater
from edgellm.ota.verify import Policy, Verifier

if TYPE_CHECKING:
    from edgellm.serving.server import Daemon

log = logging.getLogger("edgellm.ota")

SWAP_MODES = ("auto", "beside", "drain")
SMOKE_TOKENS = 4
_MEMORY_MARGIN = 1.2  # activations, allocator slack, CUDA graphs pools
_MEMORY_SLACK_BYTES = 256 << 20
_PROBE_TIMEOUT = 60.0


@dataclasses.dataclass
class UpdateSettings:
    trust_dir: Path = DEFAULT_TRUST_DIR
    keep: int = DEFAULT_KEEP
    allow_unsigned: bool = False
    swap_mode: str = "auto"
    swap_timeout: float = 600.0  # seconds running streams get to finish in a drain swap
    health_window: float = 60.0  # seconds after an activation during which failing health rolls back
    health_interval: float = 5.0  # seconds between health probes in that window
    max_bundle_bytes: int = Limits.max_bundle_bytes
    max_unpacked_bytes: int = Limits.max_unpacked_bytes
    audit_log: Path | None = None  # default: STORE/audit.jsonl

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> "UpdateSettings":
        """The [updates] table of the config file."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"unknown key {key!r} in [updates]; allowed: {', '.join(sorted(fields))}")
            default = fields[key].default
            if key in ("trust_dir", "audit_log"):
                if not isinstance(value, str):
                    raise ConfigError(f"[updates] {key} must be a path string, got {value!r}")
                value = Path(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"[updates] {key} must be true or false, got {value!r}")
            elif isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"[updates] {key} must be a number, got {value!r}")
            values[key] = value
        return cls(**values)

    def check(self) -> None:
        if self.swap_mode not in SWAP_MODES:
            raise ConfigError(f"swap mode must be one of {', '.join(SWAP_MODES)}, got {self.swap_mode!r}")
        if self.keep < 2:
            raise ConfigError(f"keep must be at least 2 (current and previous), got {self.keep}")
        if self.health_window < 0 or self.health_interval <= 0:
            raise ConfigError("health_window must be >= 0 and health_interval > 0 seconds")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine updates (with --store)")
    g.add_argument("--trust-dir", type=Path, help=f"trusted public keys, *.pub (default {DEFAULT_TRUST_DIR})")
    g.add_argument("--keep-versions", type=int, help=f"engine versions kept in the store (default {DEFAULT_KEEP})")
    g.add_argument("--swap-mode", choices=SWAP_MODES, help="beside: new engine loads next to the live one; drain: "
                   "streams finish, old engine unloads first; auto (default): beside when device memory holds both")
    g.add_argument("--health-window", type=float, help="seconds after an update during which failing health rolls "
                   "back on its own (default 60; 0 turns it off)")
    g.add_argument("--health-interval", type=float, help="seconds between health probes in that window (default 5)")
    g.add_argument("--audit-log", type=Path, help="append-only JSON-lines update log (default STORE/audit.jsonl)")
    g.add_argument("--allow-unsigned", action="store_true", default=None,
                   help="DEVELOPMENT ONLY: accept unsigned bundles (anyone who reaches the admin endpoint can install an engine)")


def settings_from(config, args) -> UpdateSettings:
    settings = UpdateSettings.from_table(getattr(config, "updates", None) or {})
    for arg, field in (("trust_dir", "trust_dir"), ("keep_versions", "keep"), ("swap_mode", "swap_mode"),
                       ("health_window", "health_window"),
                       ("health_interval", "health_interval"), ("audit_log", "audit_log"), ("allow_unsigned", "allow_unsigned")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(settings, field, value)
    settings.check()
    return settings


def current_engine_dir(store_root: Path) -> Path | None:
    """The engine boot() tries first, the store's current version, read before the daemon takes
    the store: `edgellm serve` starts reading its weights while torch is imported."""
    try:
        store = EngineStore(store_root)
        current = store.current_version()
    except (OSError, EdgeLLMError):  # an unusable store is reported by attach(), with its own message
        return None
    return None if current is None else store.engine_dir(current)


def attach(daemon: "Daemon", config, args) -> None:
    settings = settings_from(config, args)
    store = EngineStore(config.store, settings.keep)
    store.lock()
    audit = AuditLog(settings.audit_log or store.root / "audit.jsonl")
    cleaned = store.recover()
    if cleaned:
        audit.record("recovered", cleaned=cleaned)
    device = _device_identity(config.device)
    log.info("updates: device %s; store %s; trust %s", device.describe(), store.root, settings.trust_dir)
    verifier = Verifier(
        TrustStore.load(settings.trust_dir),
        device,
        Policy(Limits(settings.max_bundle_bytes, settings.max_unpacked_bytes), allow_unsigned=settings.allow_unsigned),
    )
    switcher = DaemonSwitcher(daemon, settings, config.device)
    updater = Updater(store, verifier, audit, switcher)
    switcher.updater = updater

    from edgellm.ota import service

    daemon.add_admin_service(lambda server: service.add_to_server(server, updater))
    daemon.engine_source = lambda d: boot(d, updater)


def _device_identity(device: str) -> identity.DeviceIdentity:
    if device == "cpu":
        return identity.cpu_identity("--device cpu")
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    return identity.detect(index)


def boot(daemon: "Daemon", updater: Updater) -> None:
    """Serve the store's current engine; if it will not load, the previous one; else nothing."""
    store = updater.store
    with updater.exclusive("boot"):
        current = store.current_version()
        if current is None:
            log.warning("engine store %s is empty: serving nothing until an engine is pushed (edgellm push)", store.root)
            return
        try:
            daemon.load_engine(store.engine_dir(current), version=current)
            return
        except EdgeLLMError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - any load failure: try the previous version rather than die
            log.exception("loading version %d failed", current)
            error = e
        previous = store.previous_version()
        updater.audit.record("rejected", reason="load-failed", version=current, action="boot", message=str(error))
        if previous is None:
            log.error("version %d does not load (%s) and no previous version is kept: serving nothing until a push", current, error)
            return
        log.error("version %d does not load (%s): booting previous version %d", current, error, previous)
        try:
            daemon.load_engine(store.engine_dir(previous), version=previous)
        except Exception as e:  # noqa: BLE001 - stay up for a push rather than crash-loop under systemd
            log.exception("previous version %d does not load either: serving nothing until a push", previous)
            updater.audit.record("rejected", reason="load-failed", version=previous, action="boot", message=str(e))
            return
        store.rollback()
        updater.audit.record("rolled-back", version=previous, from_version=current, automatic=True, message=f"boot: {error}")


class DaemonSwitcher:
    """Loads, warms and smoke-tests an engine, then hands it to the scheduler."""

    def __init__(self, daemon: "Daemon", settings: UpdateSettings, device: str):
        self.daemon = daemon
        self.settings = settings
        self.device = device
        self.updater: Updater | None = None
        self._watch: threading.Thread | None = None
        self._watch_stop = threading.Event()

    # ---- EngineSwitcher ---------------------------------------------------------------
    def switch_to(self, engine_dir: Path, version: int, engine_id: str) -> str:
        self.stop_watch()
        scheduler = self.daemon.scheduler
        old = scheduler.engine
        if old is None:
            engine = self._load(engine_dir)
            self.daemon.install_engine(engine, version)
            return "initial"
        mode = self.choose_mode(engine_dir)
        log.info("switching to version %d (%s) with a %s swap", version, engine_id, mode)
        from edgellm.serving.scheduler import SwapError

        try:
            if mode == "beside":
                engine = self._load(engine_dir)
                scheduler.swap_engine(engine, mode="beside", timeout=0, version=version)
            else:
                old_dir, old_version = old.engine_dir, scheduler.engine_version
                scheduler.swap_engine(lambda: self._load(engine_dir), mode="drain", timeout=self.settings.swap_timeout,
                                      version=version, restore=lambda: self._load(old_dir, smoke=False))
                log.info("drain swap done; version %d replaced version %d", version, old_version)
        except SwapError as e:
            raise SwapFailed(str(e)) from None
        return mode

    def activated(self, version: int) -> None:
        """Called by the Updater once the store points at `version` after a push or activate."""
        if self.settings.health_window > 0 and self.updater is not None and self.updater.store.previous_version() is not None:
            self._start_watch(version)

    # ---- pieces -----------------------------------------------------------------------
    def choose_mode(self, engine_dir: Path) -> str:
        if self.settings.swap_mode != "auto":
            return self.settings.swap_mode
        need = read_manifest(engine_dir).memory_bytes(self.device)
        free = _device_identity(self.device).free_memory_bytes
        mode = "beside" if free >= need * _MEMORY_MARGIN + _MEMORY_SLACK_BYTES else "drain"
        log.info("new engine needs ~%.0f MiB, device has %.0f MiB free: %s swap", need / 2**20, free / 2**20, mode)
        return mode

    def _load(self, engine_dir: Path, smoke: bool = True):
        from edgellm.engine.runner import Engine
        from edgellm.ota import hooks

        try:
            engine = Engine.load(engine_dir, device=self.device, verify=self.daemon.config.verify)
            engine.warm_up()
        except EdgeLLMError as e:
            raise LoadFailed(f"the engine in {engine_dir} did not load: {e}") from None
        except Exception as e:  # noqa: BLE001 - out of memory, CUDA errors: the live engine must keep serving
            log.exception("loading %s failed", engine_dir)
            raise LoadFailed(f"the engine in {engine_dir} did not load: {type(e).__name__}: {e}") from None
        if smoke:
            try:
                smoke_test(engine)
            except BaseException:
                engine.free()
                raise
        hooks.break_engine_if_asked(engine)
        return engine

    # ---- health watch -----------------------------------------------------------------
    def stop_watch(self) -> None:
        self._watch_stop.set()
        watch = self._watch
        if watch is not None and watch is not threading.current_thread():
            watch.join()
        self._watch = None

    def _start_watch(self, version: int) -> None:
        self.stop_watch()
        self._watch_stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_health, args=(version, self._watch_stop),
                                       name="edgellm-update-health", daemon=True)
        self._watch.start()

    def _watch_health(self, version: int, stop: threading.Event) -> None:
        deadline = time.monotonic() + self.settings.health_window
        while not stop.wait(self.settings.health_interval) and time.monotonic() < deadline:
            problem = probe_health(self.daemon.scheduler, version)
            if problem is None:
                continue
            log.error("version %d is unhealthy after its activation (%s): rolling back", version, problem)
            assert self.updater is not None
            for _ in range(100):  # the push that activated it may still hold the updater
                try:
                    self.updater.rollback(automatic=True, why=f"health failed: {problem}")
                    return
                except UpdateRejected as e:
                    if e.reason != "busy":
                        log.error("automatic rollback failed: %s", e)
                        return
                    time.sleep(0.1)
            return
        if not stop.is_set():
            log.info("version %d stayed healthy for its %g s window", version, self.settings.health_window)


def smoke_test(engine) -> None:
    """A few greedy tokens: they must come out, inside the vocabulary, from finite logits."""
    prompt = engine.tokenizer.encode("Hello")[: max(1, engine.max_seq_len // 2)] or [0]
    try:
        logits = engine.prefill(0, prompt, 0)
        tokens = []
        for step in range(SMOKE_TOKENS):
            if not bool(logits.isfinite().all()):
                raise SmokeFailed(f"engine {engine.engine_id} produced NaN or infinite logits at step {step}; "
                                  "the engine is broken, rebuild it")
            token = int(logits.argmax())
            if not 0 <= token < engine.config.vocab_size:
                raise SmokeFailed(f"engine {engine.engine_id} produced token {token} outside its vocabulary")
            tokens.append(token)
            if len(prompt) + len(tokens) >= engine.max_seq_len:
                break
            logits = engine.decode([0], [token], [len(prompt) + len(tokens) - 1])[0]
    except UpdateRejected:
        raise
    except Exception as e:  # noqa: BLE001
        raise SmokeFailed(f"engine {engine.engine_id} failed its smoke generation: {type(e).__name__}: {e}") from None
    log.info("smoke test of %s: tokens %s", engine.engine_id, tokens)


def probe_health(scheduler, version: int) -> str | None:
    """Run one tiny request through the scheduler; a description of the problem, or None.
    A busy or draining daemon is not unhealthy: only a failure on the engine counts."""
    from edgellm.engine.sampling import SamplingParams
    from edgellm.serving.scheduler import Chunk, Failure, Prompt, Rejected

    engine = scheduler.engine
    if engine is None:
        return "no engine is installed"
    if scheduler.engine_version != version:
        return None  # someone moved on (rollback, newer push): not ours to judge
    try:
        request = scheduler.submit(Prompt(token_ids=[engine.tokenizer.bos_id or 1]), SamplingParams(max_new_tokens=2))
    except Rejected:
        return None
    while True:
        try:
            event = request.events.get(timeout=_PROBE_TIMEOUT)
        except queue.Empty:
            scheduler.cancel(request)
            return None  # a queue this slow is load, not a broken engine (the watchdog catches hangs)
        if isinstance(event, Failure):
            return None if event.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED") else f"{event.code}: {event.message}"
        if isinstance(event, Chunk) and event.finish_reason is not None:
            return None

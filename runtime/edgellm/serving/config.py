"""The daemon's settings: defaults, then the TOML file (/etc/edgellm/edgellm.toml), then the
command line, each overriding the one before.

    [engine]
    path = "/var/lib/edgellm/engines/demo"   # serve this engine directory, or
    store = "/var/lib/edgellm/engines"       # serve the engine store's current engine (updates)
    device = "auto"                          # auto, cpu, cuda, cuda:N
    verify = true                            # check every file's sha256 at load

    [server]
    listen = "unix:///run/edgellm/edgellm.sock"   # Generator + Health + reflection, mode 0660
    socket_group = ""                             # group that owns it (kiosk apps' group)
    admin_listen = "unix:///run/edgellm/admin.sock"  # Admin (+ Updates), mode 0600
    tcp_listen = ""              # e.g. "127.0.0.1:50051": Generator on TCP too (TLS if [tls] set)
    admin_tcp_listen = ""        # e.g. "0.0.0.0:50052": Admin on TCP; needs mutual TLS
    grace_period = 30.0          # seconds in-flight streams get on SIGTERM

    [tls]
    cert = ""        # server certificate chain (PEM)
    key = ""         # its private key (PEM)
    client_ca = ""   # CA that signs client certificates: set = mutual TLS

    [scheduler]
    queue_depth = 16           # requests waiting for a slot; beyond that RESOURCE_EXHAUSTED
    prefill_chunk = 128        # prompt tokens a slot prefills per iteration
    default_max_tokens = 256   # when a request does not say (clamped to the room left)

    [metrics]
    listen = "127.0.0.1:9464"  # Prometheus text at /metrics; "" turns it off

    [log]
    level = "info"

    [updates]                  # read by the engine-update part (edgellm.ota), passed through
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError
from edgellm.tomlfile import read_toml

DEFAULT_CONFIG_PATH = Path("/etc/edgellm/edgellm.toml")
DEFAULT_LISTEN = "unix:///run/edgellm/edgellm.sock"
DEFAULT_ADMIN_LISTEN = "unix:///run/edgellm/admin.sock"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclasses.dataclass
class ServeConfig:
    engine: Path | None = None
    store: Path | None = None
    device: str = "auto"
    verify: bool = True
    listen: str = DEFAULT_LISTEN
    socket_group: str = ""
    admin_listen: str = DEFAULT_ADMIN_LISTEN
    tcp_listen: str = ""
    admin_tcp_listen: str = ""
    grace_period: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    queue_depth: int = 16
    prefill_chunk: int = 128
    default_max_tokens: int = 256
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    log_level: str = "info"
    updates: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        if self.engine is not None and self.store is not None:
            raise ConfigError("set either an engine directory or an engine store, not both")
        if self.engine is None and self.store is None:
            raise ConfigError("no engine to serve: pass --engine ENGINE_DIR or --store STORE_DIR (or set [engine] path/store in the config)")
        for name in ("listen", "admin_listen"):
            value = getattr(self, name)
            if value and not value.startswith("unix:"):
                raise ConfigError(f"{name} must be a unix socket address (unix:///path), got {value!r}; use tcp_listen / admin_tcp_listen for TCP")
        for name in ("tcp_listen", "admin_tcp_listen", "metrics_listen"):
            value = getattr(self, name)
            if value:
                split_host_port(value, name)
        if self.queue_depth < 0:
            raise ConfigError(f"queue_depth must be 0 or more, got {self.queue_depth}")
        if self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")
        if self.grace_period < 0:
            raise ConfigError(f"grace_period must be 0 or more seconds, got {self.grace_period}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("[tls] cert and key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("[tls] client_ca (mutual TLS) needs the server's cert and key too")
        if self.admin_tcp_listen and self.tls_client_ca is None:
            raise ConfigError(
                "admin_tcp_listen serves the admin API over TCP, which needs mutual TLS: set [tls] cert, key and client_ca"
            )
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"[tls] {name.removeprefix('tls_')} file {path} does not exist")


# (TOML table, key) -> field. One table per concern, as the operator reads the file.
_TOML_FIELDS = {
    ("engine", "path"): "engine",
    ("engine", "store"): "store",
    ("engine", "device"): "device",
    ("engine", "verify"): "verify",
    ("server", "listen"): "listen",
    ("server", "socket_group"): "socket_group",
    ("server", "admin_listen"): "admin_listen",
    ("server", "tcp_listen"): "tcp_listen",
    ("server", "admin_tcp_listen"): "admin_tcp_listen",
    ("server", "grace_period"): "grace_period",
    ("tls", "cert"): "tls_cert",
    ("tls", "key"): "tls_key",
    ("tls", "client_ca"): "tls_client_ca",
    ("scheduler", "queue_depth"): "queue_depth",
    ("scheduler", "prefill_chunk"): "prefill_chunk",
    ("scheduler", "default_max_tokens"): "default_max_tokens",
    ("metrics", "listen"): "metrics_listen",
    ("log", "level"): "log_level",
}
_PASS_THROUGH_TABLES = ("updates",)


def _coerce(field: dataclasses.Field, value: Any, where: str) -> Any:
    kind = {"engine": Path, "store": Path, "tls_cert": Path, "tls_key": Path, "tls_client_ca": Path}.get(field.name)
    if kind is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path string, got {value!r}")
        return Path(value) if value else None
    default = field.default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a TOML file sets, by field name."""
    data = read_toml(path, "config file")
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    settings: dict[str, Any] = {}
    for table, body in data.items():
        if table in _PASS_THROUGH_TABLES:
            if not isinstance(body, dict):
                raise ConfigError(f"{path}: [{table}] must be a table")
            settings[table] = body
            continue
        known = sorted({t for t, _ in _TOML_FIELDS} | set(_PASS_THROUGH_TABLES))
        if not isinstance(body, dict) or table not in known:
            raise ConfigError(f"{path}: unknown table [{table}]; known tables: {', '.join(known)}")
        for key, value in body.items():
            name = _TOML_FIELDS.get((table, key))
            if name is None:
                allowed = sorted(k for t, k in _TOML_FIELDS if t == table)
                raise ConfigError(f"{path}: unknown key {key!r} in [{table}]; allowed: {', '.join(allowed)}")
            settings[name] = _coerce(fields[name], value, f"{path}: [{table}] {key}")
    return settings


def load_config(path: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    """Defaults < file < overrides (command-line values that were given, i.e. not None)."""
    settings: dict[str, Any] = {}
    if path is not None:
        settings.update(read_config_file(path))
    elif DEFAULT_CONFIG_PATH.is_file():
        settings.update(read_config_file(DEFAULT_CONFIG_PATH))
    given = {k: v for k, v in overrides.items() if v is not None}
    # An engine source on the command line replaces the file's, whichever kind the file named.
    if "engine" in given or "store" in given:
        settings.pop("engine", None)
        settings.pop("store", None)
    settings.update(given)
    config = ServeConfig(**settings)
    config.check()
    return config


def split_host_port(address: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what} must be HOST:PORT (e.g. 127.0.0.1:9464), got {address!r}")
    return host.strip("[]"), int(port)


def unix_socket_path(address: str) -> Path:
    """unix:///run/x.sock and unix:/run/x.sock -> /run/x.sock (grpc accepts both forms)."""
    path = address.removeprefix("unix:")
    if path.startswith("//"):
        path = path[2:]
    return Path(path)

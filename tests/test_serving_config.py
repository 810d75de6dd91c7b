"""Daemon settings: TOML file, command-line overrides, and errors that say what to fix."""

from pathlib import Path

import pytest

from edgellm.errors import ConfigError
from edgellm.serving.config import ServeConfig, load_config, unix_socket_path

FULL = """
[engine]
store = "/var/lib/edgellm/engines"
device = "cuda"
verify = false

[server]
listen = "unix:///run/x/gen.sock"
admin_listen = "unix:///run/x/admin.sock"
socket_group = "edgellm-clients"
grace_period = 12

[scheduler]
queue_depth = 3
prefill_chunk = 64
default_max_tokens = 100

[metrics]
listen = ""

[log]
level = "debug"

[updates]
trust_dir = "/etc/edgellm/trusted.d"
keep = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgellm.toml"
    path.write_text(text)
    return path


def test_file_then_command_line(tmp_path):
    path = write(tmp_path, FULL)
    config = load_config(path, {})
    assert config.store == Path("/var/lib/edgellm/engines") and config.engine is None
    assert (config.device, config.verify, config.grace_period) == ("cuda", False, 12.0)
    assert (config.queue_depth, config.prefill_chunk, config.default_max_tokens) == (3, 64, 100)
    assert config.metrics_listen == "" and config.socket_group == "edgellm-clients" and config.log_level == "debug"
    assert config.updates == {"trust_dir": "/etc/edgellm/trusted.d", "keep": 3}  # passed through for the updater
    # An engine directory on the command line replaces the file's store; unset options keep the file's values.
    config = load_config(path, {"engine": Path("/tmp/e"), "queue_depth": 9, "listen": None})
    assert config.engine == Path("/tmp/e") and config.store is None
    assert config.queue_depth == 9 and config.listen == "unix:///run/x/gen.sock"


@pytest.mark.parametrize("text, message", [
    ("[server]\nlisten = 5\n", "[server] listen must be a string"),
    ("[server]\nlisen = 'unix:///x'\n", "unknown key 'lisen' in [server]; allowed: admin_listen"),
    ("[sever]\n", "unknown table [sever]"),
    ("[scheduler]\nqueue_depth = 'many'\n", "queue_depth must be an integer"),
    ("[server]\nlisten = 'tcp://0.0.0.0:1'\n", "listen must be a unix socket address"),
    ("[server]\nadmin_tcp_listen = '0.0.0.0:50052'\n", "needs mutual TLS"),
    ("[tls]\ncert = '/nonexistent.crt'\n", "cert and key go together"),
    ("[metrics]\nlisten = 'localhost'\n", "must be HOST:PORT"),
    ("not toml [", "is not valid TOML"),
])
def test_mistakes_are_named(tmp_path, text, message):
    path = write(tmp_path, "[engine]\npath = '/tmp/e'\n" + text if text.startswith("[") else text)
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    assert message in str(e.value)


def test_an_engine_source_is_required():
    with pytest.raises(ConfigError, match="--engine ENGINE_DIR or --store STORE_DIR"):
        ServeConfig().check()


def test_unix_socket_addresses():
    assert unix_socket_path("unix:///run/edgellm/edgellm.sock") == Path("/run/edgellm/edgellm.sock")
    assert unix_socket_path("unix:/run/a.sock") == Path("/run/a.sock")

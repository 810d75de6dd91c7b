"""The one TOML reader for settings files (build profiles, the daemon's config)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError


def read_toml(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    """`what` names the file for the reader ("config file", "profile"); `hint` says where to look."""
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path} not found" + (f"; {hint}" if hint else ""))
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML ({e})") from None

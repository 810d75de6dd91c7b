"""The device's trust store: a directory of Ed25519 public keys (`*.pub`), e.g. /etc/edgellm/trusted.d/.

Read-only from the device's point of view: adding or removing a key is an administrator's
act on the filesystem (or the package manager's), never something an update can do.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgellm.errors import ConfigError
from edgellm.ota.errors import UntrustedKey
from edgellm.ota.signing import PUBLIC_SUFFIX, key_id, load_public_key


log = logging.getLogger("edgellm.ota")


class TrustStore:
    def __init__(self, keys: dict[str, tuple[Ed25519PublicKey, Path]], directory: Path | None = None):
        self._keys = keys
        self.directory = directory

    @classmethod
    def load(cls, directory: Path) -> "TrustStore":
        """Every readable Ed25519 `*.pub` in `directory`. A broken key file is skipped loudly:
        not trusting it is the safe side, and one bad file must not block every update."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(
                f"trust directory {directory} does not exist; create it and copy the fleet's public key(s) "
                f"(*{PUBLIC_SUFFIX} from `edgellm keygen`) into it"
            )
        _warn_if_writable_by_others(directory)
        keys: dict[str, tuple[Ed25519PublicKey, Path]] = {}
        for path in sorted(directory.glob("*" + PUBLIC_SUFFIX)):
            _warn_if_writable_by_others(path)
            try:
                key = load_public_key(path.read_bytes(), str(path))
            except (ConfigError, OSError) as e:
                log.warning("trust store: ignoring %s: %s", path, e)
                continue
            keys[key_id(key)] = (key, path)
        if not keys:
            log.warning("trust store %s holds no usable *%s key: every signed update will be refused", directory, PUBLIC_SUFFIX)
        return cls(keys, directory)

    def __len__(self) -> int:
        return len(self._keys)

    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def get(self, kid: str) -> Ed25519PublicKey:
        entry = self._keys.get(kid)
        if entry is None:
            where = f" in {self.directory}" if self.directory else ""
            raise UntrustedKey(
                f"the bundle is signed by key {kid[:16]}, which is not among the {len(self._keys)} trusted key(s){where}; "
                "sign it with a fleet key, or install that key's .pub in the trust directory if it is legitimate"
            )
        return entry[0]


def _warn_if_writable_by_others(path: Path) -> None:
    """Whoever can write the trust store can sign updates: it should be root's alone."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning("trust store: %s is writable by group or others; anyone who can write it can install engines "
                    "(chmod go-w %s)", path, path)

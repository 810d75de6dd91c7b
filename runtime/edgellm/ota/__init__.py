"""Over-the-air engine updates: signed bundles, checked against this device, hot-swapped.

    signing.py   Ed25519 keys (`edgellm keygen`) and the signed statement
    bundle.py    the one-file bundle (uncompressed tar) and its archive-safety checks
    trust.py     the device's trust store, a directory of *.pub keys
    identity.py  GPU name, SM, driver and memory from cuda-python (no torch)
    verify.py    the ordered checks, each with its own exception (errors.py)
    store.py     versions on disk, `current`/`previous` pointers moved atomically
    audit.py     append-only JSON-lines log + journal
    updater.py   the one object that changes what the device serves
    service.py   the Updates gRPC service (admin endpoint); client.py its client
    daemon.py    `edgellm serve --store`: boot, swap, health watch, automatic rollback
    hooks.py     test hooks (crash at an install stage, break an engine)

Nothing here imports torch at import time: a bundle is judged before model code runs.
"""

from pathlib import Path

# Where the device's trusted public keys live; here (not in trust.py) so that commands can
# name it without importing cryptography, which `serve --engine` must not need.
DEFAULT_TRUST_DIR = Path("/etc/edgellm/trusted.d")

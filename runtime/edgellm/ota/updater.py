"""The updater: the one object that changes what this device serves.

It owns the engine store's pointers (the trusted state). The network-facing code (the
Updates servicer) hands it an upload and gets back a result or an UpdateRejected; it never
touches the store itself. One update runs at a time; a second one is refused as "busy".

    push:     receive -> verify (ota/verify.py) -> commit to the store -> switch -> move pointer
    activate: re-verify an installed version -> switch -> move pointer
    rollback: switch to the kept previous version -> move pointer back

"switch" is the daemon's business (load, warm, smoke-test, swap between scheduler
iterations): an EngineSwitcher. Without one (offline tools, tests) versions are only
installed and pointed at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from edgellm.ota import hooks
from edgellm.ota.audit import AuditLog
from edgellm.ota.errors import Busy, InstallFailed, NoPrevious, NoSpace, UpdateRejected, UploadSizeMismatch
from edgellm.ota.store import EngineStore, VersionInfo
from edgellm.ota.verify import Verified, Verifier


class EngineSwitcher(Protocol):
    def switch_to(self, engine_dir: Path, version: int, engine_id: str) -> str:
        """Make the daemon serve the engine in engine_dir; returns how ("beside" or "drain").
        Raise UpdateRejected (LoadFailed, SmokeFailed, SwapFailed) with the live engine
        still serving if it cannot."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    version: int
    engine_id: str
    activated: bool
    key_id: str | None
    swap_mode: str = ""  # "beside" / "drain" when activated by a daemon


class Updater:
    def __init__(self, store: EngineStore, verifier: Verifier, audit: AuditLog, switcher: EngineSwitcher | None = None):
        self.store = store
        self.verifier = verifier
        self.audit = audit
        self.switcher = switcher
        self._busy = threading.Lock()

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Hold the updater for one operation; a concurrent one is refused as busy."""
        if not self._busy.acquire(blocking=False):
            raise Busy(f"another update is in progress; retry the {what} when it has finished")
        try:
            yield
        finally:
            self._busy.release()

    # ---- queries ------------------------------------------------------------------------
    def list_versions(self) -> list[VersionInfo]:
        return self.store.list_versions()

    # ---- push ---------------------------------------------------------------------------
    def push(self, size: int, sha256: str, chunks: Iterable[bytes], activate: bool = True, peer: str | None = None) -> PushResult:
        with self.exclusive("push"):
            self.audit.record("received", size=size, sha256=sha256, peer=peer)
            bundle = None
            try:
                bundle = self.receive(size, sha256, chunks)
                verified = self.verifier.verify_bundle(
                    bundle, self.store.new_work_path("install"), self.store.current_version()
                )
                hooks.stage("verified")
                version = verified.statement.version
                self.store.commit(verified.directory, version)
                hooks.stage("committed")
                self.audit.record(
                    "installed", version=version, engine_id=verified.manifest.engine_id, key_id=verified.key_id, sha256=sha256
                )
                swap_mode = ""
                if activate:
                    try:
                        swap_mode = self._switch(version, verified.manifest.engine_id)
                    except UpdateRejected:
                        # It failed on this device: keeping it would only invite activating it again.
                        self.store.remove(version)
                        raise
            except OSError as e:
                error = _io_error(e)
                self.audit.record("rejected", reason=error.reason, message=error.detail, sha256=sha256, peer=peer)
                raise error from e
            except UpdateRejected as e:
                self.audit.record("rejected", reason=e.reason, message=e.detail, sha256=sha256, peer=peer)
                raise
            finally:
                if bundle is not None:
                    bundle.unlink(missing_ok=True)
            return PushResult(version, verified.manifest.engine_id, activate, verified.key_id, swap_mode)

    def receive(self, size: int, sha256: str, chunks: Iterable[bytes]) -> Path:
        """Write the upload to staging/, hashing as it comes; step 'upload' of the checks."""
        self.verifier.check_announced_size(size)
        free = shutil.disk_usage(self.store.root).free
        if free < 2 * size:  # the bundle and its unpacked copy live side by side until commit
            raise NoSpace(f"the store has {free} bytes free; this {size}-byte bundle needs {2 * size} while installing. "
                          "Free space or lower the number of kept versions")
        path = self.store.new_work_path("upload").with_suffix(".bundle")
        digest = hashlib.sha256()
        received = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise UploadSizeMismatch(f"the upload sent more than the {size} bytes its header announced; re-send it")
                    f.write(chunk)
                    digest.update(chunk)
                    hooks.stage("upload")
            self.verifier.check_upload(received, size, digest.hexdigest(), sha256)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def install_file(self, bundle_path: Path) -> Verified:
        """Verify and commit a bundle already on this machine (no switch, no pointer move)."""
        with self.exclusive("install"):
            try:
                verified = self.verifier.verify_bundle(
                    bundle_path, self.store.new_work_path("install"), self.store.current_version()
                )
                self.store.commit(verified.directory, verified.statement.version)
            except UpdateRejected as e:
                self.audit.record("rejected", reason=e.reason, message=e.detail, bundle=str(bundle_path))
                raise
            self.audit.record("installed", version=verified.statement.version, engine_id=verified.manifest.engine_id,
                              key_id=verified.key_id)
            return dataclasses.replace(verified, directory=self.store.version_dir(verified.statement.version))

    # ---- activate / rollback ------------------------------------------------------------
    def activate(self, version: int) -> tuple[VersionInfo, str]:
        """Returns the now-current version and the swap mode."""
        with self.exclusive("activation"):
            try:
                self.store.describe(version)  # UnknownVersion
                verified = self.verifier.verify_installed(self.store.version_dir(version), self.store.current_version())
                swap_mode = self._switch(version, verified.manifest.engine_id)
            except UpdateRejected as e:
                self.audit.record("rejected", reason=e.reason, message=e.detail, version=version, action="activate")
                raise
            return self.store.describe(version), swap_mode

    def rollback(self, automatic: bool = False, why: str | None = None) -> VersionInfo:
        with self.exclusive("rollback"):
            from_version = self.store.current_version()
            try:
                previous = self.store.previous_version()
                if previous is None:
                    raise NoPrevious("there is no previous version kept in the store to roll back to")
                info = self.store.describe(previous)
                if self.switcher is not None:
                    self.switcher.switch_to(self.store.engine_dir(previous), previous, info.engine_id)
                self.store.rollback()
            except UpdateRejected as e:
                self.audit.record("rejected", reason=e.reason, message=e.detail, action="rollback", automatic=automatic)
                raise
            self.audit.record("rolled-back", version=previous, from_version=from_version, automatic=automatic, message=why)
            return self.store.describe(previous)

    def _switch(self, version: int, engine_id: str) -> str:
        from_version = self.store.current_version()
        swap_mode = ""
        if self.switcher is not None:
            swap_mode = self.switcher.switch_to(self.store.engine_dir(version), version, engine_id)
        self.store.activate(version)
        hooks.stage("activated")
        self.audit.record("activated", version=version, engine_id=engine_id, from_version=from_version, swap_mode=swap_mode or None)
        pruned = self.store.prune()
        if pruned:
            self.audit.record("pruned", versions=pruned)
        activated = getattr(self.switcher, "activated", None)
        if activated is not None:
            activated(version)  # e.g. the daemon's health watch, which may roll back on its own
        return swap_mode


def _io_error(e: OSError) -> UpdateRejected:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"the engine store ran out of space while installing ({e}); free space or keep fewer versions")
    return InstallFailed(f"the engine store could not be written ({e}); check the disk and the store's permissions")

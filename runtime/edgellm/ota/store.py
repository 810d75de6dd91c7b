"""The engine store on the device (/var/lib/edgellm/engines/):

    versions/<N>/engine/...        one directory per engine version, never changed once in place
    versions/<N>/statement.json    the signed statement it was installed with
    versions/<N>/signature
    current, previous              pointer files holding a version number
    staging/                       uploads and unpacking in progress; emptied at start-up
    lock                           flock'd by the one process that owns the store

Crash safety comes from ordering. A version directory is complete and fsync'd in staging/
before one rename puts it under versions/. A pointer is written to a temporary file,
fsync'd, renamed over the old one, and the directory fsync'd. Activation writes `previous`
before `current`, so a crash between the two leaves both naming the old version: the
device always boots a complete engine, the old or the new, never a mix.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from edgellm.errors import ConfigError
from edgellm.ota import hooks
from edgellm.ota.errors import NoPrevious, UnknownVersion, VersionNotNewer

DEFAULT_STORE_DIR = Path("/var/lib/edgellm/engines")
DEFAULT_KEEP = 3
VERSIONS = "versions"
STAGING = "staging"
CURRENT = "current"
PREVIOUS = "previous"
ENGINE_SUBDIR = "engine"

log = logging.getLogger("edgellm.ota")


@dataclasses.dataclass(frozen=True)
class VersionInfo:
    version: int
    engine_id: str
    state: str  # "current", "previous" or "installed"
    key_id: str | None
    signed_at: str
    expires: str | None
    size_bytes: int
    installed_at: float  # unix time the directory was committed


class EngineStore:
    def __init__(self, root: Path, keep: int = DEFAULT_KEEP):
        if keep < 2:
            raise ConfigError(f"the store must keep at least 2 versions (current and previous), got {keep}")
        self.root = Path(root).absolute()
        self.keep = keep
        self._lock_fd: int | None = None
        for sub in (self.root, self.root / VERSIONS, self.root / STAGING):
            sub.mkdir(mode=0o755, parents=True, exist_ok=True)

    # ---- ownership ----------------------------------------------------------------------
    def lock(self) -> None:
        """Take the store for this process (the daemon holds it for its life)."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"engine store {self.root} is in use by another process (pid {holder}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- reading ------------------------------------------------------------------------
    def version_dir(self, version: int) -> Path:
        return self.root / VERSIONS / str(version)

    def engine_dir(self, version: int) -> Path:
        return self.version_dir(version) / ENGINE_SUBDIR

    def versions(self) -> list[int]:
        found = []
        for p in (self.root / VERSIONS).iterdir():
            if p.name.isdigit() and p.is_dir() and not p.is_symlink():
                found.append(int(p.name))
        return sorted(found)

    def current_version(self) -> int | None:
        return self._read_pointer(CURRENT)

    def previous_version(self) -> int | None:
        prev = self._read_pointer(PREVIOUS)
        return None if prev == self.current_version() else prev

    def _read_pointer(self, name: str) -> int | None:
        try:
            text = (self.root / name).read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            log.error("store pointer %s holds %r, not a version number; ignoring it", self.root / name, text[:32])
            return None
        version = int(text)
        return version if self.version_dir(version).is_dir() else None

    def describe(self, version: int) -> VersionInfo:
        """What the store holds for `version`: informational, not a verification."""
        vdir = self.version_dir(version)
        if not vdir.is_dir():
            raise UnknownVersion(f"version {version} is not in the store (installed: {self.versions() or 'none'})")
        statement, signature = {}, {}
        try:
            statement = json.loads((vdir / "statement.json").read_text())
            if (vdir / "signature").exists():
                signature = json.loads((vdir / "signature").read_text())
        except (OSError, ValueError):
            pass
        size = sum(p.stat().st_size for p in vdir.rglob("*") if p.is_file())
        state = {self.current_version(): "current", self.previous_version(): "previous"}.get(version, "installed")
        return VersionInfo(
            version=version,
            engine_id=str(statement.get("engine_id", "?")),
            state=state,
            key_id=signature.get("key_id"),
            signed_at=str(statement.get("signed_at", "")),
            expires=statement.get("expires"),
            size_bytes=size,
            installed_at=vdir.stat().st_mtime,
        )

    def list_versions(self) -> list[VersionInfo]:
        return [self.describe(v) for v in reversed(self.versions())]

    # ---- start-up -----------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Remove what a crash can leave behind: staging work, half-written pointer files,
        pointers to versions that are gone. Returns what was cleaned, for the log."""
        cleaned = []
        for p in (self.root / STAGING).iterdir():
            _remove(p)
            cleaned.append(f"{STAGING}/{p.name}")
        for name in (CURRENT, PREVIOUS):
            tmp = self.root / (name + ".tmp")
            if tmp.exists():
                tmp.unlink()
                cleaned.append(tmp.name)
        for p in (self.root / VERSIONS).iterdir():
            if not (p.name.isdigit() and p.is_dir() and not p.is_symlink()):
                _remove(p)
                cleaned.append(f"{VERSIONS}/{p.name}")
        raw_current = _raw_pointer(self.root / CURRENT)
        if raw_current is not None and self.current_version() is None:
            # The version `current` names is gone (removed by hand?): boot the previous one.
            previous = self._read_pointer(PREVIOUS)
            log.error("store: current version %s is missing; falling back to previous %s", raw_current, previous)
            if previous is not None:
                self._write_pointer(CURRENT, previous)
            else:
                self._clear_pointer(CURRENT)
            cleaned.append(f"{CURRENT} (named missing version {raw_current})")
        if _raw_pointer(self.root / PREVIOUS) is not None and self._read_pointer(PREVIOUS) is None:
            self._clear_pointer(PREVIOUS)
            cleaned.append(PREVIOUS)
        _fsync_dir(self.root)
        return cleaned

    # ---- installing ---------------------------------------------------------------------
    def new_work_path(self, kind: str) -> Path:
        """A fresh, not yet existing path in staging/ (kind: 'upload' or 'install')."""
        return self.root / STAGING / f"{kind}-{uuid.uuid4().hex}"

    def commit(self, prepared: Path, version: int) -> Path:
        """Move a complete, verified version directory from staging/ into versions/."""
        prepared = Path(prepared)
        target = self.version_dir(version)
        if target.exists():
            if version in (self.current_version(), self.previous_version()):
                raise VersionNotNewer(f"version {version} is already installed as the {self.describe(version).state} version")
            # An inactive copy from an earlier push: the verified new one replaces it.
            self.remove(version)
        for path in sorted(prepared.rglob("*"), reverse=True):
            if path.is_file():
                path.chmod(0o444)
                _fsync_file(path)
            else:
                _fsync_dir(path)
        _fsync_dir(prepared)
        os.rename(prepared, target)
        _fsync_dir(target.parent)
        return target

    def activate(self, version: int) -> None:
        """current := version, previous := the old current (previous written first)."""
        if not self.version_dir(version).is_dir():
            raise UnknownVersion(f"version {version} is not in the store (installed: {self.versions() or 'none'})")
        old = self.current_version()
        if old == version:
            return
        if old is not None:
            self._write_pointer(PREVIOUS, old)
        hooks.stage("pointers")
        self._write_pointer(CURRENT, version)

    def rollback(self) -> int:
        """current := previous; `previous` is then cleared (rolling back twice is not a toggle)."""
        previous = self.previous_version()
        if previous is None:
            raise NoPrevious("there is no previous version kept in the store to roll back to")
        self._write_pointer(CURRENT, previous)
        self._clear_pointer(PREVIOUS)
        return previous

    def remove(self, version: int) -> None:
        if version in (self.current_version(), self.previous_version()):
            raise ConfigError(f"version {version} is the {self.describe(version).state} version and cannot be removed")
        vdir = self.version_dir(version)
        if not vdir.exists():
            return
        # Rename out of versions/ first: a crash mid-delete leaves only staging/ work, which start-up clears.
        doomed = self.new_work_path(f"remove-{version}")
        os.rename(vdir, doomed)
        _fsync_dir(vdir.parent)
        _remove(doomed)

    def prune(self) -> list[int]:
        """Keep current, previous and the newest others up to `keep` versions in all."""
        protected = {v for v in (self.current_version(), self.previous_version()) if v is not None}
        others = [v for v in reversed(self.versions()) if v not in protected]
        room = max(self.keep - len(protected), 0)
        doomed = others[room:]
        for v in doomed:
            self.remove(v)
        return doomed

    # ---- pointers -----------------------------------------------------------------------
    def _write_pointer(self, name: str, version: int) -> None:
        path = self.root / name
        tmp = self.root / (name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{version}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.root)

    def _clear_pointer(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)
        _fsync_dir(self.root)


def _raw_pointer(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The bundle: one uncompressed tar file carrying an engine and its signed statement.

    statement.json          canonical JSON (ota/signing.py), the signed bytes
    signature               JSON: key id + Ed25519 signature over statement.json
    engine/manifest.json    the engine manifest (its sha256 is in the statement)
    engine/<file>           every file the manifest lists, nothing else

Uncompressed so `tar tvf` can inspect it and nothing decompresses attacker-sized data.
The reader never calls tarfile's extract: it walks the headers first and refuses links,
devices, unsafe or duplicate names and oversized content before a single byte is written,
then copies only regular members, by their checked names, into files it creates itself.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable

from edgellm.engine.manifest import MANIFEST_NAME, check_relative_path, read_manifest
from edgellm.errors import EngineFormatError
from edgellm.ota.errors import (
    DuplicateEntry,
    LinkEntry,
    MalformedBundle,
    Oversized,
    PathTraversal,
    SpecialEntry,
    UploadTruncated,
)

STATEMENT_NAME = "statement.json"
SIGNATURE_NAME = "signature"
ENGINE_DIR = "engine"
_COPY_CHUNK = 1 << 20
_SMALL_MEMBER_LIMIT = 16 << 20  # statement, signature and manifest are read into memory
_TRAILER_LIMIT = 1 << 16  # tar pads to 10 KiB records; more than this after the end is not padding


@dataclasses.dataclass(frozen=True)
class Limits:
    max_bundle_bytes: int = 32 << 30
    max_unpacked_bytes: int = 32 << 30
    max_members: int = 1000


def write_bundle(engine_dir: Path, out_path: Path, statement_bytes: bytes, signature_bytes: bytes | None) -> None:
    """Write statement, signature (None: an unsigned bundle, for development) and the
    manifest's files. Written to OUT.partial and renamed, so a half-written bundle never
    carries the final name."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, STATEMENT_NAME, statement_bytes)
            if signature_bytes is not None:
                _add_bytes(tar, SIGNATURE_NAME, signature_bytes)
            _add_file(tar, f"{ENGINE_DIR}/{MANIFEST_NAME}", engine_dir / MANIFEST_NAME)
            for rel in sorted(manifest.files):
                _add_file(tar, f"{ENGINE_DIR}/{rel}", engine_dir / rel)
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner and time: the same engine and statement give the same bundle bytes.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    if path.is_symlink() or not path.is_file():
        raise EngineFormatError(f"{path} is listed in the manifest but is not a regular file; rebuild the engine")
    with open(path, "rb") as f:
        tar.addfile(_tarinfo(name, os.fstat(f.fileno()).st_size), f)


class BundleReader:
    """Open with `BundleReader.open(path, limits)`: the archive-safety checks run there."""

    def __init__(self, path: Path, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]):
        self.path = path
        self._tar = tar
        self._members = members  # name -> member, regular files only

    @classmethod
    def open(cls, path: Path, limits: Limits) -> "BundleReader":
        path = Path(path)
        file_size = path.stat().st_size
        try:
            tar = tarfile.open(path, mode="r:")  # "r:" = no decompression, ever
        except tarfile.ReadError as e:
            raise MalformedBundle(f"{path.name} is not an uncompressed tar bundle ({e}); make bundles with `edgellm sign`") from None
        try:
            members = cls._check_headers(tar, file_size, limits)
        except BaseException:
            tar.close()
            raise
        return cls(path, tar, members)

    @staticmethod
    def _check_headers(tar: tarfile.TarFile, file_size: int, limits: Limits) -> dict[str, tarfile.TarInfo]:
        members: dict[str, tarfile.TarInfo] = {}
        seen: set[str] = set()
        total = 0
        count = 0
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as e:
                # tarfile reports a header cut short as "unexpected end of data".
                if "unexpected end" in str(e) or "truncated" in str(e):
                    raise UploadTruncated(f"the bundle ends in the middle of a tar header ({e}); re-send it whole") from None
                raise MalformedBundle(f"the bundle's tar structure is damaged ({e}); re-create it with `edgellm sign`") from None
            if member is None:
                break
            count += 1
            if count > limits.max_members:
                raise Oversized(f"the bundle has more than {limits.max_members} entries; an engine has a handful of files")
            name = member.name
            _check_name(name)
            if name in seen:
                raise DuplicateEntry(f"entry {name!r} appears twice in the bundle; the later copy could replace a checked one")
            seen.add(name)
            if member.issym() or member.islnk():
                raise LinkEntry(f"entry {name!r} is a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r}); bundles carry regular files only")
            if member.isdir():
                continue
            if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                raise SpecialEntry(f"entry {name!r} is a device, fifo or sparse file (tar type {member.type!r}); bundles carry regular files only")
            if member.offset_data + member.size > file_size:
                raise UploadTruncated(
                    f"entry {name!r} needs {member.size} bytes but the bundle ends {member.offset_data + member.size - file_size} bytes "
                    "early; it was truncated in transit, re-send it"
                )
            total += member.size
            if total > limits.max_unpacked_bytes:
                raise Oversized(
                    f"the bundle unpacks to more than the limit of {limits.max_unpacked_bytes} bytes; "
                    "raise the device's unpacked-size limit if this engine is legitimate"
                )
            if name != f"{ENGINE_DIR}/{MANIFEST_NAME}" and name.partition("/")[0] != ENGINE_DIR and name not in (STATEMENT_NAME, SIGNATURE_NAME):
                raise MalformedBundle(f"unexpected entry {name!r}: a bundle holds {STATEMENT_NAME}, {SIGNATURE_NAME} and {ENGINE_DIR}/*")
            members[name] = member
        _check_trailer(tar, file_size)
        for required in (STATEMENT_NAME, f"{ENGINE_DIR}/{MANIFEST_NAME}"):
            if required not in members:
                raise MalformedBundle(f"the bundle has no {required}; make bundles with `edgellm sign`")
        return members

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- contents ---------------------------------------------------------------------
    @property
    def signed(self) -> bool:
        return SIGNATURE_NAME in self._members

    def read_small(self, name: str) -> bytes | None:
        """A metadata member's bytes (None when absent)."""
        member = self._members.get(name)
        if member is None:
            return None
        if member.size > _SMALL_MEMBER_LIMIT:
            raise Oversized(f"{name} is {member.size} bytes; metadata over {_SMALL_MEMBER_LIMIT} bytes is refused")
        f = self._tar.extractfile(member)
        assert f is not None  # regular member
        data = f.read()
        if len(data) != member.size:
            raise UploadTruncated(f"{name} is cut short in the bundle; re-send it")
        return data

    def engine_files(self) -> dict[str, int]:
        """relative path inside engine/ -> size, manifest.json included."""
        prefix = ENGINE_DIR + "/"
        return {n[len(prefix):]: m.size for n, m in self._members.items() if n.startswith(prefix)}

    def extract_engine(self, dest: Path, on_file: Callable[[str], None] | None = None) -> None:
        """Copy every engine/ member into dest (which must not exist), fsyncing each file.
        Only names checked in open() are used; files are created with O_EXCL|O_NOFOLLOW,
        so nothing already on disk can be followed or overwritten."""
        dest = Path(dest)
        dest.mkdir(mode=0o755)
        prefix = ENGINE_DIR + "/"
        for name, member in self._members.items():
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            target = dest / rel
            src = self._tar.extractfile(member)
            assert src is not None
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except (FileExistsError, NotADirectoryError) as e:
                raise MalformedBundle(f"entry {name!r} collides with another entry ({e.strerror}); refused") from None
            with os.fdopen(fd, "wb") as out:
                left = member.size
                while left:
                    chunk = src.read(min(_COPY_CHUNK, left))
                    if not chunk:
                        raise UploadTruncated(f"{name} is cut short in the bundle; re-send it")
                    out.write(chunk)
                    left -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if on_file:
                on_file(rel)


def _check_trailer(tar: tarfile.TarFile, file_size: int) -> None:
    """tarfile stops quietly at a header cut short; a whole archive ends in zero blocks."""
    end = tar.offset
    rest = file_size - end
    if rest < 2 * tarfile.BLOCKSIZE:
        raise UploadTruncated("the bundle ends without the tar end-of-archive marker: it was truncated; re-send it")
    if rest > _TRAILER_LIMIT:
        raise MalformedBundle(f"the bundle has {rest} bytes after its last entry that are not part of the archive")
    tar.fileobj.seek(end)
    if tar.fileobj.read(rest).strip(b"\0"):
        raise MalformedBundle("the bundle has data after its last entry that is not part of the archive")


def _check_name(name: str) -> None:
    if "\\" in name or "\0" in name:
        raise PathTraversal(f"entry {name!r} has a backslash or NUL in its name; refused")
    if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise PathTraversal(f"entry {name!r} would be written outside the engine directory; refused")
    try:
        check_relative_path(name)
    except EngineFormatError:
        raise PathTraversal(f"entry {name!r} is not a plain relative path; refused") from None

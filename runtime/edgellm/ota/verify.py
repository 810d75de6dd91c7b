"""The device's checks on an update, in order, each failing with its own exception (ota/errors.py):

    upload      the upload is complete and hashes to what its header announced
    size        the bundle is within the size limit
    archive     no absolute paths, no `..`, no links or devices, bounded unpacked size
    signature   signed by a key in the trust store, over a statement naming this manifest
    file-hashes every engine file matches the manifest (sizes first, then sha256)
    target-sm   the engine's target SMs include this device's SM
    runtime     this runtime is at least the engine's minimum runtime version
    version     the engine version is greater than the current one (anti-rollback)
    expiry      the statement has not expired

Nothing is trusted before its step has passed: the statement is parsed only after its
signature checks out, engine files are unpacked only into a fresh staging directory and
only after the signature step. Nothing here touches the live engine or the store's pointers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from edgellm import __version__
from edgellm.engine.manifest import MANIFEST_NAME, Manifest, normalize_sm, verify_files
from edgellm.errors import DeviceMismatchError, EngineFormatError
from edgellm.ota import hooks
from edgellm.ota.bundle import SIGNATURE_NAME, STATEMENT_NAME, BundleReader, Limits
from edgellm.ota.errors import (
    BadSignature,
    Expired,
    HashMismatch,
    MalformedBundle,
    Oversized,
    RuntimeTooOld,
    Unsigned,
    UpdateRejected,
    UploadHashMismatch,
    UploadTruncated,
    VersionNotNewer,
    WrongSM,
)
from edgellm.ota.identity import DeviceIdentity
from edgellm.ota.signing import Signature, Statement, check_signature, format_time
from edgellm.ota.trust import TrustStore

log = logging.getLogger("edgellm.ota")

STEPS = ("upload", "size", "archive", "signature", "file-hashes", "target-sm", "runtime", "version", "expiry")
ENGINE_SUBDIR = "engine"


@dataclasses.dataclass(frozen=True)
class Policy:
    limits: Limits = Limits()
    allow_unsigned: bool = False  # development only; loud when on
    runtime_version: str = __version__


@dataclasses.dataclass(frozen=True)
class Verified:
    """A version that passed every check. `directory` holds engine/, statement.json and
    (when signed) signature, laid out as the store keeps versions."""

    statement: Statement
    manifest: Manifest
    key_id: str | None  # None: unsigned, accepted only because the development flag is on
    directory: Path

    @property
    def engine_dir(self) -> Path:
        return self.directory / ENGINE_SUBDIR


class Verifier:
    def __init__(
        self,
        trust: TrustStore,
        device: DeviceIdentity,
        policy: Policy = Policy(),
        clock: Callable[[], float] = time.time,
        on_step: Callable[[str], None] | None = None,
    ):
        self.trust = trust
        self.device = device
        self.policy = policy
        self.clock = clock
        self.on_step = on_step or (lambda _step: None)
        if policy.allow_unsigned:
            log.warning("UNSIGNED UPDATES ARE ALLOWED (development flag): anyone who reaches the admin endpoint can install an engine")

    # ---- whole flows ------------------------------------------------------------------
    def verify_bundle(self, bundle_path: Path, stage_dir: Path, current_version: int | None) -> Verified:
        """Run steps size..expiry on a complete bundle file; unpack it into stage_dir (which
        must not exist). On failure stage_dir is removed and the exception propagates."""
        bundle_path, stage_dir = Path(bundle_path), Path(stage_dir)
        created = False
        try:
            self.check_size(bundle_path)
            with BundleReader.open(bundle_path, self.policy.limits) as reader:
                self.on_step("archive")
                manifest_bytes = reader.read_small(f"{ENGINE_SUBDIR}/{MANIFEST_NAME}")
                statement_bytes = reader.read_small(STATEMENT_NAME)
                signature_bytes = reader.read_small(SIGNATURE_NAME)
                assert manifest_bytes is not None and statement_bytes is not None  # required by open()
                statement, kid, manifest = self.check_signature(statement_bytes, signature_bytes, manifest_bytes)
                self.check_listed_files(manifest, reader.engine_files())
                stage_dir.mkdir(mode=0o755)
                created = True
                reader.extract_engine(stage_dir / ENGINE_SUBDIR, on_file=lambda _rel: hooks.stage("staging"))
                (stage_dir / STATEMENT_NAME).write_bytes(statement_bytes)
                if signature_bytes is not None:
                    (stage_dir / SIGNATURE_NAME).write_bytes(signature_bytes)
            self.check_file_hashes(stage_dir / ENGINE_SUBDIR, manifest)
            self.check_fit(statement, manifest, current_version)
        except BaseException:
            if created:
                shutil.rmtree(stage_dir, ignore_errors=True)
            raise
        return Verified(statement, manifest, kid, stage_dir)

    def verify_installed(self, directory: Path, current_version: int | None) -> Verified:
        """Re-run steps signature..expiry on a version already in the store (Activate):
        the trust store or the clock may have changed since it was installed."""
        directory = Path(directory)
        engine_dir = directory / ENGINE_SUBDIR
        try:
            statement_bytes = (directory / STATEMENT_NAME).read_bytes()
            manifest_bytes = (engine_dir / MANIFEST_NAME).read_bytes()
        except OSError as e:
            raise HashMismatch(f"stored version in {directory} is incomplete ({e.strerror}); push it again") from None
        sig_path = directory / SIGNATURE_NAME
        signature_bytes = sig_path.read_bytes() if sig_path.exists() else None
        self.on_step("archive")
        statement, kid, manifest = self.check_signature(statement_bytes, signature_bytes, manifest_bytes)
        self.check_file_hashes(engine_dir, manifest)
        self.check_fit(statement, manifest, current_version)
        return Verified(statement, manifest, kid, directory)

    def check_fit(self, statement: Statement, manifest: Manifest, current_version: int | None) -> None:
        self.check_target(manifest)
        self.check_runtime(manifest)
        self.check_version(statement, current_version)
        self.check_expiry(statement)

    # ---- the steps, in order ----------------------------------------------------------
    def check_upload(self, received: int, announced_size: int, digest: str, announced_sha256: str) -> None:
        if received < announced_size:
            raise UploadTruncated(
                f"the upload ended after {received} of the announced {announced_size} bytes; re-send the bundle"
            )
        if digest != announced_sha256.lower():
            raise UploadHashMismatch(
                f"the upload hashes to sha256 {digest[:16]}..., the header announced {announced_sha256[:16]}...: "
                "it was corrupted in transit or the header is wrong; re-send it"
            )
        self.on_step("upload")

    def check_announced_size(self, size: int) -> None:
        """Before any byte is received: refuse what the size limit would refuse anyway."""
        limit = self.policy.limits.max_bundle_bytes
        if size > limit:
            raise Oversized(f"the bundle is {size} bytes, over this device's limit of {limit}; raise the limit if this engine is legitimate")

    def check_size(self, bundle_path: Path) -> None:
        self.check_announced_size(bundle_path.stat().st_size)
        self.on_step("size")

    def check_signature(
        self, statement_bytes: bytes, signature_bytes: bytes | None, manifest_bytes: bytes
    ) -> tuple[Statement, str | None, Manifest]:
        kid: str | None = None
        if signature_bytes is None:
            if not self.policy.allow_unsigned:
                raise Unsigned(
                    "the bundle carries no signature; sign it with `edgellm sign --key FLEET.key` "
                    "(unsigned bundles are accepted only with the development flag)"
                )
            log.warning("installing an UNSIGNED bundle because the development flag allows it")
        else:
            signature = Signature.from_bytes(signature_bytes)
            check_signature(statement_bytes, signature, self.trust.get(signature.key_id))
            kid = signature.key_id
        statement = Statement.from_bytes(statement_bytes)
        if kid is not None and statement.key_id != kid:
            raise BadSignature(f"the statement names key {statement.key_id[:16]} but was signed by {kid[:16]}; re-sign the engine")
        if hashlib.sha256(manifest_bytes).hexdigest() != statement.manifest_sha256:
            raise BadSignature(
                "engine/manifest.json is not the manifest that was signed: it was changed after signing; "
                "do not install this bundle, get a freshly signed one"
            )
        try:
            manifest = Manifest.from_json(manifest_bytes.decode("utf-8", errors="replace"), where="engine/manifest.json")
        except EngineFormatError as e:
            raise MalformedBundle(str(e)) from None
        if manifest.engine_id != statement.engine_id:
            raise MalformedBundle(f"the statement names engine {statement.engine_id!r} but the manifest is {manifest.engine_id!r}")
        self.on_step("signature")
        return statement, kid, manifest

    def check_listed_files(self, manifest: Manifest, present: dict[str, int]) -> None:
        """Cheap part of file-hashes, before unpacking: same names, same sizes."""
        present = {k: v for k, v in present.items() if k != MANIFEST_NAME}
        missing = sorted(set(manifest.files) - set(present))
        extra = sorted(set(present) - set(manifest.files))
        if missing or extra:
            raise HashMismatch(
                f"the bundle's engine files do not match its manifest (missing {missing[:3]}, unlisted {extra[:3]}); "
                "re-create the bundle from the engine directory with `edgellm sign`"
            )
        for rel, size in present.items():
            if size != manifest.files[rel]["size"]:
                raise HashMismatch(f"engine file {rel} is {size} bytes, the manifest says {manifest.files[rel]['size']}: it was modified")

    def check_file_hashes(self, engine_dir: Path, manifest: Manifest) -> None:
        try:
            verify_files(engine_dir, manifest)
        except EngineFormatError as e:
            raise HashMismatch(str(e)) from None
        self.on_step("file-hashes")

    def check_target(self, manifest: Manifest) -> None:
        try:
            manifest.require_target(normalize_sm(self.device.sm), cpu_runs_any=False)
        except DeviceMismatchError as e:
            raise WrongSM(str(e)) from None
        self.on_step("target-sm")

    def check_runtime(self, manifest: Manifest) -> None:
        try:
            manifest.require_runtime(self.policy.runtime_version)
        except EngineFormatError as e:
            raise RuntimeTooOld(str(e)) from None
        self.on_step("runtime")

    def check_version(self, statement: Statement, current_version: int | None) -> None:
        if current_version is not None and statement.version <= current_version:
            raise VersionNotNewer(
                f"engine version {statement.version} is not newer than the current version {current_version} "
                f"(anti-rollback); sign the update with --version {current_version + 1} or higher, or use "
                "`edgellm rollback` to go back to the kept previous version"
            )
        self.on_step("version")

    def check_expiry(self, statement: Statement) -> None:
        expires = statement.expires_at
        if expires is not None and self.clock() >= expires.timestamp():
            now = format_time(dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc))
            raise Expired(
                f"the statement for version {statement.version} expired at {statement.expires} (device clock: {now}); "
                "re-sign it with a later --expires, or check the device clock"
            )
        self.on_step("expiry")


__all__ = ["Policy", "STEPS", "UpdateRejected", "Verified", "Verifier"]

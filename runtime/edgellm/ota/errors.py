"""Why an update was refused: one exception class per reason, each with a stable `reason` string.

The reason strings are part of the admin API (the daemon sends them to the fleet manager,
the audit log records them, tests match on them): never rename one.
"""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class UpdateRejected(EdgeLLMError):
    """An update (push, activation or rollback) was refused; the live engine is untouched."""

    reason = "rejected"

    def __str__(self) -> str:
        return f"[{self.reason}] {super().__str__()}"

    @property
    def detail(self) -> str:
        """The message without the reason prefix."""
        return super().__str__()


# ---- the upload itself ------------------------------------------------------------------
class UploadTruncated(UpdateRejected):
    reason = "truncated"


class UploadSizeMismatch(UpdateRejected):
    reason = "upload-size-mismatch"


class UploadHashMismatch(UpdateRejected):
    reason = "upload-hash-mismatch"


class Oversized(UpdateRejected):
    reason = "oversized"


class NoSpace(UpdateRejected):
    reason = "no-space"


# ---- archive safety ---------------------------------------------------------------------
class MalformedBundle(UpdateRejected):
    reason = "malformed"


class PathTraversal(UpdateRejected):
    reason = "path-traversal"


class LinkEntry(UpdateRejected):
    reason = "link-entry"


class SpecialEntry(UpdateRejected):
    reason = "special-entry"


class DuplicateEntry(UpdateRejected):
    reason = "duplicate-entry"


# ---- trust ------------------------------------------------------------------------------
class Unsigned(UpdateRejected):
    reason = "unsigned"


class UntrustedKey(UpdateRejected):
    reason = "untrusted-key"


class BadSignature(UpdateRejected):
    reason = "bad-signature"


# ---- content and fit to this device -----------------------------------------------------
class HashMismatch(UpdateRejected):
    reason = "hash-mismatch"


class WrongSM(UpdateRejected):
    reason = "wrong-sm"


class RuntimeTooOld(UpdateRejected):
    reason = "runtime-too-old"


class VersionNotNewer(UpdateRejected):
    reason = "version-not-newer"


class Expired(UpdateRejected):
    reason = "expired"


# ---- installing and switching (daemon) --------------------------------------------------
class Busy(UpdateRejected):
    reason = "busy"


class UnknownVersion(UpdateRejected):
    reason = "unknown-version"


class NoPrevious(UpdateRejected):
    reason = "no-previous"


class LoadFailed(UpdateRejected):
    reason = "load-failed"


class SmokeFailed(UpdateRejected):
    reason = "smoke-failed"


class SwapFailed(UpdateRejected):
    reason = "swap-failed"


class InstallFailed(UpdateRejected):
    """The device could not write the store (I/O error): nothing was switched."""

    reason = "install-failed"


def all_reasons() -> dict[str, type[UpdateRejected]]:
    """reason string -> class, for clients that turn a reason back into an exception."""
    found: dict[str, type[UpdateRejected]] = {}
    todo = [UpdateRejected]
    while todo:
        cls = todo.pop()
        found[cls.reason] = cls
        todo.extend(cls.__subclasses__())
    return found

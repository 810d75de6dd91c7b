"""Ed25519 keys and the signed statement that names one engine version.

The statement is small canonical JSON; the signature covers its exact bytes. It binds the
engine id, the engine version (the anti-rollback counter), the sha256 of the engine's
`manifest.json` (which holds every file's sha256, the target SMs and the minimum runtime
version), an optional expiry and the signing key's id. Nothing in a bundle is parsed as
trusted data before the signature over these bytes has been checked.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgellm.errors import ConfigError
from edgellm.ota.errors import BadSignature, MalformedBundle

STATEMENT_TYPE = "edgellm-engine-statement"
STATEMENT_FORMAT = 1
SIGNATURE_ALGORITHM = "ed25519"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


# ---- keys -------------------------------------------------------------------------------
def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 of the raw 32-byte public key, hex: stable across PEM re-encodings."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(name: Path) -> tuple[Path, Path]:
    """Write NAME.key (PKCS#8 PEM, created 0600, never overwritten) and NAME.pub."""
    name = Path(name)
    private_path = name.with_name(name.name + PRIVATE_SUFFIX)
    public_path = name.with_name(name.name + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; pick another name or remove it first (keys are never overwritten)")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL + mode at creation: the private key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read signing key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({e}); create one with `edgellm keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; edgellm signs with Ed25519 keys from `edgellm keygen`")
    return key


def load_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where} holds a {type(key).__name__}; trusted keys must be Ed25519 (`edgellm keygen`)")
    return key


# ---- the statement ----------------------------------------------------------------------
def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """ISO-8601 date or date-time; no zone means UTC."""
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"time {text!r} is not ISO-8601, e.g. 2027-01-31 or 2027-01-31T12:00:00Z") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def parse_expiry(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """'30d' / '12h' from now, or an ISO-8601 date or date-time."""
    m = re.fullmatch(r"(\d+)([dh])", text.strip())
    if m:
        amount = int(m.group(1))
        delta = dt.timedelta(days=amount) if m.group(2) == "d" else dt.timedelta(hours=amount)
        return (now or utc_now()) + delta
    return parse_time(text)


@dataclasses.dataclass(frozen=True)
class Statement:
    engine_id: str
    version: int
    manifest_sha256: str
    key_id: str
    signed_at: str
    expires: str | None = None

    def to_bytes(self) -> bytes:
        body = dataclasses.asdict(self)
        body.update(type=STATEMENT_TYPE, format=STATEMENT_FORMAT)
        return canonical_json(body)

    @property
    def expires_at(self) -> dt.datetime | None:
        return parse_time(self.expires) if self.expires else None

    @classmethod
    def from_bytes(cls, data: bytes) -> "Statement":
        """Parse statement bytes. Call this only on bytes whose signature has been checked
        (or, with unsigned bundles allowed for development, on bytes nobody vouches for)."""
        try:
            body = json.loads(data.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MalformedBundle(f"statement.json is not ASCII JSON ({e}); re-sign the engine with `edgellm sign`") from None
        if not isinstance(body, dict) or body.get("type") != STATEMENT_TYPE or body.get("format") != STATEMENT_FORMAT:
            raise MalformedBundle(
                f"statement.json is not an edgellm statement of format {STATEMENT_FORMAT}; "
                "re-sign the engine with this edgellm's `edgellm sign`"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: body.get(k) for k in fields}
        problems = [k for k in ("engine_id", "manifest_sha256", "key_id", "signed_at") if not isinstance(values[k], str)]
        if not isinstance(values["version"], int) or isinstance(values["version"], bool) or values["version"] < 1:
            problems.append("version")
        if values["expires"] is not None and not isinstance(values["expires"], str):
            problems.append("expires")
        if problems:
            raise MalformedBundle(f"statement.json has missing or invalid {', '.join(problems)}; re-sign the engine")
        statement = cls(**values)
        if canonical_json(body) != data:
            # One statement, one encoding: the bytes that were signed are the bytes parsed.
            raise MalformedBundle("statement.json is not in canonical form; re-sign the engine with `edgellm sign`")
        if statement.expires:
            try:
                statement.expires_at
            except ConfigError:
                raise MalformedBundle(f"statement.json has an invalid expiry {statement.expires!r}") from None
        return statement


def make_statement(
    engine_id: str,
    version: int,
    manifest_bytes: bytes,
    private_key: Ed25519PrivateKey | None,
    expires: dt.datetime | None = None,
) -> Statement:
    """private_key None: the statement of an unsigned (development) bundle, with no key id."""
    if version < 1:
        raise ConfigError(f"--version must be a positive integer (it only ever grows), got {version}")
    return Statement(
        engine_id=engine_id,
        version=version,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        key_id=key_id(private_key.public_key()) if private_key else "",
        signed_at=format_time(utc_now()),
        expires=format_time(expires) if expires else None,
    )


@dataclasses.dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes

    def to_bytes(self) -> bytes:
        return canonical_json({
            "algorithm": SIGNATURE_ALGORITHM,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> "Signature":
        try:
            body = json.loads(data.decode("ascii"))
            if body.get("algorithm") != SIGNATURE_ALGORITHM:
                raise ValueError(f"algorithm {body.get('algorithm')!r} is not {SIGNATURE_ALGORITHM}")
            kid = body["key_id"]
            sig = base64.b64decode(body["signature"], validate=True)
            if not isinstance(kid, str) or len(sig) != 64:
                raise ValueError("key_id or signature has the wrong shape")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise BadSignature(f"the bundle's signature file is unreadable ({e}); re-sign the engine") from None
        return cls(kid, sig)


def sign_statement(statement: Statement, private_key: Ed25519PrivateKey) -> Signature:
    return Signature(key_id(private_key.public_key()), private_key.sign(statement.to_bytes()))


def check_signature(statement_bytes: bytes, signature: Signature, public_key: Ed25519PublicKey) -> None:
    try:
        public_key.verify(signature.signature, statement_bytes)
    except InvalidSignature:
        raise BadSignature(
            f"the signature by key {signature.key_id[:16]} does not match the statement: the bundle was changed "
            "after signing or signed wrongly; do not install it, get a freshly signed bundle"
        ) from None

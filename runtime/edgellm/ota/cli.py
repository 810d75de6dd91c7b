"""Update commands: `edgellm keygen`, `sign`, `verify` (offline) and `push`, `engines`,
`activate`, `rollback` (against a daemon's admin endpoint)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgellm.ota import client
from edgellm.ota import DEFAULT_TRUST_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair NAME.key (0600) and NAME.pub")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="NAME", help="path prefix, e.g. keys/fleet")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign an engine directory into one bundle file for transport")
    p.add_argument("engine_dir", type=Path)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", type=Path, help="private key from `edgellm keygen` (NAME.key)")
    who.add_argument("--unsigned", action="store_true",
                     help="write an unsigned bundle (devices refuse it unless started with --allow-unsigned)")
    p.add_argument("--version", type=int, required=True, dest="engine_version",
                   help="engine version N: devices accept only versions above the one they run")
    p.add_argument("--expires", help="expiry: ISO-8601 date/time (UTC unless a zone is given) or e.g. 30d, 12h from now")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write, e.g. demo-v2.bundle")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="run a device's checks on a bundle offline and say which one fails")
    p.add_argument("bundle", type=Path)
    p.add_argument("--trust", type=Path, default=DEFAULT_TRUST_DIR, help=f"trusted keys directory (default {DEFAULT_TRUST_DIR})")
    p.add_argument("--sm", help="check against this device SM (e.g. 8.7, or cpu) instead of this machine's GPU")
    p.add_argument("--current-version", type=int, help="check anti-rollback against this installed version")
    p.add_argument("--allow-unsigned", action="store_true", help="development: accept an unsigned bundle")
    p.set_defaults(func=cmd_verify)

    client.register(sub)  # push, engines, activate, rollback (gRPC, imported when run)


def cmd_keygen(args) -> int:
    from edgellm.ota.signing import generate_keypair, key_id, load_private_key

    private_path, public_path = generate_keypair(args.output)
    kid = key_id(load_private_key(private_path).public_key())
    print(f"wrote {private_path} (keep it secret, mode 0600) and {public_path}")
    print(f"key id {kid}; install {public_path.name} in the devices' trust directory ({DEFAULT_TRUST_DIR}/)")
    return 0


def cmd_sign(args) -> int:
    from edgellm.engine.manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_files
    from edgellm.errors import EngineFormatError
    from edgellm.ota.bundle import write_bundle
    from edgellm.ota.signing import load_private_key, make_statement, parse_expiry, sign_statement

    manifest = read_manifest(args.engine_dir)
    verify_files(args.engine_dir, manifest)  # never sign a damaged engine
    # verify_files checks chunk hashes where the manifest has them; older tools read the
    # whole-file sha256 instead, and a signature vouches for both.
    for rel, entry in manifest.files.items():
        if "chunk_sha256" in entry and sha256_file(args.engine_dir / rel) != entry["sha256"]:
            raise EngineFormatError(f"{MANIFEST_NAME} records a whole-file sha256 for {rel} that does not match "
                                    "the file (its chunk hashes do); rebuild the engine before signing it")
    manifest_bytes = (args.engine_dir / MANIFEST_NAME).read_bytes()
    expires = parse_expiry(args.expires) if args.expires else None
    key = None if args.unsigned else load_private_key(args.key)
    statement = make_statement(manifest.engine_id, args.engine_version, manifest_bytes, key, expires)
    signature_bytes = sign_statement(statement, key).to_bytes() if key else None
    if key is None:
        print("warning: writing an UNSIGNED bundle; devices refuse it unless started with --allow-unsigned", file=sys.stderr)
    write_bundle(args.engine_dir, args.output, statement.to_bytes(), signature_bytes)
    size = args.output.stat().st_size
    signer = f"key {statement.key_id[:16]}" if signature_bytes else "nobody (unsigned)"
    print(f"wrote {args.output}: engine {manifest.engine_id} version {statement.version}, "
          f"{size / 1e6:.1f} MB, signed by {signer}" + (f", expires {statement.expires}" if statement.expires else ""))
    return 0


def cmd_verify(args) -> int:
    from edgellm.engine.manifest import normalize_sm
    from edgellm.ota import identity
    from edgellm.ota.errors import UpdateRejected
    from edgellm.ota.trust import TrustStore
    from edgellm.ota.verify import Policy, Verifier

    device = identity.detect()
    if args.sm:
        device = identity.DeviceIdentity(None, normalize_sm(args.sm), None, 0, 0, detail="--sm given")
    trust = TrustStore.load(args.trust)
    print(f"device: {device.describe() if not args.sm else 'SM ' + device.sm + ' (--sm)'}; "
          f"trust: {len(trust)} key(s) in {args.trust}")
    verifier = Verifier(trust, device, Policy(allow_unsigned=args.allow_unsigned),
                        on_step=lambda step: print(f"  ok    {step}", flush=True))
    with tempfile.TemporaryDirectory(prefix="edgellm-verify-") as tmp:
        try:
            verified = verifier.verify_bundle(args.bundle, Path(tmp) / "engine-version", args.current_version)
        except UpdateRejected as e:
            print(f"  FAIL  {e.reason}: {e.detail}", flush=True)
            raise
    s = verified.statement
    signer = f"key {verified.key_id[:16]}" if verified.key_id else "NOBODY (unsigned, allowed by --allow-unsigned)"
    print(f"bundle OK: engine {s.engine_id} version {s.version}, signed by {signer} at {s.signed_at}"
          + (f", expires {s.expires}" if s.expires else ""))
    return 0

"""Engine updates without a daemon: keys, statements, bundles, the ordered checks, the store.

Each refusal is triggered by a crafted bundle pushed through the Updater into a store that
already serves a version, and must leave that store exactly as it was.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgellm.engine.manifest import MANIFEST_NAME, read_manifest, sha256_file, write_manifest
from edgellm.ota import hooks, identity
from edgellm.ota.audit import AuditLog
from edgellm.ota.bundle import Limits, write_bundle
from edgellm.ota.errors import UpdateRejected, all_reasons
from edgellm.ota.signing import generate_keypair, load_private_key, make_statement, sign_statement
from edgellm.ota.store import EngineStore
from edgellm.ota.trust import TrustStore
from edgellm.ota.updater import Updater
from edgellm.ota.verify import STEPS, Policy, Verifier

# ---- helpers shared with test_ota_daemon.py -----------------------------------------------


@dataclasses.dataclass
class Keys:
    fleet_key: Path
    rogue_key: Path
    trust_dir: Path


def make_keys(root: Path) -> Keys:
    root.mkdir(parents=True, exist_ok=True)
    fleet_key, fleet_pub = generate_keypair(root / "fleet")
    rogue_key, _ = generate_keypair(root / "rogue")
    trust_dir = root / "trusted.d"
    trust_dir.mkdir()
    shutil.copy(fleet_pub, trust_dir / fleet_pub.name)
    return Keys(fleet_key, rogue_key, trust_dir)


def engine_copy(src: Path, dest: Path, **manifest_changes) -> Path:
    shutil.copytree(src, dest)
    if manifest_changes:
        manifest = dataclasses.replace(read_manifest(dest), **manifest_changes)
        write_manifest(dest, manifest)
    return dest


def sign_bundle(engine_dir: Path, out: Path, key: Path | None, version: int, expires: dt.datetime | None = None) -> Path:
    """What `edgellm sign` writes (key None: unsigned)."""
    private = load_private_key(key) if key else None
    manifest = read_manifest(engine_dir)
    statement = make_statement(manifest.engine_id, version, (engine_dir / MANIFEST_NAME).read_bytes(), private, expires)
    signature = sign_statement(statement, private).to_bytes() if private else None
    write_bundle(engine_dir, out, statement.to_bytes(), signature)
    return out


def rewrite_bundle(src: Path, out: Path, replace: dict[str, bytes] | None = None, extra: list[tarfile.TarInfo] | None = None) -> Path:
    """Copy a bundle's entries, swapping some entries' bytes and appending raw entries."""
    replace = replace or {}
    with tarfile.open(src, "r:") as tin, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin.getmembers():
            data = replace.get(member.name, tin.extractfile(member).read())
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
        for info in extra or []:
            tout.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return out


def push_file(updater: Updater, bundle: Path, size: int | None = None, sha256: str | None = None, cut: int | None = None, activate=True):
    data = bundle.read_bytes()
    sent = data[:cut] if cut is not None else data
    chunks = [sent[i:i + 65536] for i in range(0, len(sent), 65536)]
    return updater.push(len(data) if size is None else size, sha256 or hashlib.sha256(data).hexdigest(), chunks, activate=activate)


def store_snapshot(root: Path) -> dict[str, str]:
    """Every path under the store with its content hash (the audit log aside)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel == "audit.jsonl":
            continue
        snap[rel] = "dir" if p.is_dir() else sha256_file(p)
    return snap


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def cpu_device() -> identity.DeviceIdentity:
    return identity.DeviceIdentity(None, "cpu", None, 8 << 30, 8 << 30, detail="test")


def make_updater(root: Path, keys: Keys, device, limits: Limits = Limits()) -> Updater:
    store = EngineStore(root / "store")
    verifier = Verifier(TrustStore.load(keys.trust_dir), device, Policy(limits=limits))
    return Updater(store, verifier, AuditLog(root / "store" / "audit.jsonl"))


@pytest.fixture
def live(tmp_path, demo_engine, keys, cpu_device):
    """A store serving version 5 (previous 4) of the demo engine."""
    updater = make_updater(tmp_path, keys, cpu_device)
    for v in (4, 5):
        push_file(updater, sign_bundle(demo_engine, tmp_path / f"v{v}.bundle", keys.fleet_key, v))
    assert updater.store.current_version() == 5 and updater.store.previous_version() == 4
    return updater


# ---- keys and statements ------------------------------------------------------------------


def test_keygen_writes_private_key_0600_and_refuses_to_overwrite(tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(Exception, match="already exists"):
        generate_keypair(tmp_path / "k")


def test_statement_is_canonical_and_signature_covers_it(keys, demo_engine, tmp_path):
    bundle = sign_bundle(demo_engine, tmp_path / "b.bundle", keys.fleet_key, 7)
    with tarfile.open(bundle) as tar:
        raw = tar.extractfile("statement.json").read()
    body = json.loads(raw)
    assert body["version"] == 7 and body["engine_id"] == read_manifest(demo_engine).engine_id
    assert body["manifest_sha256"] == sha256_file(demo_engine / MANIFEST_NAME)
    assert raw == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    # One changed byte in the signed statement (version 7 -> 8): the signature fails.
    forged = rewrite_bundle(bundle, tmp_path / "forged.bundle", {"statement.json": raw.replace(b'"version":7', b'"version":8')})
    verifier = Verifier(TrustStore.load(keys.trust_dir), identity.cpu_identity("test"))
    with pytest.raises(UpdateRejected) as e:
        verifier.verify_bundle(forged, tmp_path / "stage", None)
    assert e.value.reason == "bad-signature"
    assert not (tmp_path / "stage").exists()


def test_trust_store_skips_broken_and_foreign_keys(tmp_path, keys):
    d = tmp_path / "trust"
    d.mkdir()
    shutil.copy(keys.trust_dir / "fleet.pub", d / "fleet.pub")
    (d / "broken.pub").write_text("not a key")
    (d / "README").write_text("ignored: not *.pub")
    assert len(TrustStore.load(d)) == 1


# ---- every refusal, with its own reason, store untouched ----------------------------------


def _tampered_weights(engine, tmp, keys):
    data = bytearray((engine / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    # The statement and manifest are the genuine ones: only the weights changed in transit.
    good = sign_bundle(engine, tmp / "good.bundle", keys.fleet_key, 6)
    return rewrite_bundle(good, tmp / "bad.bundle", {"engine/model.safetensors": bytes(data)})


def _tampered_manifest(engine, tmp, keys):
    good = sign_bundle(engine, tmp / "good.bundle", keys.fleet_key, 6)
    manifest = json.loads((engine / MANIFEST_NAME).read_text())
    manifest["max_batch"] = 64
    return rewrite_bundle(good, tmp / "bad.bundle", {"engine/manifest.json": json.dumps(manifest).encode()})


def _custom_manifest(**changes):
    def craft(engine, tmp, keys):
        eng = engine_copy(engine, tmp / "eng", **changes)
        return sign_bundle(eng, tmp / "bad.bundle", keys.fleet_key, 6)
    return craft


def _tar_entry(name: str, kind=tarfile.REGTYPE, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, linkname
    return info


def _with_entry(info):
    def craft(engine, tmp, keys):
        good = sign_bundle(engine, tmp / "good.bundle", keys.fleet_key, 6)
        return rewrite_bundle(good, tmp / "bad.bundle", extra=[info])
    return craft


CASES = {
    # name: (crafter, push options, expected reason)
    "tampered weight file": (_tampered_weights, {}, "hash-mismatch"),
    "tampered manifest": (_tampered_manifest, {}, "bad-signature"),
    "untrusted key": (lambda e, t, k: sign_bundle(e, t / "b.bundle", k.rogue_key, 6), {}, "untrusted-key"),
    "unsigned": (lambda e, t, k: sign_bundle(e, t / "b.bundle", None, 6), {}, "unsigned"),
    "wrong SM": (_custom_manifest(target_sms=["5.0"]), {}, "wrong-sm"),
    "runtime too old": (_custom_manifest(min_runtime_version="99.0.0"), {}, "runtime-too-old"),
    "version not newer": (lambda e, t, k: sign_bundle(e, t / "b.bundle", k.fleet_key, 5), {}, "version-not-newer"),
    "expired": (
        lambda e, t, k: sign_bundle(e, t / "b.bundle", k.fleet_key, 6, expires=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)),
        {}, "expired",
    ),
    "truncated upload": (lambda e, t, k: sign_bundle(e, t / "b.bundle", k.fleet_key, 6), {"cut": 100_000}, "truncated"),
    "upload hash mismatch": (lambda e, t, k: sign_bundle(e, t / "b.bundle", k.fleet_key, 6), {"sha256": "0" * 64}, "upload-hash-mismatch"),
    "path traversal": (_with_entry(_tar_entry("engine/../../../tmp/evil", size=4)), {}, "path-traversal"),
    "absolute path": (_with_entry(_tar_entry("/tmp/evil", size=4)), {}, "path-traversal"),
    "symlink entry": (_with_entry(_tar_entry("engine/link", tarfile.SYMTYPE, linkname="/etc/passwd")), {}, "link-entry"),
    "hard link entry": (_with_entry(_tar_entry("engine/hard", tarfile.LNKTYPE, linkname="engine/model.safetensors")), {}, "link-entry"),
    "device entry": (_with_entry(_tar_entry("engine/dev", tarfile.CHRTYPE)), {}, "special-entry"),
    "duplicate entry": (_with_entry(_tar_entry("engine/model.safetensors", size=4)), {}, "duplicate-entry"),
    "oversized": (lambda e, t, k: sign_bundle(e, t / "b.bundle", k.fleet_key, 6), {"limits": Limits(max_bundle_bytes=1 << 20)}, "oversized"),
    "oversized unpacked": (
        lambda e, t, k: sign_bundle(e, t / "b.bundle", k.fleet_key, 6),
        {"limits": Limits(max_unpacked_bytes=1 << 20)}, "oversized",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_has_its_own_reason_and_leaves_the_store_untouched(case, live, demo_engine, keys, cpu_device, tmp_path):
    craft, options, reason = CASES[case]
    options = dict(options)
    work = tmp_path / "craft"
    work.mkdir()
    bundle = craft(demo_engine, work, keys)
    updater = live
    if "limits" in options:
        updater = Updater(live.store, Verifier(live.verifier.trust, cpu_device, Policy(limits=options.pop("limits"))), live.audit)
    before = store_snapshot(live.store.root)
    with pytest.raises(UpdateRejected) as e:
        push_file(updater, bundle, **options)
    assert e.value.reason == reason, str(e.value)
    assert str(e.value).startswith(f"[{reason}] ")
    assert store_snapshot(live.store.root) == before
    assert live.store.current_version() == 5
    assert not list((live.store.root / "staging").iterdir())
    assert not Path("/tmp/evil").exists()
    last = live.audit.read()[-1]
    assert (last["event"], last["reason"]) == ("rejected", reason)


def test_each_reason_is_a_distinct_class():
    reasons = all_reasons()
    expected = {"bad-signature", "untrusted-key", "unsigned", "hash-mismatch", "wrong-sm", "runtime-too-old",
                "version-not-newer", "expired", "truncated", "upload-hash-mismatch", "path-traversal", "link-entry", "oversized"}
    assert expected <= set(reasons)
    assert len({cls for cls in reasons.values()}) == len(reasons)


def test_truncated_bundle_file_is_caught_offline(live, demo_engine, keys, tmp_path):
    bundle = sign_bundle(demo_engine, tmp_path / "b.bundle", keys.fleet_key, 6)
    data = bundle.read_bytes()
    with tarfile.open(bundle) as tar:
        last = tar.getmembers()[-1]
    end_of_data = -(-(last.offset_data + last.size) // 512) * 512
    for cut in (end_of_data + 512, 1500, len(data) // 2):  # end marker, inside a header, inside the weights
        (tmp_path / "cut.bundle").write_bytes(data[:cut])
        with pytest.raises(UpdateRejected) as e:
            live.verifier.verify_bundle(tmp_path / "cut.bundle", tmp_path / "stage", None)
        assert e.value.reason == "truncated", (cut, str(e.value))


def test_checks_run_in_the_documented_order(demo_engine, keys, tmp_path):
    steps = []
    verifier = Verifier(TrustStore.load(keys.trust_dir), identity.cpu_identity("test"), on_step=steps.append)
    bundle = sign_bundle(demo_engine, tmp_path / "b.bundle", keys.fleet_key, 2)
    verifier.check_upload(bundle.stat().st_size, bundle.stat().st_size, sha256_file(bundle), sha256_file(bundle))
    verified = verifier.verify_bundle(bundle, tmp_path / "stage", current_version=1)
    assert tuple(steps) == STEPS
    assert verified.statement.version == 2 and verified.key_id


def test_cpu_device_accepts_only_cpu_engines_gpu_device_only_its_sm(demo_engine, keys, tmp_path):
    eng = engine_copy(demo_engine, tmp_path / "eng", target_sms=["8.7", "8.9"])
    bundle = sign_bundle(eng, tmp_path / "b.bundle", keys.fleet_key, 1)
    trust = TrustStore.load(keys.trust_dir)
    orin = identity.DeviceIdentity("Orin", "8.7", "12.6", 8 << 30, 6 << 30)
    Verifier(trust, orin).verify_bundle(bundle, tmp_path / "s1", None)
    for device in (identity.cpu_identity("test"), identity.DeviceIdentity("H100", "9.0", "12.8", 80 << 30, 79 << 30)):
        with pytest.raises(UpdateRejected) as e:
            Verifier(trust, device).verify_bundle(bundle, tmp_path / "s2", None)
        assert e.value.reason == "wrong-sm"


def test_unsigned_allowed_only_with_the_development_flag(demo_engine, keys, tmp_path, caplog):
    bundle = sign_bundle(demo_engine, tmp_path / "b.bundle", None, 1)
    verifier = Verifier(TrustStore.load(keys.trust_dir), identity.cpu_identity("test"), Policy(allow_unsigned=True))
    assert verifier.verify_bundle(bundle, tmp_path / "stage", None).key_id is None
    assert "UNSIGNED" in caplog.text


# ---- the store ----------------------------------------------------------------------------


def test_push_installs_immutable_version_and_moves_pointers(live, demo_engine, keys, tmp_path):
    store = live.store
    result = push_file(live, sign_bundle(demo_engine, tmp_path / "v6.bundle", keys.fleet_key, 6))
    assert (result.version, result.activated) == (6, True)
    assert (store.current_version(), store.previous_version()) == (6, 5)
    assert (store.root / "current").read_text() == "6\n"
    weights = store.engine_dir(6) / "model.safetensors"
    assert sha256_file(weights) == sha256_file(demo_engine / "model.safetensors")
    assert not os.access(weights, os.W_OK) or os.geteuid() == 0
    assert stat.S_IMODE(weights.stat().st_mode) == 0o444
    events = [e["event"] for e in live.audit.read()]
    assert events[-3:] == ["received", "installed", "activated"]


def test_stage_only_then_activate_then_rollback(live, demo_engine, keys, tmp_path):
    store = live.store
    result = push_file(live, sign_bundle(demo_engine, tmp_path / "v9.bundle", keys.fleet_key, 9), activate=False)
    assert not result.activated and store.current_version() == 5
    assert [v.state for v in live.list_versions()] == ["installed", "current", "previous"]
    info, _ = live.activate(9)
    assert info.state == "current" and (store.current_version(), store.previous_version()) == (9, 5)
    back = live.rollback()
    assert back.version == 5 and store.current_version() == 5 and store.previous_version() is None
    with pytest.raises(UpdateRejected) as e:
        live.rollback()
    assert e.value.reason == "no-previous"
    # The version rolled back from stays installed: activating it again is explicit.
    live.activate(9)
    assert store.current_version() == 9
    with pytest.raises(UpdateRejected) as e:
        live.activate(5)
    assert e.value.reason == "version-not-newer"
    with pytest.raises(UpdateRejected) as e:
        live.activate(77)
    assert e.value.reason == "unknown-version"
    assert [e["event"] for e in live.audit.read()].count("rolled-back") == 1


def test_prune_keeps_current_previous_and_newest(tmp_path, demo_engine, keys, cpu_device):
    updater = make_updater(tmp_path, keys, cpu_device)
    updater.store.keep = 3
    for v in (1, 2, 3, 4, 5):
        push_file(updater, sign_bundle(demo_engine, tmp_path / f"{v}.bundle", keys.fleet_key, v), activate=v != 3)
    assert updater.store.versions() == [3, 4, 5]


def test_recover_removes_crash_leftovers(live):
    store = live.store
    (store.root / "staging" / "install-x" / "engine").mkdir(parents=True)
    (store.root / "staging" / "upload-y.bundle").write_bytes(b"partial")
    (store.root / "current.tmp").write_text("9")
    (store.root / "versions" / "junk").mkdir()
    cleaned = store.recover()
    assert len(cleaned) == 4
    assert not list((store.root / "staging").iterdir())
    assert store.versions() == [4, 5] and store.current_version() == 5


def test_recover_falls_back_when_current_is_missing(live):
    store = live.store
    shutil.rmtree(store.version_dir(5))
    store.recover()
    assert store.current_version() == 4 and store.previous_version() is None


def test_store_lock_is_exclusive(live):
    live.store.lock()
    other = EngineStore(live.store.root)
    with pytest.raises(Exception, match="in use by another process"):
        other.lock()
    live.store.unlock()
    other.lock()
    other.unlock()


def test_crash_hooks_are_known_stages():
    assert hooks.STAGES == ("upload", "staging", "verified", "committed", "pointers", "activated")


# ---- identity and imports -----------------------------------------------------------------


def test_identity_without_gpu_reports_cpu():
    import torch

    ident = identity.detect()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (see the gpu-marked test)")
    assert ident.sm == "cpu" and ident.gpu_name is None and ident.is_cpu
    assert ident.total_memory_bytes > 0 and 0 < ident.free_memory_bytes <= ident.total_memory_bytes


@pytest.mark.gpu
def test_identity_matches_torch_on_gpu():
    import torch

    ident = identity.detect()
    major, minor = torch.cuda.get_device_capability(0)
    assert ident.sm == f"{major}.{minor}"
    assert ident.gpu_name == torch.cuda.get_device_name(0)
    assert ident.total_memory_bytes == torch.cuda.get_device_properties(0).total_memory
    assert ident.driver_version and ident.free_memory_bytes > 0


def test_ota_does_not_import_torch():
    code = (
        "import sys\n"
        "import edgellm.ota.cli, edgellm.ota.client, edgellm.ota.verify, edgellm.ota.updater, edgellm.ota.service\n"
        "from edgellm.ota import identity\n"
        "identity.detect()\n"
        "heavy = [m for m in ('torch', 'safetensors', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- the command line ---------------------------------------------------------------------


def test_cli_keygen_sign_verify(tmp_path, demo_engine, capsys):
    from edgellm.cli import main

    assert main(["keygen", "-o", str(tmp_path / "fleet")]) == 0
    trust = tmp_path / "trusted.d"
    trust.mkdir()
    shutil.copy(tmp_path / "fleet.pub", trust)
    bundle = tmp_path / "e.bundle"
    assert main(["sign", str(demo_engine), "--key", str(tmp_path / "fleet.key"), "--version", "3", "--expires", "30d", "-o", str(bundle)]) == 0
    assert main(["verify", str(bundle), "--trust", str(trust)]) == 0
    assert "bundle OK" in capsys.readouterr().out
    assert main(["verify", str(bundle), "--trust", str(trust), "--sm", "8.7"]) == 2
    out, err = capsys.readouterr()
    assert "FAIL  wrong-sm" in out and "[wrong-sm]" in err
    assert main(["verify", str(bundle), "--trust", str(trust), "--current-version", "3"]) == 2
    assert "FAIL  version-not-newer" in capsys.readouterr().out


def test_cli_sign_refuses_a_whole_file_hash_that_disagrees_with_the_chunks(tmp_path, demo_engine, capsys):
    """Devices check chunk hashes, older tools the whole-file sha256: sign vouches for both."""
    from edgellm.cli import main

    engine = tmp_path / "engine"
    shutil.copytree(demo_engine, engine)
    path = engine / "manifest.json"
    data = json.loads(path.read_text())
    data["files"]["model.safetensors"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    assert main(["keygen", "-o", str(tmp_path / "fleet")]) == 0
    bundle = tmp_path / "e.bundle"
    assert main(["sign", str(engine), "--key", str(tmp_path / "fleet.key"), "--version", "3", "-o", str(bundle)]) == 2
    assert "whole-file sha256 for model.safetensors that does not match" in capsys.readouterr().err
    assert not bundle.exists()

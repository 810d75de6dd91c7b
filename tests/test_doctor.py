"""`edgellm doctor` against real engine stores, real keys, real unix sockets, run as a subprocess.

The engines here are small but real engine directories (manifest, hashed safetensors and
tokenizer files), signed with `edgellm sign` and installed through the updater's own
verifier and store: doctor only reads manifests, hashes and signatures, so building a model
would add a minute and test nothing more.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgellm import __version__
from edgellm.cli import main as cli_main
from edgellm.doctor import can_read_write
from edgellm.engine.manifest import Manifest, describe_files, write_manifest
from edgellm.ota.identity import detect

THIS_DEVICE = detect()
OTHER_SM = "8.9" if THIS_DEVICE.sm == "8.7" else "8.7"
MY_GROUP = grp.getgrgid(os.getgid()).gr_name
MY_USER = __import__("pwd").getpwuid(os.getuid()).pw_name

MODEL_CONFIG = {
    "architecture": "LlamaForCausalLM", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 512, "tie_word_embeddings": True,
    "attention_bias": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_ids": [2],
}


def make_engine(path: Path, target_sms: list[str], quantization: dict | None = None,
                kernel_files: tuple[str, ...] = ()) -> Path:
    """kernel_files: names under kernels/ the engine ships (bytes that only need to hash, not run)."""
    path.mkdir(parents=True)
    save_file({"tok_embeddings.weight": np.zeros((512, 64), dtype=np.float16)}, str(path / "model.safetensors"))
    (path / "tokenizer_config.json").write_text("{}\n")
    for name in kernel_files:
        (path / "kernels").mkdir(exist_ok=True)
        (path / "kernels" / name).write_bytes(b"not a real cubin: doctor only reads the manifest's names")
    manifest = Manifest(
        engine_id="doctor-test", model={"architecture": "LlamaForCausalLM", "config": MODEL_CONFIG, "source": "test"},
        quantization=quantization or {"scheme": "fp16"}, kv_dtype="fp16", max_batch=2, max_seq_len=256,
        target_sms=target_sms, builder={"name": "edgellm", "version": __version__}, min_runtime_version=__version__,
        files=describe_files(path, ["model.safetensors", "tokenizer_config.json"]
                             + [f"kernels/{name}" for name in kernel_files]),
    )
    write_manifest(path, manifest)
    return path


def install(store_dir: Path, trust_dir: Path, key: Path, engine: Path, version: int, device_sm: str) -> None:
    """Sign with the CLI and install through the updater, as a push to a device with `device_sm` would."""
    from edgellm.ota.audit import AuditLog
    from edgellm.ota.store import EngineStore
    from edgellm.ota.trust import TrustStore
    from edgellm.ota.updater import Updater
    from edgellm.ota.verify import Verifier

    bundle = engine.with_suffix(".bundle")
    assert cli_main(["sign", str(engine), "--key", str(key), "--version", str(version), "-o", str(bundle)]) == 0
    device = dataclasses.replace(THIS_DEVICE, sm=device_sm, gpu_name=None if device_sm == "cpu" else "test GPU")
    store = EngineStore(store_dir)
    updater = Updater(store, Verifier(TrustStore.load(trust_dir), device), AuditLog(store_dir.parent / "audit.jsonl"))
    updater.install_file(bundle)
    store.activate(version)


@pytest.fixture
def device(tmp_path: Path) -> dict[str, Path]:
    """A device layout in tmp: config, store with one signed engine for this machine, trust dir, sockets."""
    trust = tmp_path / "trusted.d"
    trust.mkdir()
    assert cli_main(["keygen", "-o", str(tmp_path / "fleet")]) == 0
    (tmp_path / "fleet.pub").rename(trust / "fleet.pub")
    store = tmp_path / "engines"
    engine = make_engine(tmp_path / "build" / "engine", ["cpu"] if THIS_DEVICE.is_cpu else ["cpu", THIS_DEVICE.sm])
    install(store, trust, tmp_path / "fleet.key", engine, version=1, device_sm=THIS_DEVICE.sm)
    run = tmp_path / "run"
    run.mkdir()
    config = tmp_path / "edgellm.toml"
    config.write_text(textwrap.dedent(f"""\
        [engine]
        store = "{store}"
        [server]
        listen = "unix://{run}/edgellm.sock"
        admin_listen = "unix://{run}/admin.sock"
        socket_group = "{MY_GROUP}"
        """))
    return {"root": tmp_path, "config": config, "store": store, "trust": trust, "run": run, "key": tmp_path / "fleet.key"}


def run_doctor(device: dict[str, Path], *extra: str) -> tuple[int, dict, bool]:
    """Run `edgellm doctor --json` in a fresh interpreter; also report whether torch got imported."""
    args = ["doctor", "--json", "--config", str(device["config"]), "--user", MY_USER, *extra]
    if "trust" in device:
        args += ["--trust-dir", str(device["trust"])]
    code = ("import sys; from edgellm.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    torch_imported = proc.stderr.strip().splitlines()[-1] == "True"
    return proc.returncode, report, torch_imported


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def bind(path: Path, mode: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    os.chmod(path, mode)
    return s


def test_healthy_store_on_this_machine(device):
    kiosk, admin = bind(device["run"] / "edgellm.sock", 0o660), bind(device["run"] / "admin.sock", 0o600)
    with kiosk, admin:
        rc, report, torch_imported = run_doctor(device)
    checks = by_name(report)
    assert not torch_imported, "doctor must not import torch"
    assert report["version"] == __version__
    assert (rc == 1) == any(c["status"] == "fail" for c in report["checks"]) == (not report["ok"])
    for name in ("config", "engine-store", "trust", "engine-files", "engine-fit", "sockets", "host-memory"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "current version 1 (doctor-test" in checks["engine-store"]["detail"]
    assert "signed by trusted key" in checks["trust"]["detail"]
    if THIS_DEVICE.is_cpu:
        # This machine has no GPU: the GPU check must fail, say why and what to do; exit non-zero.
        assert checks["gpu"]["status"] == "fail"
        assert "no CUDA GPU visible" in checks["gpu"]["detail"] or "cuda-python" in checks["gpu"]["detail"]
        assert checks["gpu"]["fix"]
        assert checks["driver"]["status"] == "skip" and checks["gpu-memory"]["status"] == "skip"
        assert checks["gpu-kernels"]["status"] == "skip"
        assert rc == 1 and report["ok"] is False
    else:
        assert checks["gpu"]["status"] == "ok" and f"SM {THIS_DEVICE.sm}" in checks["gpu"]["detail"]
        assert checks["gpu-memory"]["status"] in ("ok", "warn")
        assert checks["gpu-kernels"]["status"] in ("ok", "warn") and "NVRTC" in checks["gpu-kernels"]["detail"]


def test_text_output_is_one_line_per_check_with_fixes(device):
    proc = subprocess.run([sys.executable, "-m", "edgellm", "doctor", "--config", str(device["config"]),
                           "--trust-dir", str(device["trust"]), "--user", MY_USER],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    summary = re.fullmatch(r"(\d+) failed, \d+ warning\(s\), (\d+) checks.*", lines[-1])
    assert summary and int(summary.group(2)) == len(lines) - 1, lines[-1]
    for line in lines[:-1]:
        status = line.split()[0]
        assert status in ("ok", "warn", "FAIL", "skip"), line
        if status == "FAIL":
            assert " -> " in line, f"a failure without a fix: {line}"
    assert ("FAIL" in proc.stdout) == (proc.returncode == 1)
    # No daemon here: the sockets check says so instead of failing.
    assert any(line.startswith("warn  sockets") and "not running" in line for line in lines)


def test_tampered_engine_file(device):
    weights = next((device["store"] / "versions" / "1" / "engine").glob("model.safetensors"))
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rc, report, _ = run_doctor(device)
    check = by_name(report)["engine-files"]
    assert rc == 1 and check["status"] == "fail"
    assert "model.safetensors" in check["detail"] and "modified" in check["detail"]
    assert "push the engine again" in check["fix"]


def test_engine_signed_by_a_key_no_longer_trusted(device, tmp_path):
    assert cli_main(["keygen", "-o", str(tmp_path / "other")]) == 0
    (device["trust"] / "fleet.pub").unlink()
    (tmp_path / "other.pub").rename(device["trust"] / "other.pub")
    rc, report, _ = run_doctor(device)
    check = by_name(report)["trust"]
    assert rc == 1 and check["status"] == "fail"
    assert "not among the 1 trusted key" in check["detail"]


def test_engine_built_for_another_sm(device):
    engine = make_engine(device["root"] / "build" / "other-sm", [OTHER_SM])
    # Installed when the device still had that GPU (e.g. a board swap since).
    install(device["store"], device["trust"], device["key"], engine, version=2, device_sm=OTHER_SM)
    rc, report, _ = run_doctor(device)
    check = by_name(report)["engine-fit"]
    assert rc == 1 and check["status"] == "fail"
    assert f"built for SM {OTHER_SM}" in check["detail"]
    assert "--target-sm" in check["fix"]


def test_empty_store_and_empty_trust_dir(device, tmp_path):
    empty = tmp_path / "fresh-store"
    empty.mkdir()
    for key in device["trust"].iterdir():
        key.unlink()
    rc, report, _ = run_doctor(device, "--store", str(empty))
    checks = by_name(report)
    assert rc == 1
    assert checks["engine-store"]["status"] == "fail" and "no current engine" in checks["engine-store"]["detail"]
    assert "edgellm push" in checks["engine-store"]["fix"]
    assert checks["trust"]["status"] == "fail" and "no usable" in checks["trust"]["detail"]
    assert checks["engine-files"]["status"] == "skip"
    assert list(empty.iterdir()) == [], "doctor must not create anything in the store"


def test_invalid_config_is_reported_and_other_checks_still_run(device):
    device["config"].write_text(device["config"].read_text() + "\n[scheduler]\nqueue_deep = 3\n")
    rc, report, _ = run_doctor(device, "--store", str(device["store"]))
    checks = by_name(report)
    assert rc == 1 and checks["config"]["status"] == "fail"
    assert "unknown key 'queue_deep' in [scheduler]" in checks["config"]["detail"]
    assert checks["engine-store"]["status"] == "ok"


def test_socket_permissions(device):
    kiosk, admin = bind(device["run"] / "edgellm.sock", 0o666), bind(device["run"] / "admin.sock", 0o660)
    with kiosk, admin:
        rc, report, _ = run_doctor(device)
    check = by_name(report)["sockets"]
    assert rc == 1 and check["status"] == "fail"
    assert "open to every local user" in check["detail"]
    assert "admin socket" in check["detail"] and "not 0600" in check["detail"]


def test_permission_bits_as_the_kernel_applies_them(tmp_path):
    node = tmp_path / "nvhost-ctrl-gpu"
    node.touch()
    node.chmod(0o660)
    gid = node.stat().st_gid
    assert can_read_write(node, 12345, {gid})  # in the node's group
    assert not can_read_write(node, 12345, {gid + 1})  # not in it: the Jetson case without `video`
    node.chmod(0o666)
    assert can_read_write(node, 12345, {gid + 1})  # discrete-GPU default: world rw


@pytest.mark.gpu
def test_gpu_checks_pass_on_a_gpu(tmp_path):
    """A fixed engine directory built for this GPU (no store, so no signing: the GPU boxes may
    lack cryptography); the GPU, driver, memory and fit checks must pass."""
    engine = make_engine(tmp_path / "engine", [THIS_DEVICE.sm])
    config = tmp_path / "edgellm.toml"
    config.write_text(f'[engine]\npath = "{engine}"\n[server]\nlisten = "unix://{tmp_path}/k.sock"\n'
                      f'admin_listen = "unix://{tmp_path}/a.sock"\n')
    rc, report, torch_imported = run_doctor({"config": config})
    print("\n".join(f"{c['status']:<5} {c['name']:<13} {c['detail']}" for c in report["checks"]))
    checks = by_name(report)
    assert not torch_imported
    assert checks["gpu"]["status"] == "ok" and f"SM {THIS_DEVICE.sm}" in checks["gpu"]["detail"]
    assert checks["driver"]["status"] in ("ok", "warn"), checks["driver"]
    assert checks["gpu-memory"]["status"] == "ok", checks["gpu-memory"]
    assert checks["engine-store"]["status"] == "ok" and checks["engine-fit"]["status"] == "ok"
    assert checks["engine-files"]["status"] == "ok"


@pytest.mark.gpu
@pytest.mark.parametrize("built_by", ["this runtime", "another version"])
def test_gpu_kernels_check_names_the_cubin_this_runtime_uses(tmp_path, built_by):
    """An INT4 engine's shipped W4A16 cubin counts only if its name holds this runtime's kernel-source
    hash: one built by another edgellm version is ignored by the daemon, and doctor must say so
    rather than report the tensor-core kernel as shipped."""
    from edgellm.engine.kernels import cubin_prefix
    from edgellm.engine.kernels.w4a16_source import cubin_name

    major, _, minor = THIS_DEVICE.sm.partition(".")
    sm = 10 * int(major) + int(minor)
    name = cubin_name(sm) if built_by == "this runtime" else f"{cubin_prefix(sm)}0123456789abcdef.cubin"
    engine = make_engine(tmp_path / "engine", [THIS_DEVICE.sm], {"scheme": "int4-awq", "group_size": 128},
                         kernel_files=(name,))
    config = tmp_path / "edgellm.toml"
    config.write_text(f'[engine]\npath = "{engine}"\n[server]\nlisten = "unix://{tmp_path}/k.sock"\n'
                      f'admin_listen = "unix://{tmp_path}/a.sock"\n')
    rc, report, torch_imported = run_doctor({"config": config})
    check = by_name(report)["gpu-kernels"]
    print(f"{check['status']:<5} {check['detail']}")
    assert not torch_imported
    if built_by == "this runtime":
        assert check["status"] == "ok" and "ships its kernels compiled for" in check["detail"], check
    else:
        assert "built by another edgellm version" in check["detail"] and name in check["detail"], check
        assert cubin_name(sm) in check["detail"], check
        # With NVRTC the daemon compiles its own (ok); without, INT4 falls back to a slower kernel (warn, and how to fix)
        assert ((check["status"] == "ok" and "compiles its own at its first start" in check["detail"])
                or (check["status"] == "warn" and "rebuild the engine with edgellm" in check["fix"])), check

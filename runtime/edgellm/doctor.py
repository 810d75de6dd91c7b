"""`edgellm doctor`: what is wrong with this device's edgellm installation, and what to do.

One line per check (ok, warn, FAIL or skip), each failure with the fix; exit 1 when any check
fails. `--json` prints the same as one object for scripts and fleet agents.

Must not import torch: it runs where torch is missing or broken, and a CUDA context in torch
would change the free-memory figure it reports. Device facts come from edgellm.ota.identity
(cuda-python). The signature check is the updater's own step (edgellm.ota.verify) and the file
and fit checks use the engine manifest's, so doctor and the daemon agree on what a valid engine
is; those two work without cryptography (the GPU boxes may lack it).
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from edgellm import __version__
from edgellm.errors import EdgeLLMError
from edgellm.ota import DEFAULT_TRUST_DIR

SERVICE = "edgellm.service"
SERVICE_USER = "edgellm"
CLIENT_GROUP = "edgellm-clients"
INSTALL_PREFIX = Path("/opt/edgellm")
BUILD_INFO = INSTALL_PREFIX / "build-info"

# What loading an engine needs beyond its weights and KV cache: the CUDA context, cuBLAS
# workspaces, activations, CUDA graph pools. An estimate with room to spare, not a measurement.
GPU_OVERHEAD_BYTES = 768 << 20
HOST_MEMORY_FAIL_BYTES = 512 << 20
HOST_MEMORY_WARN_BYTES = 1 << 30
GIB = 1 << 30

# Device nodes CUDA opens: discrete GPUs (nvidia.ko) and Jetson's integrated GPU (nvgpu, nvmap).
GPU_NODE_PATTERNS = ("nvidiactl", "nvidia[0-9]*", "nvidia-uvm", "nvmap", "nvhost-*", "nvgpu/*/*")

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
_LABEL = {OK: "ok  ", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{_LABEL[self.status]}  {self.name:<14} {self.detail}"
        if self.fix and self.status in (FAIL, WARN):
            text += f" -> {self.fix}"
        return text


@dataclasses.dataclass
class Settings:
    """Where things are, from the daemon's config file (or its defaults when that is broken)."""

    config_path: Path
    config: Any = None  # edgellm.serving.config.ServeConfig when it loaded
    config_error: str = ""
    store: Path | None = None
    engine: Path | None = None
    trust_dir: Path = DEFAULT_TRUST_DIR
    listen: str = "unix:///run/edgellm/edgellm.sock"
    admin_listen: str = "unix:///run/edgellm/admin.sock"
    socket_group: str = ""


@dataclasses.dataclass
class CurrentEngine:
    """The engine the daemon would serve: the store's current version, or a fixed directory."""

    manifest: Any  # edgellm.engine.manifest.Manifest
    engine_dir: Path
    version: int | None = None  # None: a fixed engine directory, not from a store
    version_dir: Path | None = None  # holds statement.json and signature


class Doctor:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.settings = load_settings(args.config, args.store, args.trust_dir)
        self.user = args.user
        self._identity: Any = None
        self._identity_error = ""
        self._current: CurrentEngine | None = None  # set by check_engine_store

    # ---- shared facts ---------------------------------------------------------------------
    def identity(self):
        """edgellm.ota.identity.detect(), asked once."""
        if self._identity is None and not self._identity_error:
            try:
                from edgellm.ota.identity import detect

                device = self.settings.config.device if self.settings.config is not None else "auto"
                self._identity = detect(int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0)
            except (EdgeLLMError, ImportError, OSError) as e:
                self._identity_error = str(e)
        return self._identity

    # ---- the checks, in the order an operator would look -------------------------------------
    def checks(self) -> list[Callable[[], Check]]:
        return [
            self.check_runtime,
            self.check_torch,
            self.check_config,
            self.check_gpu,
            self.check_driver,
            self.check_host_memory,
            self.check_engine_store,
            self.check_trust,
            self.check_engine_files,
            self.check_engine_fit,
            self.check_gpu_kernels,
            self.check_gpu_memory,
            self.check_service_user,
            self.check_gpu_access,
            self.check_sockets,
            self.check_service,
        ]

    def run(self) -> list[Check]:
        results = []
        for check in self.checks():
            try:
                results.append(check())
            except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
                name = check.__name__.removeprefix("check_").replace("_", "-")
                results.append(Check(name, FAIL, f"the check itself crashed: {type(e).__name__}: {e}",
                                     "report this as an edgellm bug, with this output"))
        return results

    def check_runtime(self) -> Check:
        where = Path(sys.prefix)
        info = read_build_info()
        detail = f"edgellm {__version__}, Python {platform.python_version()} ({where})"
        if info:
            detail += f", package {info.get('DEB_VERSION', '?')} (wheelhouse: {info.get('WHEELHOUSE', '?')})"
        missing = missing_dependencies()
        if missing:
            return Check("runtime", FAIL, f"{detail}; missing Python packages: {', '.join(missing)}",
                         "install them into the system Python, or install a package built with the full "
                         "wheelhouse (packaging/build-deb.sh without --project-only)")
        return Check("runtime", OK, detail)

    def check_torch(self) -> Check:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.origin:
            return Check("torch", FAIL, f"torch is not importable from {sys.executable}",
                         "install PyTorch into the system Python (Jetson: NVIDIA's wheel for your JetPack; "
                         "x86: the CUDA build from download.pytorch.org); the edgellm venv sees system packages")
        version = dist_version("torch") or "?"
        cuda = torch_cuda_version(Path(spec.origin).parent)
        built = f"CUDA {cuda}" if cuda else "CPU only"
        detail = f"torch {version} ({built}) from {Path(spec.origin).parent.parent}"
        ident = self.identity()
        if ident is not None and not ident.is_cpu and not cuda:
            return Check("torch", FAIL, detail + f", but this device has a GPU ({ident.gpu_name})",
                         "install a CUDA build of torch (the CPU build cannot use the GPU)")
        return Check("torch", OK, detail)

    def check_config(self) -> Check:
        s = self.settings
        if s.config_error:
            if not s.config_path.exists():
                fix = ("restore the packaged one: sudo apt-get install --reinstall -o Dpkg::Options::=--force-confmiss "
                       "edgellm (or pass --config PATH)")
            else:
                fix = f"edit {s.config_path} (every key is explained in the packaged file), then: sudo systemctl restart edgellm"
            return Check("config", FAIL, s.config_error, fix)
        source = f"store {s.store}" if s.store else f"engine {s.engine}"
        return Check("config", OK, f"{s.config_path} is valid; serves {source}, listens on {s.listen}")

    def check_gpu(self) -> Check:
        ident = self.identity()
        if ident is None:
            return Check("gpu", FAIL, f"the CUDA driver could not describe the GPU: {self._identity_error}",
                         "check the driver with nvidia-smi (Jetson: sudo tegrastats) and dmesg | grep -i nv")
        if ident.is_cpu and importlib.util.find_spec("cuda") is None:
            return Check("gpu", FAIL, "cannot ask the CUDA driver: cuda-python is not installed",
                         "install cuda-python into the system Python (the full-wheelhouse package bundles it)")
        if ident.is_cpu:
            return Check("gpu", FAIL, f"no CUDA GPU visible ({ident.detail})",
                         "load the NVIDIA driver (nvidia-smi must list the GPU; Jetson: JetPack's L4T "
                         "kernel), check /dev/nvidia* or /dev/nvhost-* exist, and that CUDA_VISIBLE_DEVICES "
                         "does not hide it")
        return Check("gpu", OK, f"{ident.gpu_name}, SM {ident.sm}")

    def check_driver(self) -> Check:
        ident = self.identity()
        if ident is None or ident.is_cpu or not ident.driver_version:
            return Check("driver", SKIP, "no CUDA driver answered (see gpu)")
        driver = version_tuple(ident.driver_version)
        detail = f"CUDA driver API {ident.driver_version}"
        fatal, minor = [], []  # a newer CUDA major cannot run; a newer minor runs in compatibility mode
        spec = importlib.util.find_spec("torch")
        torch_cuda = torch_cuda_version(Path(spec.origin).parent) if spec and spec.origin else None
        if torch_cuda:
            detail += f", torch built for CUDA {torch_cuda}"
            if version_tuple(torch_cuda)[:1] > driver[:1]:
                fatal.append(f"torch needs a CUDA {torch_cuda.split('.')[0]}.x driver")
            elif version_tuple(torch_cuda)[:2] > driver[:2]:
                minor.append(f"torch was built for CUDA {torch_cuda}, newer than the driver (minor-version "
                             "compatibility: no PTX JIT, some kernels unavailable)")
        bindings = dist_version("cuda-bindings") or dist_version("cuda-python")
        if bindings:
            detail += f", cuda-python {bindings}"
            if version_tuple(bindings)[:1] > driver[:1]:
                fatal.append(f"cuda-python {bindings} targets CUDA {bindings.split('.')[0]}.x")
        if not fatal and not minor:
            return Check("driver", OK, detail)
        return Check("driver", FAIL if fatal else WARN, f"{detail}: {'; '.join(fatal + minor)}",
                     "upgrade the NVIDIA driver (JetPack on Jetson), or install torch / cuda-python built "
                     f"for CUDA {ident.driver_version} (e.g. cuda-python<{driver[0] + 1})")

    def check_host_memory(self) -> Check:
        total, available = meminfo()
        detail = f"{available / GIB:.1f} of {total / GIB:.1f} GiB available"
        if available < HOST_MEMORY_FAIL_BYTES:
            return Check("host-memory", FAIL, detail, "stop other services or kiosk processes using memory")
        if available < HOST_MEMORY_WARN_BYTES:
            return Check("host-memory", WARN, detail, "little headroom: tokenizer, Python and gRPC need ~0.5 GiB")
        return Check("host-memory", OK, detail)

    def check_engine_store(self) -> Check:
        s = self.settings
        if s.engine is not None:
            return self._check_engine_dir(s.engine)
        root = s.store
        if root is None:
            return Check("engine-store", SKIP, "no engine store configured (see config)")
        try:
            if not root.is_dir():
                return Check("engine-store", FAIL, f"engine store {root} does not exist",
                             f"create it: sudo install -d -o {SERVICE_USER} -g {SERVICE_USER} -m 0750 {root} "
                             "(the package's tmpfiles.d entry does this for the default path)")
            os.listdir(root)
        except PermissionError:
            return Check("engine-store", FAIL, f"cannot read {root} as {current_user()}",
                         "run doctor as root: sudo edgellm doctor")
        current = read_current(root)
        if current is None:
            return Check("engine-store", FAIL, f"{root} holds no current engine (a fresh device): the daemon "
                         "answers UNAVAILABLE until one is pushed",
                         "build, sign and push one: sudo edgellm push ENGINE.bundle (docs/operations.md)")
        version, vdir = current
        from edgellm.engine.manifest import read_manifest

        try:
            manifest = read_manifest(vdir / "engine")
        except EdgeLLMError as e:
            return Check("engine-store", FAIL, f"current version {version}: {e}",
                         "roll back (sudo edgellm rollback) or push the engine again")
        self._current = CurrentEngine(manifest, vdir / "engine", version, vdir)
        return Check("engine-store", OK, f"{root}: current version {version} ({manifest.engine_id}, "
                     f"{manifest.quantization.get('scheme')}, max batch {manifest.max_batch}, "
                     f"max seq len {manifest.max_seq_len}, SM {', '.join(manifest.target_sms)})")

    def _check_engine_dir(self, engine_dir: Path) -> Check:
        from edgellm.engine.manifest import read_manifest

        try:
            manifest = read_manifest(engine_dir)
        except PermissionError:
            return Check("engine-store", FAIL, f"cannot read {engine_dir} as {current_user()}", "run: sudo edgellm doctor")
        except EdgeLLMError as e:
            return Check("engine-store", FAIL, str(e), "point [engine] path at an engine directory, or use [engine] store")
        self._current = CurrentEngine(manifest, engine_dir)
        return Check("engine-store", OK, f"engine directory {engine_dir} ({manifest.engine_id}; not from a "
                     "store, so not signature-checked)")

    def check_trust(self) -> Check:
        trust_dir = self.settings.trust_dir
        try:
            from edgellm.ota.trust import TrustStore
        except ImportError as e:
            return Check("trust", FAIL, f"cannot check signatures: {e}", "install the cryptography package")
        try:
            trust = TrustStore.load(trust_dir)
        except PermissionError:
            return Check("trust", FAIL, f"cannot read {trust_dir} as {current_user()}", "run: sudo edgellm doctor")
        except EdgeLLMError as e:
            return Check("trust", FAIL, str(e), f"sudo install -d -m 0755 {trust_dir}, then copy the fleet's .pub key in")
        if len(trust) == 0:
            return Check("trust", FAIL, f"{trust_dir} holds no usable *.pub key: every update will be refused",
                         f"copy the fleet's public key there: sudo install -m 0644 fleet.pub {trust_dir}/")
        keys = f"{len(trust)} trusted key(s) in {trust_dir}"
        if self._current is None or self._current.version_dir is None:
            return Check("trust", OK, keys)
        version, vdir = self._current.version, self._current.version_dir
        statement_bytes = (vdir / "statement.json").read_bytes()
        sig_path = vdir / "signature"
        signature_bytes = sig_path.read_bytes() if sig_path.exists() else None
        try:
            statement, kid, _ = self._verifier(trust).check_signature(
                statement_bytes, signature_bytes, (vdir / "engine" / "manifest.json").read_bytes())
        except EdgeLLMError as e:
            return Check("trust", FAIL, f"current version {version} does not verify: {e}",
                         "push an engine signed by a key in the trust store, or restore the key that signed it")
        if kid is None:
            return Check("trust", WARN, f"{keys}; current version {version} is UNSIGNED (installed under the "
                         "development flag)", "push a signed engine and turn the development flag off")
        if statement.expires_at is not None:
            from edgellm.ota.errors import Expired

            try:
                self._verifier(trust).check_expiry(statement)
            except Expired as e:
                return Check("trust", WARN, f"{keys}; {e}", "it keeps serving, but cannot be activated again: "
                             "push a freshly signed engine")
        return Check("trust", OK, f"{keys}; current version {version} signed by trusted key {kid[:16]}")

    def check_engine_files(self) -> Check:
        if self._current is None:
            return Check("engine-files", SKIP, "no engine to check (see engine-store)")
        manifest, engine_dir = self._current.manifest, self._current.engine_dir
        size = sum(int(f["size"]) for f in manifest.files.values())
        if self.args.no_hash:
            return Check("engine-files", SKIP, f"{len(manifest.files)} files, {size / GIB:.2f} GiB: hashing skipped (--no-hash)")
        from edgellm.engine.manifest import verify_files

        try:
            verify_files(engine_dir, manifest)
        except EdgeLLMError as e:
            return Check("engine-files", FAIL, str(e),
                         "the stored copy is damaged (disk fault or tampering): roll back, then push the engine again")
        return Check("engine-files", OK, f"{len(manifest.files)} files, {size / GIB:.2f} GiB, sha256 as in the manifest")

    def check_engine_fit(self) -> Check:
        if self._current is None:
            return Check("engine-fit", SKIP, "no engine to check (see engine-store)")
        manifest = self._current.manifest
        ident = self.identity()
        problems = []
        from edgellm.engine.manifest import CPU_TARGET, parse_version

        if parse_version(__version__) < parse_version(manifest.min_runtime_version):
            problems.append(f"needs edgellm >= {manifest.min_runtime_version}, this is {__version__}")
        if ident is not None:
            if ident.is_cpu and CPU_TARGET not in manifest.target_sms:
                problems.append(f"built for SM {', '.join(manifest.target_sms)} but this device has no GPU")
            elif not ident.is_cpu and ident.sm not in manifest.target_sms:
                problems.append(f"built for SM {', '.join(manifest.target_sms)} but this GPU is SM {ident.sm}")
        if problems:
            sm = ident.sm if ident is not None else "THIS_SM"
            return Check("engine-fit", FAIL, f"engine {manifest.engine_id}: {'; '.join(problems)}",
                         f"rebuild it for this device (edgellm build ... --target-sm {sm}, or this device class's "
                         "profile in engines/profiles/) and push it, or upgrade edgellm")
        where = f"SM {ident.sm}" if ident is not None else "this device"
        return Check("engine-fit", OK, f"engine {manifest.engine_id} targets {where}, runtime {__version__} >= "
                     f"{manifest.min_runtime_version}")

    def check_gpu_kernels(self) -> Check:
        """Whether INT4 engines can run the tensor-core kernel here: the current engine ships it
        compiled for this SM, or NVRTC compiles it at the daemon's first start."""
        ident = self.identity()
        if ident is None or ident.is_cpu:
            return Check("gpu-kernels", SKIP, "no GPU (see gpu)")
        from edgellm.engine.kernels import ENGINE_KERNELS_DIR, cubin_prefix, nvrtc_usable
        from edgellm.engine.kernels.w4a16_source import cubin_name

        usable, detail = nvrtc_usable()
        manifest = self._current.manifest if self._current is not None else None
        int4 = manifest is not None and manifest.quantization.get("scheme") != "fp16"
        major, _, minor = ident.sm.partition(".")
        sm = 10 * int(major) + int(minor)
        # The daemon uses a shipped cubin only if it was built from this runtime's kernel source (its
        # name holds the source's hash): one from another edgellm version is ignored.
        needed = f"{ENGINE_KERNELS_DIR}/{cubin_name(sm)}"
        ships = int4 and needed in manifest.files
        stale = [rel for rel in manifest.files if rel.startswith(f"{ENGINE_KERNELS_DIR}/{cubin_prefix(sm)}")
                 and rel != needed] if int4 and not ships else []
        if ships:
            how = "" if usable else " (no NVRTC here: an engine pushed without them would not)"
            return Check("gpu-kernels", OK, f"{detail}; engine {manifest.engine_id} ships its kernels compiled for "
                         f"SM {ident.sm}: INT4 runs the tensor-core kernel{how}")
        if stale:
            what = (f"engine {manifest.engine_id} ships kernels for SM {ident.sm} built by another edgellm version "
                    f"({stale[0].rpartition('/')[2]}; this runtime {__version__} needs {needed.rpartition('/')[2]}), "
                    "which the daemon does not use")
            if usable:
                return Check("gpu-kernels", OK, f"{detail}; {what}: it compiles its own at its first start (seconds, "
                             "minutes on an Orin) and caches them")
            return Check("gpu-kernels", WARN, f"{detail}, and {what}: INT4 runs Triton's slower kernel instead, or "
                         "dequantized fp16 weights (4x the memory) without Triton",
                         f"rebuild the engine with edgellm {__version__} (edgellm build ... --target-sm {ident.sm}) on a "
                         "host with NVRTC and push it, or install NVRTC here (the CUDA toolkit's cuda-nvrtc package, "
                         "or pip install nvidia-cuda-nvrtc-cu12 into the system Python), then restart edgellm")
        if not usable:
            shipped = f"engine {manifest.engine_id} ships no kernels for SM {ident.sm}" if int4 else "no engine here ships them"
            return Check("gpu-kernels", WARN, f"{detail}, and {shipped}: INT4 engines without the tensor-core "
                         "kernels compiled for this SM run Triton's slower kernel instead, or "
                         "dequantized fp16 weights (4x the memory) without Triton",
                         f"build engines with --target-sm {ident.sm} on a host with NVRTC (they then ship the kernels), "
                         "or install NVRTC for this CUDA version (the CUDA toolkit's cuda-nvrtc package, or pip "
                         "install nvidia-cuda-nvrtc-cu12 into the system Python), then restart edgellm")
        if not int4:
            return Check("gpu-kernels", OK, f"{detail}: INT4 engines run the tensor-core kernel")
        return Check("gpu-kernels", OK, f"{detail}; engine {manifest.engine_id} ships no kernels for SM {ident.sm}: "
                     "the daemon compiles them at its first start (seconds, minutes on an Orin) and caches them")

    def check_gpu_memory(self) -> Check:
        ident = self.identity()
        if ident is None or ident.is_cpu:
            return Check("gpu-memory", SKIP, "no GPU (see gpu)")
        free, total = ident.free_memory_bytes, ident.total_memory_bytes
        detail = f"{free / GIB:.1f} of {total / GIB:.1f} GiB free"
        if self._current is None:
            return Check("gpu-memory", OK, detail + " (no engine to size against)")
        need = self._current.manifest.memory_bytes("cuda") + GPU_OVERHEAD_BYTES
        detail += f"; the engine needs ~{need / GIB:.1f} GiB (weights + KV cache + CUDA overhead)"
        if daemon_listening(self.settings.listen):
            # The daemon's engine is already resident: what is free is the hot-swap headroom.
            if free < need:
                return Check("gpu-memory", WARN, detail + " while the daemon holds the live engine",
                             "an update will drain and swap instead of loading beside the live engine "
                             "(brief queueing, no errors); fine on an Orin Nano, unexpected on a large GPU")
            return Check("gpu-memory", OK, detail + "; room to hot-swap beside the live engine")
        if free < need:
            return Check("gpu-memory", FAIL, detail,
                         "stop other GPU processes (nvidia-smi; Jetson: also free page cache and the desktop), "
                         "or build a smaller engine (lower --max-batch / --max-seq-len, int4-awq)")
        return Check("gpu-memory", OK, detail)

    def check_service_user(self) -> Check:
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            return Check("service-user", FAIL, f"user {self.user} does not exist",
                         "the package creates it: sudo systemd-sysusers edgellm.conf (or reinstall edgellm)")
        groups = user_groups(pw)
        detail = f"{self.user} (uid {pw.pw_uid}) in groups {', '.join(sorted(group_name(g) for g in groups))}"
        group = self.settings.socket_group
        if group and group_exists(group) and grp.getgrnam(group).gr_gid not in groups:
            return Check("service-user", FAIL, f"{detail}; not in {group}, so the daemon cannot give the kiosk "
                         "socket that group and will not start", f"sudo usermod -aG {group} {self.user}")
        return Check("service-user", OK, detail)

    def check_gpu_access(self) -> Check:
        nodes = gpu_device_nodes()
        ident = self.identity()
        if not nodes:
            if ident is None or ident.is_cpu:
                return Check("gpu-access", SKIP, "no GPU device nodes in /dev (see gpu)")
            return Check("gpu-access", WARN, "the GPU answers but no known device node was found in /dev",
                         "check which /dev nodes the driver uses and that the edgellm user can open them")
        try:
            pw = pwd.getpwnam(self.user)
        except KeyError:
            return Check("gpu-access", SKIP, f"user {self.user} does not exist (see service-user)")
        groups = user_groups(pw)
        denied = [n for n in nodes if not can_read_write(n, pw.pw_uid, groups)]
        if denied:
            owners = sorted({f"{group_name(n.stat().st_gid)} {stat.filemode(n.stat().st_mode)}" for n in denied})
            return Check("gpu-access", FAIL, f"{self.user} cannot open {', '.join(str(n) for n in denied[:4])}"
                         f"{' ...' if len(denied) > 4 else ''} ({'; '.join(owners)})",
                         f"add {self.user} to the nodes' group (sudo usermod -aG video {self.user}), "
                         "then: sudo systemctl restart edgellm")
        detail = f"{self.user} can open {len(nodes)} GPU device node(s)"
        has_ctl = Path("/dev/nvidiactl").exists()
        if has_ctl and not Path("/dev/nvidia-uvm").exists():
            return Check("gpu-access", WARN, detail + "; /dev/nvidia-uvm is missing (CUDA needs it)",
                         "the unit creates it at start (nvidia-modprobe -u -c=0); by hand: sudo nvidia-modprobe -u -c=0")
        return Check("gpu-access", OK, detail)

    def check_sockets(self) -> Check:
        s = self.settings
        group = s.socket_group
        restart = "sudo systemctl restart edgellm (the daemon recreates its sockets)"
        problems: list[tuple[str, str]] = []  # (what is wrong, what to do)
        if group and not group_exists(group):
            problems.append((f"socket_group {group} does not exist",
                             "the package creates it: sudo systemd-sysusers edgellm.conf"))
        seen = []
        for address, kiosk in ((s.listen, True), (s.admin_listen, False)):
            if not address or not address.startswith("unix:"):
                continue
            path = unix_path(address)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            except PermissionError:
                problems.append((f"cannot inspect {path} as {current_user()}", "run: sudo edgellm doctor"))
                continue
            seen.append(path)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISSOCK(st.st_mode):
                problems.append((f"{path} is not a socket", f"remove it, then {restart}"))
            elif not kiosk and mode & 0o077:
                problems.append((f"admin socket {path} is {mode:04o}, not 0600: other users could install engines",
                                 restart))
            elif kiosk and mode & 0o007:
                problems.append((f"{path} is {mode:04o}: open to every local user", restart))
            elif kiosk and group and (group_name(st.st_gid) != group or mode & 0o060 != 0o060):
                problems.append((f"{path} is {mode:04o} group {group_name(st.st_gid)}; the config says 0660 group "
                                 f"{group}", restart))
        if problems:
            return Check("sockets", FAIL, "; ".join(p for p, _ in problems), "; ".join(dict.fromkeys(f for _, f in problems)))
        if not seen:
            return Check("sockets", WARN, f"no socket at {unix_path(s.listen)}: the daemon is not running",
                         "sudo systemctl start edgellm; if it does not stay up: journalctl -u edgellm -b")
        if not group:
            return Check("sockets", WARN, f"{', '.join(map(str, seen))}: [server] socket_group is not set, so "
                         "only the daemon's own group can use the kiosk socket",
                         f'set socket_group = "{CLIENT_GROUP}" in {s.config_path}')
        return Check("sockets", OK, f"{', '.join(map(str, seen))}: kiosk socket 0660 group {group}, admin socket 0600; "
                     f"kiosk apps join with: sudo usermod -aG {group} APPUSER")

    def check_service(self) -> Check:
        if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
            return Check("service", SKIP, "systemd is not running here (a container or chroot?)")
        state = systemctl("is-active", SERVICE)
        enabled = systemctl("is-enabled", SERVICE)
        detail = f"{SERVICE} is {state}, {enabled} at boot"
        if state in ("failed", "activating") or enabled in ("not-found", ""):
            return Check("service", FAIL, detail,
                         "see why: journalctl -u edgellm -b --no-pager | tail -50; after fixing: "
                         "sudo systemctl reset-failed edgellm && sudo systemctl start edgellm")
        if state != "active" or enabled not in ("enabled", "static"):
            return Check("service", WARN, detail, "sudo systemctl enable --now edgellm")
        return Check("service", OK, detail)

    def _verifier(self, trust):
        from edgellm.ota.identity import cpu_identity
        from edgellm.ota.verify import Verifier

        return Verifier(trust, self.identity() or cpu_identity("unknown"))


# ---- helpers ------------------------------------------------------------------------------
def load_settings(config_path: Path, store: Path | None, trust_dir: Path | None) -> Settings:
    s = Settings(config_path=config_path)
    try:
        from edgellm.serving.config import ServeConfig, read_config_file

        config = ServeConfig(**read_config_file(config_path))
        if store is not None:
            config.engine, config.store = None, store
        config.check()
        s.config = config
        s.store, s.engine = config.store, config.engine
        s.listen, s.admin_listen, s.socket_group = config.listen, config.admin_listen, config.socket_group
        if config.store is not None:
            # The [updates] table is read by the engine-update part; check it the same way.
            from edgellm.ota.daemon import UpdateSettings

            updates = UpdateSettings.from_table(config.updates)
            updates.check()
            s.trust_dir = updates.trust_dir
    except ImportError as e:
        s.config_error = f"cannot read the config: {e}"
    except EdgeLLMError as e:
        s.config_error = str(e)
    except TypeError as e:  # an unexpected key/type the reader let through
        s.config_error = f"{config_path}: {e}"
    if s.store is None and s.engine is None:
        s.store = store or Path("/var/lib/edgellm/engines")
    if trust_dir is not None:
        s.trust_dir = trust_dir
    return s


def read_current(root: Path) -> tuple[int, Path] | None:
    """The store's current version, read without edgellm.ota.store.EngineStore: its constructor
    creates missing subdirectories, and doctor (often root) must not create anything in a
    store the daemon owns."""
    try:
        text = (root / "current").read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        return None
    vdir = root / "versions" / text
    return (int(text), vdir) if vdir.is_dir() else None


def missing_dependencies() -> list[str]:
    """Runtime dependencies of the installed edgellm that cannot be found (torch has its own check)."""
    try:
        requires = importlib.metadata.requires("edgellm") or []
    except importlib.metadata.PackageNotFoundError:
        return []  # running from a source tree
    missing = []
    for req in requires:
        name, _, marker = req.partition(";")
        name = re.match(r"[A-Za-z0-9._-]+", name.strip()).group(0)
        if "extra ==" in marker or name.lower() == "torch":
            continue
        if "sys_platform" in marker and sys.platform not in marker:
            continue
        if dist_version(name) is None:
            missing.append(name)
    return missing


def read_build_info() -> dict[str, str]:
    try:
        text = BUILD_INFO.read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_cuda_version(torch_dir: Path) -> str | None:
    """The CUDA version torch was built for, read from torch/version.py without importing torch."""
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([0-9.]+)['\"]", text, re.M)
    return m.group(1) if m else None


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def meminfo() -> tuple[int, int]:
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values.get("MemAvailable", values["MemFree"])


def gpu_device_nodes() -> list[Path]:
    dev = Path("/dev")
    found = []
    for pattern in GPU_NODE_PATTERNS:
        found.extend(p for p in sorted(dev.glob(pattern)) if p.is_char_device())
    return found


def user_groups(pw: pwd.struct_passwd) -> set[int]:
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid))


def can_read_write(path: Path, uid: int, gids: set[int]) -> bool:
    """Classic permission bits as the kernel applies them to a process of uid/gids (ACLs aside)."""
    if uid == 0:
        return True
    st = path.stat()
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid in gids:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o6 == 0o6


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def current_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def unix_path(address: str) -> Path:
    path = address.removeprefix("unix:")
    return Path(path[2:] if path.startswith("//") else path)


def daemon_listening(address: str) -> bool:
    if not address.startswith("unix:"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(unix_path(address)))
            return True
        except OSError:
            return False


def systemctl(*args: str) -> str:
    try:
        out = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


# ---- the command --------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this device's GPU, driver, engine store, sockets and service; say what to fix")
    p.add_argument("--config", type=Path, default=Path("/etc/edgellm/edgellm.toml"),
                   help="the daemon's config file (default /etc/edgellm/edgellm.toml)")
    p.add_argument("--store", type=Path, help="engine store to check (default: the config's)")
    p.add_argument("--trust-dir", type=Path, help="trust store to check against (default: the config's, "
                   "else /etc/edgellm/trusted.d)")
    p.add_argument("--user", default=SERVICE_USER, help="the user the daemon runs as (default edgellm)")
    p.add_argument("--no-hash", action="store_true", help="skip hashing the engine's files (large engines take seconds)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    # The ota modules log warnings (e.g. an empty trust store) that the checks already report.
    logging.getLogger("edgellm").addHandler(logging.NullHandler())
    results = Doctor(args).run()
    failed = [c for c in results if c.status == FAIL]
    if args.json:
        print(json.dumps({"version": __version__, "ok": not failed,
                          "checks": [dataclasses.asdict(c) for c in results]}, indent=2))
    else:
        for c in results:
            print(c.line())
        warned = sum(c.status == WARN for c in results)
        print(f"{len(failed)} failed, {warned} warning(s), {len(results)} checks"
              + ("" if failed else ": nothing blocks serving"))
    return 1 if failed else 0

"""The Debian package, built from this repository by packaging/build-deb.sh, then installed.

Two kinds of install:
- into an empty directory with `dpkg --root DIR --force-script-chrootless`: works unprivileged;
  the maintainer scripts run on this host with DPKG_ROOT=DIR, so the venv's scripts name
  DIR/opt/edgellm/... (fine for running them here, not a bootable image);
- into a real chroot (an overlay of this machine's / with a tmpfs on top), when running as
  root with mount rights: the normal dpkg path, maintainer scripts inside the chroot.

The package is built with --project-only (the edgellm wheel alone; CI has no network): its
dependencies come from "the system Python", here this test interpreter's site-packages added
to the installed venv's path, exactly as --system-site-packages exposes JetPack's torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from edgellm import __version__
from edgellm.serving.config import ServeConfig, read_config_file, unix_socket_path

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
DEB_VERSION = f"{__version__}-1"
TOOLS = ("dpkg", "dpkg-deb", "systemd-analyze")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)} (scripts/setup-env.sh installs them)")

# The interpreter the installed venv is made from: the one running the tests, so the
# dependencies borrowed from its site-packages match its ABI.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
SYSTEM_DEPS = sysconfig.get_paths()["purelib"]


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([PACKAGING / "build-deb.sh", "--project-only", "-o", out])
    (path,) = out.glob("edgellm_*.deb")
    return path


def fresh_root(path: Path) -> Path:
    for sub in ("info", "updates", "triggers"):
        (path / "var/lib/dpkg" / sub).mkdir(parents=True)
    (path / "var/lib/dpkg/status").touch()
    return path


def dpkg(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # --force-depends: an empty root has no python3 package; the host's python3 does the work.
    return run(["dpkg", f"--root={root}", "--force-not-root", "--force-script-chrootless", "--force-depends",
                "--log=/dev/null", *args], env={**os.environ, "EDGELLM_PYTHON": BASE_PYTHON, **env})


def borrow_system_deps(root: Path) -> None:
    """Stand in for the device's system Python: its packages become visible after the venv's own."""
    (site,) = (root / "opt/edgellm/venv/lib").glob("python3*/site-packages")
    (site / "zz-system-deps-for-test.pth").write_text(SYSTEM_DEPS + "\n")


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory) -> Path:
    root = fresh_root(tmp_path_factory.mktemp("root"))
    dpkg(root, "-i", deb)
    borrow_system_deps(root)
    return root


def unit_settings(path: Path) -> dict[str, list[str]]:
    """KEY -> values (systemd allows repeated keys, e.g. Environment=)."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def seconds(span: str) -> float:
    units = {"s": 1, "sec": 1, "min": 60, "ms": 0.001, "h": 3600}
    return sum(float(n) * units[u or "s"] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span))


# ---- the package file -------------------------------------------------------------------------
def test_package_contents(deb):
    listing = run(["dpkg-deb", "--contents", deb]).stdout.splitlines()
    entries = {}
    for line in listing:
        mode, owner, _size, _date, _time, path, *link = line.split()
        entries[path.removeprefix(".")] = (mode, owner, link[1] if link else None)
    expected_files = [
        "/usr/lib/systemd/system/edgellm.service", "/usr/lib/sysusers.d/edgellm.conf",
        "/usr/lib/tmpfiles.d/edgellm.conf", "/etc/edgellm/edgellm.toml", "/opt/edgellm/build-info",
        "/opt/edgellm/requirements.txt", f"/opt/edgellm/wheels/edgellm-{__version__}-py3-none-any.whl",
        "/usr/share/doc/edgellm/operations.md", "/usr/share/doc/edgellm/copyright",
    ]
    for path in expected_files:
        assert entries[path][:2] == ("-rw-r--r--", "root/root"), (path, entries.get(path))
    assert entries["/etc/edgellm/trusted.d/"][0] == "drwxr-xr-x"
    assert entries["/usr/bin/edgellm"] == ("lrwxrwxrwx", "root/root", "../../opt/edgellm/venv/bin/edgellm")
    assert entries["/usr/bin/edgellmd"][2] == "../../opt/edgellm/venv/bin/edgellmd"
    assert all(owner == "root/root" for _, owner, _ in entries.values())
    assert not any("torch" in p for p in entries), "the package must not bundle torch"

    control = run(["dpkg-deb", "--field", deb]).stdout
    assert f"Version: {DEB_VERSION}\n" in control and "Package: edgellm\n" in control
    assert re.search(r"^Depends: python3 \(>= 3\.11\), python3-venv$", control, re.M)
    info = run(["dpkg-deb", "--info", deb]).stdout
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in info
    conffiles = run(["sh", "-c", f"dpkg-deb --ctrl-tarfile {deb} | tar -xO ./conffiles"]).stdout
    assert conffiles.split() == ["/etc/edgellm/edgellm.toml"]


def test_wheel_carries_the_generated_protobuf_code(deb, tmp_path):
    run(["dpkg-deb", "-x", deb, tmp_path])
    (wheel,) = (tmp_path / "opt/edgellm/wheels").glob("edgellm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("edgellm/cli.py", "edgellm/doctor.py", "edgellm/v1/generator_pb2.py", "edgellm/v1/admin_pb2.py"):
        assert module in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)


# ---- installed into an empty root -----------------------------------------------------------------
def test_install_into_fresh_root(installed):
    root = installed
    assert (root / "usr/lib/systemd/system/edgellm.service").read_text() == (PACKAGING / "edgellm.service").read_text()
    assert (root / "etc/edgellm/edgellm.toml").read_text() == (PACKAGING / "edgellm.toml").read_text()
    # postinst: the user and groups (systemd-sysusers --root), the directories (systemd-tmpfiles
    # --root), the unit enabled (deb-systemd-helper under DPKG_ROOT).
    passwd = (root / "etc/passwd").read_text()
    uid = int(re.search(r"^edgellm:x:(\d+):", passwd, re.M).group(1))
    group = (root / "etc/group").read_text()
    assert re.search(r"^edgellm-clients:x:\d+:edgellm$", group, re.M)
    assert re.search(r"^video:x:\d+:.*\bedgellm\b", group, re.M)
    for d in ("var/lib/edgellm", "var/lib/edgellm/engines", "var/cache/edgellm"):
        st = (root / d).stat()
        assert oct(st.st_mode & 0o777) == "0o750"
        if os.getuid() == 0:
            assert st.st_uid == uid
    assert (root / "etc/systemd/system/multi-user.target.wants/edgellm.service").is_symlink()
    # the venv: a fresh directory per install behind the `venv` link, edgellm from the wheel.
    venv = root / "opt/edgellm/venv"
    assert venv.is_symlink() and os.readlink(venv).startswith(f"venvs/{DEB_VERSION}.")
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()

    version = run([root / "usr/bin/edgellm", "--version"]).stdout.strip()
    assert version == f"edgellm {__version__}"
    where = run([venv / "bin/python", "-c", "import edgellm; print(edgellm.__file__)"]).stdout.strip()
    assert Path(where).resolve().is_relative_to(root / "opt/edgellm/venvs"), where
    assert (root / "usr/bin/edgellmd").resolve() == (venv / "bin/edgellmd").resolve()
    assert os.access(root / "usr/bin/edgellmd", os.X_OK)


def test_installed_doctor_runs(installed):
    proc = subprocess.run([installed / "usr/bin/edgellm", "doctor", "--config", installed / "etc/edgellm/edgellm.toml",
                           "--store", installed / "var/lib/edgellm/engines",
                           "--trust-dir", installed / "etc/edgellm/trusted.d"], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert any(re.match(r"ok\s+config\s", line) for line in lines), proc.stdout
    # A fresh install: no engine and no trusted key yet, and doctor says what to do about it.
    assert any(re.match(r"FAIL\s+engine-store\s.*no current engine.* -> .*edgellm push", line) for line in lines)
    assert any(re.match(r"FAIL\s+trust\s.*no usable \*\.pub key", line) for line in lines)
    assert proc.returncode == 1


def test_unit_passes_systemd_analyze_verify(installed, tmp_path):
    """verify needs ExecStart= to exist: point it at the installed edgellmd. verify exits 0 even
    for unknown keys or bad values (it only prints them), so any output about the unit fails."""
    unit = (installed / "usr/lib/systemd/system/edgellm.service").read_text()
    assert "ExecStart=/usr/bin/edgellmd " in unit
    checked = tmp_path / "edgellm.service"
    checked.write_text(unit.replace("ExecStart=/usr/bin/edgellmd ", f"ExecStart={installed}/usr/bin/edgellmd "))
    proc = subprocess.run(["systemd-analyze", "verify", checked], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "edgellm.service" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    # The same check catches a mistake (so an empty output above means something).
    broken = tmp_path / "broken" / "edgellm.service"
    broken.parent.mkdir()
    broken.write_text(checked.read_text().replace("ProtectHome=yes", "ProtectHome=yess\nWatchdogSecs=30"))
    proc = subprocess.run(["systemd-analyze", "verify", broken], capture_output=True, text=True, timeout=60)
    assert "protect home" in proc.stderr and "WatchdogSecs" in proc.stderr


def test_unit_config_and_users_agree():
    unit = unit_settings(PACKAGING / "edgellm.service")
    config = ServeConfig(**read_config_file(PACKAGING / "edgellm.toml"))
    config.check()
    one = {k: v[-1] for k, v in unit.items()}
    assert (one["Type"], one["NotifyAccess"], one["Restart"]) == ("notify", "main", "on-failure")
    assert one["User"] == "edgellm" and one["StartLimitBurst"] and seconds(one["WatchdogSec"]) > 0
    # SIGTERM drains for grace_period; systemd must not SIGKILL before that.
    assert seconds(one["TimeoutStopSec"]) > config.grace_period
    # The sockets live in RuntimeDirectory=, the store in StateDirectory=.
    for address in (config.listen, config.admin_listen):
        assert unix_socket_path(address).parent == Path("/run") / one["RuntimeDirectory"]
    assert config.store.is_relative_to(Path("/var/lib") / one["StateDirectory"])
    assert one["ConfigurationDirectory"] == "edgellm"
    # The kiosk group exists (sysusers) and the daemon is in it, so it can chgrp the socket.
    sysusers = (PACKAGING / "sysusers.d/edgellm.conf").read_text()
    assert re.search(rf"^g\s+{config.socket_group}\s", sysusers, re.M)
    assert re.search(rf"^m\s+edgellm\s+{config.socket_group}$", sysusers, re.M)
    # Options that would hide or block the GPU device nodes.
    for forbidden in ("PrivateDevices", "DevicePolicy", "ProtectClock", "MemoryDenyWriteExecute", "ProcSubset"):
        assert forbidden not in unit, forbidden
    tmpfiles = (PACKAGING / "tmpfiles.d/edgellm.conf").read_text()
    assert re.search(r"^d\s+/var/lib/edgellm\s+0750 edgellm edgellm", tmpfiles, re.M)
    assert one["StateDirectoryMode"] == "0750"
    # [updates] as the engine-update part reads it; its trust store is the one tmpfiles creates.
    from edgellm.ota.daemon import UpdateSettings

    updates = UpdateSettings.from_table(config.updates)
    updates.check()
    assert re.search(rf"^d\s+{updates.trust_dir}\s", tmpfiles, re.M)


def test_upgrade_remove_and_purge(installed, deb):
    """Last on the shared root: it removes the package from it."""
    root = installed
    venvs = root / "opt/edgellm/venvs"
    first = os.readlink(root / "opt/edgellm/venv")
    dpkg(root, "-i", deb)  # an upgrade (same version here): a new venv, the previous one kept
    second = os.readlink(root / "opt/edgellm/venv")
    assert second != first and {p.name for p in venvs.iterdir()} == {Path(first).name, Path(second).name}
    dpkg(root, "-i", deb)
    assert {p.name for p in venvs.iterdir()} == {Path(second).name, Path(os.readlink(root / "opt/edgellm/venv")).name}

    (root / "var/lib/edgellm/engines/current").write_text("7\n")
    (root / "etc/edgellm/trusted.d/fleet.pub").write_text("key\n")
    dpkg(root, "-r", "edgellm")
    assert not (root / "opt/edgellm/venv").exists() and not venvs.exists()
    assert not (root / "usr/bin/edgellm").is_symlink()
    assert (root / "etc/edgellm/edgellm.toml").exists(), "remove keeps the config"
    out = dpkg(root, "-P", "edgellm").stdout
    assert not (root / "etc/edgellm/edgellm.toml").exists()
    assert (root / "var/lib/edgellm/engines/current").exists(), "purge keeps the engine store unless asked"
    assert (root / "etc/edgellm/trusted.d/fleet.pub").exists()
    assert "kept the engine store" in out

    dpkg(root, "-i", deb)
    dpkg(root, "-P", "edgellm", EDGELLM_PURGE_ENGINES="yes")
    assert not (root / "var/lib/edgellm").exists() and not (root / "etc/edgellm").exists()


# ---- installed into a real chroot -----------------------------------------------------------------
CHROOT_SCRIPT = r"""
set -eu
base=$1 deb=$2 deps=$3 pyver=$4
mount -t tmpfs tmpfs "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
root=$base/root
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t tmpfs tmpfs "$root/run"      # no /run/systemd/system: an image build, nothing starts
mount -t tmpfs tmpfs "$root/opt"      # whatever this host has in /opt is not ours
dpkg --root="$root" --log=/dev/null --force-depends -i "$deb"
if [ "$(chroot "$root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$pyver" ]; then
    # Same Python as the tests: lend it their dependencies, as in the unprivileged install.
    echo "$deps" > "$(echo "$root"/opt/edgellm/venv/lib/python3*/site-packages)/zz-system-deps-for-test.pth"
fi
echo "VERSION: $(chroot "$root" /usr/bin/edgellm --version)"
echo "USER: $(chroot "$root" id edgellm)"
echo "ENABLED: $(readlink "$root/etc/systemd/system/multi-user.target.wants/edgellm.service")"
chroot "$root" systemd-analyze verify /usr/lib/systemd/system/edgellm.service > "$base/verify.out" 2>&1 || echo "VERIFY FAILED"
echo "VERIFY OUTPUT: [$(cat "$base/verify.out")]"
echo "STORE: $(chroot "$root" stat -c "%U:%G %a" /var/lib/edgellm/engines)"
"""


def test_install_in_a_real_chroot(deb, tmp_path):
    if os.getuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount an overlay chroot")
    base = tmp_path / "chroot"
    base.mkdir()
    pyver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", CHROOT_SCRIPT, "sh",
                           base, deb, SYSTEM_DEPS, pyver], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "mount" in proc.stderr and "dpkg" not in proc.stdout:
        pytest.skip(f"cannot mount an overlay chroot here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"VERSION: edgellm {__version__}" in out, out + proc.stderr
    assert re.search(r"USER: uid=\d+\(edgellm\) gid=\d+\(edgellm\) groups=.*video.*edgellm-clients|"
                     r"USER: uid=\d+\(edgellm\) gid=\d+\(edgellm\) groups=.*edgellm-clients.*video", out), out
    assert "ENABLED: " in out and "edgellm.service" in out.split("ENABLED: ")[1].splitlines()[0]
    assert "VERIFY FAILED" not in out and "VERIFY OUTPUT: []" in out, out
    assert "STORE: edgellm:edgellm 750" in out
    assert "not started" in out, "postinst must not start the service on an image-build host"

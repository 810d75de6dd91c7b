#!/usr/bin/env bash
# Builds the edgellm Debian package from this repository: dist/edgellm_VERSION-REV_ARCH.deb
#
#   packaging/build-deb.sh                  full wheelhouse: edgellm + every dependency but torch
#   packaging/build-deb.sh --project-only   only the edgellm wheel (offline; CI and dev hosts)
#
# The package carries wheels, not an installed venv: postinst creates
# /opt/edgellm/venvs/<version>.XXXXXX with the device's own python3 (--system-site-packages, so
# torch from JetPack or the system is used) and installs from /opt/edgellm/wheels with
# --no-index, so installing never touches the network. Why: docs/operations.md, "Packaging".
#
# The full wheelhouse contains compiled wheels (grpcio, cryptography, psutil, systemd-python...)
# for the build machine's architecture and Python minor version: build on the target's
# distribution and architecture (on a Jetson, or in an arm64 container of its Ubuntu release).
# It downloads from the package index unless --find-links points at a local wheel directory.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: packaging/build-deb.sh [--project-only] [--python PY] [--find-links DIR] [--constraint FILE]
                              [--revision N] [-o OUTDIR]
  --project-only     wheelhouse holds only the edgellm wheel; dependencies must then come from
                     the device's system Python (used by CI: needs no network)
  --python PY        interpreter that builds the wheels (default: .venv/bin/python, else python3);
                     for a full wheelhouse its minor version must match the device's python3
  --find-links DIR   take dependency wheels from DIR only (offline full build)
  --constraint FILE  pip constraints for the dependencies, e.g. cuda-python<13 for CUDA 12 drivers
  --revision N       Debian revision (default 1)
  -o OUTDIR          where the .deb goes (default dist/)
EOF
}

repo=$(cd "$(dirname "$0")/.." && pwd)
mode=full
python=""
find_links=""
constraint=""
revision=1
outdir="$repo/dist"
while (($#)); do
    case $1 in
        --project-only) mode=project ;;
        --python) python=$2; shift ;;
        --find-links) find_links=$(realpath "$2"); shift ;;
        --constraint) constraint=$(realpath "$2"); shift ;;
        --revision) revision=$2; shift ;;
        -o) outdir=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build-deb: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
for tool in dpkg-deb "$python"; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool not found (run scripts/setup-env.sh)" >&2; exit 1; }
done

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/runtime/edgellm/__init__.py")
[[ -n $version ]] || { echo "build-deb: no __version__ in runtime/edgellm/__init__.py" >&2; exit 1; }
deb_version="$version-$revision"
py_minor=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $mode == full ]]; then arch=$(dpkg --print-architecture); else arch=all; fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip=("$python" -m pip --disable-pip-version-check)

# Build from a copy: building in the repository leaves build/ and *.egg-info behind, and two
# builds at once (CI, helpers) would trample each other.
mkdir -p "$work/src"
cp -r "$repo/runtime" "$repo/setup.cfg" "$repo/pyproject.toml" "$work/src/"
[[ -f $repo/README.md ]] && cp "$repo/README.md" "$work/src/" || touch "$work/src/README.md"
find "$work/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

# The protobuf modules (edgellm/v1/*_pb2.py) are generated, not committed: generate them into
# the copy the same way scripts/gen-proto.sh does, so the package never ships stale ones.
shopt -s nullglob
protos=("$repo"/proto/edgellm/v1/*.proto)
if ((${#protos[@]})); then
    if "$python" -c 'import grpc_tools' 2>/dev/null; then
        rm -f "$work/src/runtime/edgellm/v1/"*_pb2.py "$work/src/runtime/edgellm/v1/"*_pb2.pyi
        "$python" -m grpc_tools.protoc -I "$repo/proto" --python_out="$work/src/runtime" \
            --pyi_out="$work/src/runtime" "${protos[@]}"
    elif [[ ! -f $work/src/runtime/edgellm/v1/generator_pb2.py ]]; then
        echo "build-deb: grpcio-tools is missing and runtime/edgellm/v1 has no generated code;" \
             "install the test extra (scripts/setup-env.sh) or run scripts/gen-proto.sh" >&2
        exit 1
    fi
fi
shopt -u nullglob

echo "build-deb: building the edgellm $version wheel"
"${pip[@]}" wheel -q --no-deps --no-build-isolation --no-index -w "$work/wheels" "$work/src"
wheel=$(ls "$work/wheels"/edgellm-*.whl)

# The dependencies, as ranges, straight from the wheel's metadata (setup.cfg is the one source).
# torch is left out on purpose: a multi-GB wheel that JetPack or the system provides.
"$python" - "$wheel" >"$work/requires.txt" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = line.removeprefix("Requires-Dist: ")
    name = req.split(";")[0].strip().split()[0]
    for sep in "<>=!~[(":
        name = name.split(sep)[0]
    if "extra ==" in req or name.lower() == "torch":
        continue
    print(req)
EOF

if [[ $mode == full ]]; then
    echo "build-deb: building the dependency wheelhouse (without torch)"
    extra=()
    [[ -n $find_links ]] && extra+=(--no-index --find-links "$find_links")
    [[ -n $constraint ]] && extra+=(-c "$constraint")
    "${pip[@]}" wheel -q -w "$work/wheels" -r "$work/requires.txt" "${extra[@]}"
    # postinst installs exactly these versions (the ones tested together), except numpy: torch
    # from JetPack is compiled against the system's numpy, so a system numpy that satisfies the
    # range must win over the bundled one (pip keeps an installed distribution that satisfies).
    for whl in "$work/wheels"/*.whl; do
        IFS=- read -r name ver _ <<<"$(basename "$whl")"
        case $name in
            edgellm) ;;
            numpy) grep -i '^numpy' "$work/requires.txt" ;;
            *) echo "$name==$ver" ;;
        esac
    done >"$work/requirements.txt"
else
    cp "$work/requires.txt" "$work/requirements.txt"
fi

# ---- the package tree -----------------------------------------------------------------------
root=$work/root
install -d -m 0755 "$root/DEBIAN" "$root/opt/edgellm/wheels" "$root/usr/bin" \
    "$root/usr/lib/systemd/system" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" \
    "$root/etc/edgellm/trusted.d" "$root/usr/share/doc/edgellm"
install -m 0644 "$work/wheels"/*.whl "$root/opt/edgellm/wheels/"
install -m 0644 "$work/requirements.txt" "$root/opt/edgellm/requirements.txt"
cat >"$root/opt/edgellm/build-info" <<EOF
# Read by the maintainer scripts and by \`edgellm doctor\`. Generated by packaging/build-deb.sh.
EDGELLM_VERSION=$version
DEB_VERSION=$deb_version
WHEELHOUSE=$mode
PYTHON_MINOR=$py_minor
EOF
chmod 0644 "$root/opt/edgellm/build-info"
# Relative links so the same tree works under dpkg --root and in a chroot.
ln -s ../../opt/edgellm/venv/bin/edgellm "$root/usr/bin/edgellm"
ln -s ../../opt/edgellm/venv/bin/edgellmd "$root/usr/bin/edgellmd"
install -m 0644 "$repo/packaging/edgellm.service" "$root/usr/lib/systemd/system/edgellm.service"
install -m 0644 "$repo/packaging/sysusers.d/edgellm.conf" "$root/usr/lib/sysusers.d/edgellm.conf"
install -m 0644 "$repo/packaging/tmpfiles.d/edgellm.conf" "$root/usr/lib/tmpfiles.d/edgellm.conf"
install -m 0644 "$repo/packaging/edgellm.toml" "$root/etc/edgellm/edgellm.toml"
for doc in docs/operations.md README.md; do
    [[ -f $repo/$doc ]] && install -m 0644 "$repo/$doc" "$root/usr/share/doc/edgellm/"
done
cat >"$root/usr/share/doc/edgellm/copyright" <<'EOF'
edgellm: LLM runtime for NVIDIA edge appliances.
License: Apache-2.0 (see /usr/share/common-licenses/Apache-2.0)
EOF
chmod 0644 "$root/usr/share/doc/edgellm/copyright"

for script in postinst prerm postrm; do
    install -m 0755 "$repo/packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/edgellm/edgellm.toml >"$root/DEBIAN/conffiles"

if [[ $mode == full ]]; then
    # Compiled wheels are built for this Python minor version; any other python3 cannot use them.
    next_minor="${py_minor%.*}.$((${py_minor#*.} + 1))"
    python_dep="python3 (>= $py_minor), python3 (<< $next_minor)"
else
    python_dep="python3 (>= 3.11)"
fi
installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: edgellm
Version: $deb_version
Architecture: $arch
Maintainer: edgellm maintainers <edgellm@localhost>
Section: misc
Priority: optional
Installed-Size: $installed_kb
Depends: $python_dep, python3-venv
Recommends: systemd
Description: LLM runtime for NVIDIA edge appliances (daemon and CLI)
 edgellm serves INT4 language-model engines to local kiosk apps over gRPC on a
 unix socket, under systemd, and takes signed engine updates from a fleet
 manager. Installs into /opt/edgellm (a Python venv created at install time
 from the bundled wheels, offline); torch is taken from the system or JetPack
 Python installation. Wheelhouse: $mode.
EOF

mkdir -p "$outdir"
deb="$outdir/edgellm_${deb_version}_${arch}.deb"
# xz rather than dpkg's default: older dpkg (Debian 11/12) cannot read Ubuntu's zstd default.
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "build-deb: wrote $deb ($(du -h "$deb" | cut -f1), wheelhouse: $mode)"

#!/usr/bin/env bash
# Installs everything edgellm needs on a fresh Debian/Ubuntu machine into ./.venv.
# Idempotent and quick when nothing changed: the README's commands call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(libsystemd-dev pkg-config python3-venv systemd dpkg-dev fakeroot)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($python --version)"
    $python -m venv .venv
fi

stamp=.venv/.edgellm-installed
if [[ ! -f $stamp || setup.cfg -nt $stamp ]]; then
    # torch first and pinned: on our build and CI machines pip takes the CPU build of 2.13.0 from
    # the local wheel store; an unpinned torch would pull a multi-GB CUDA build. On a device, torch
    # comes from JetPack / the system (see docs/operations.md).
    .venv/bin/python -c 'import torch' 2>/dev/null || {
        echo "setup: installing torch==2.13.0"
        .venv/bin/pip install -q torch==2.13.0
    }
    echo "setup: installing edgellm and its dependencies"
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi

# The gRPC message code is generated from proto/, never edited by hand or committed.
if [[ -n $(find proto -name '*.proto' -newer runtime/edgellm/v1/__init__.py 2>/dev/null) ]] \
        || ! ls runtime/edgellm/v1/*_pb2.py >/dev/null 2>&1; then
    bash scripts/gen-proto.sh
fi

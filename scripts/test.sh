#!/usr/bin/env bash
# The whole test suite (GPU tests are skipped on machines without CUDA).
# Sets up everything first on a fresh Debian/Ubuntu machine (scripts/setup-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# pytest exits 5 when it collected no tests: that is a failure here too, as any non-zero code.
exec .venv/bin/python -m pytest -q -ra "$@"

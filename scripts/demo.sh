#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the tiny demo engine offline, and stream a
# generation from it. The demo engine has random weights: its text is meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
engine=demo/engine
if [[ ! -f $engine/manifest.json ]]; then
    .venv/bin/edgellm demo-engine -o "$engine"
fi
.venv/bin/edgellm run "$engine" --prompt "Welcome to the station kiosk. The next train" --max-new-tokens 48 \
    --temperature 0.8 --seed 7

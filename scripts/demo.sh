#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the tiny demo engine offline, start the
# daemon on it (unix sockets in a temporary directory), and stream a generation from it
# with the gRPC client. The demo engine has random weights: its text is meaningless.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
edgellm=.venv/bin/edgellm

engine=demo/engine
if [[ ! -f $engine/manifest.json ]]; then
    "$edgellm" demo-engine -o "$engine"
fi

run=$(mktemp -d)
"$edgellm" serve --engine "$engine" --device cpu --listen "unix://$run/edgellm.sock" \
    --admin-listen "unix://$run/admin.sock" --metrics-listen 127.0.0.1:0 >"$run/daemon.log" 2>&1 &
daemon=$!
stop() {
    kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    rm -rf "$run"
}
trap stop EXIT

echo "demo: waiting for the daemon to load and warm up the engine (log: $run/daemon.log)" >&2
for _ in $(seq 120); do
    "$edgellm" info --json --target "unix://$run/admin.sock" 2>/dev/null | grep -q '"state": "SERVING_STATE_SERVING"' && break
    kill -0 "$daemon" 2>/dev/null || { cat "$run/daemon.log" >&2; exit 1; }
    sleep 0.5
done
"$edgellm" info --target "unix://$run/admin.sock"
echo "demo: streaming from the daemon (random weights: the text is meaningless)" >&2
"$edgellm" generate --target "unix://$run/edgellm.sock" --max-tokens 48 --temperature 0.8 --seed 7 \
    "Welcome to the station kiosk. The next train"

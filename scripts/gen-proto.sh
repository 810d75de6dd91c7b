#!/usr/bin/env bash
# Generates the Python gRPC code for proto/edgellm/v1/*.proto into runtime/edgellm/v1/
# (imported as edgellm.v1.<name>_pb2). The generated files are not committed:
# run this after a checkout or after editing a .proto. Needs grpcio-tools (the `test` extra).
# Only message code is generated (no *_pb2_grpc.py): grpcio-tools stamps those with its own
# version and they refuse to import under an older grpcio (the GPU boxes have one), so
# services are wired from the descriptors by edgellm.serving.rpc instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=runtime
shopt -s nullglob
protos=(proto/edgellm/v1/*.proto)
((${#protos[@]})) || { echo "gen-proto: no .proto files under proto/edgellm/v1" >&2; exit 1; }
# Old outputs of a .proto that was removed or renamed must not linger.
rm -f runtime/edgellm/v1/*_pb2.py runtime/edgellm/v1/*_pb2.pyi runtime/edgellm/v1/*_pb2_grpc.py
"$python" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" "${protos[@]}"
# setup-env.sh regenerates when a .proto is newer than this file: mark the code up to date.
touch runtime/edgellm/v1/__init__.py
echo "gen-proto: generated $(ls runtime/edgellm/v1/*_pb2.py | wc -l) modules in runtime/edgellm/v1/ from ${#protos[@]} .proto files"

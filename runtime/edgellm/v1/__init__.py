"""Generated protobuf code for proto/edgellm/v1/ (edgellm.v1.*_pb2; services: edgellm.serving.rpc).

The modules are produced by scripts/gen-proto.sh and are not committed; never edit them.
"""

"""Generated gRPC code for proto/edgellm/v1/ (edgellm.v1.*_pb2, *_pb2_grpc).

The modules are produced by scripts/gen-proto.sh and are not committed; never edit them.
"""

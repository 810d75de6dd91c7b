"""gRPC services wired from the protobuf descriptors, for servers and clients alike.

grpcio-tools' *_pb2_grpc.py modules refuse to import under a grpcio older than the tools
that generated them, and the device's grpcio is whatever its image ships. The service
descriptors in *_pb2.py hold everything those modules would, so this one module turns
them into server handlers and client stubs with grpc's long-stable generic API.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import message_factory

from edgellm.errors import ConfigError


def proto_module(name: str) -> ModuleType:
    """edgellm.v1.<name>_pb2, with a message that says how to produce it when it is missing."""
    module_name = f"edgellm.v1.{name}_pb2"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ConfigError(
            f"{module_name} is missing: the gRPC code is generated from proto/, not committed; "
            "run scripts/gen-proto.sh (scripts/setup-env.sh does it)"
        ) from None


def service_descriptor(proto: str, service: str):
    return proto_module(proto).DESCRIPTOR.services_by_name[service]


def _handler_factory(method) -> Any:
    return {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]


def add_service(server: grpc.Server, service, servicer: object) -> str:
    """Serve every method of `service` (a ServiceDescriptor) from servicer.<MethodName>.

    Returns the service's full name (for reflection).
    """
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = _handler_factory(method)(
            getattr(servicer, method.name),
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    return service.full_name


class Stub:
    """Client side: stub.<MethodName>(request, timeout=...) as with generated stubs."""

    def __init__(self, channel: grpc.Channel, service):
        for method in service.methods:
            make = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(method.client_streaming, method.server_streaming)]
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            setattr(self, method.name, make(
                f"/{service.full_name}/{method.name}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            ))

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


def open_channel(target: str, tls_ca=None, tls_cert=None, tls_key=None, server_name: str | None = None,
                 require_mutual_tls: bool = False) -> grpc.Channel:
    """The one way clients connect: unix:///path in the clear (file permissions guard it);
    host:port with TLS when tls_ca is given, mutual TLS with tls_cert and tls_key too.
    require_mutual_tls: a TCP target without a client certificate is refused (admin endpoint)."""
    from pathlib import Path

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if target.startswith("unix:"):
        return grpc.insecure_channel(target, options=options)
    if require_mutual_tls and not (tls_ca and tls_cert and tls_key):
        raise ConfigError(f"{target} is TCP: the admin endpoint needs mutual TLS, pass --tls-ca, --tls-cert and --tls-key")
    if tls_ca is None:
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes(),
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )
    return grpc.secure_channel(target, creds, options=options)


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

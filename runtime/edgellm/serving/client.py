"""A small client for kiosk apps (and `edgellm generate` / `edgellm info`).

    from edgellm.serving.client import Client

    with Client("unix:///run/edgellm/edgellm.sock") as client:
        for delta in client.stream("Hello", max_tokens=64):
            print(delta.text, end="", flush=True)
        result = client.generate("Hello", max_tokens=64)   # the whole completion at once

Errors raise GenerationError with the gRPC status code name (`code`) and the daemon's
message: RESOURCE_EXHAUSTED and UNAVAILABLE are worth a retry with backoff, INVALID_ARGUMENT
is not. Imports only grpc and protobuf (no torch): cheap to use from an app.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import grpc

from edgellm.errors import EdgeLLMError
from edgellm.serving.rpc import Stub, open_channel, proto_module, service_descriptor

DEFAULT_TARGET = "unix:///run/edgellm/edgellm.sock"
DEFAULT_ADMIN_TARGET = "unix:///run/edgellm/admin.sock"

_FINISH_NAMES = {1: "stop", 2: "length", 3: "cancelled"}


class GenerationError(EdgeLLMError):
    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "GenerationError":
        return cls(error.code().name, error.details() or "")


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "cancelled" on the last one
    usage: dict[str, float] | None = None
    engine_id: str = ""


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, float]
    engine_id: str

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Client:
    def __init__(self, target: str = DEFAULT_TARGET, *, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None, server_name: str | None = None):
        """target: unix:///path or host:port. TLS when tls_ca is given; mutual TLS with
        tls_cert and tls_key too. server_name overrides the name checked in the certificate."""
        self.channel = open_channel(target, tls_ca, tls_cert, tls_key, server_name)
        self.target = target
        self._pb = proto_module("generator")
        self._admin_pb = proto_module("admin")
        self._generator = Stub(self.channel, service_descriptor("generator", "Generator"))
        self._admin = Stub(self.channel, service_descriptor("admin", "Admin"))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def request(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                prompt_token_ids: list[int] | None = None, max_tokens: int = 0, temperature: float = 0.0,
                top_p: float | None = None, top_k: int = 0, repetition_penalty: float | None = None,
                seed: int | None = None, stop: list[str] | tuple[str, ...] = ()):
        """The GenerateRequest message for these arguments (max_tokens 0: the daemon's default)."""
        msg = self._pb.GenerateRequest(
            prompt=prompt or "", prompt_token_ids=prompt_token_ids or [], max_tokens=max_tokens,
            temperature=temperature, top_k=top_k, stop=list(stop),
        )
        for m in messages or []:
            msg.messages.add(role=m["role"], content=m["content"])
        if top_p is not None:
            msg.top_p = top_p
        if repetition_penalty is not None:
            msg.repetition_penalty = repetition_penalty
        if seed is not None:
            msg.seed = seed
        return msg

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[Delta]:
        """Deltas as the daemon sends them. Stop iterating early (or close the generator)
        to cancel: the daemon frees the slot at its next iteration. timeout: deadline in s."""
        call = self._generator.Generate(self.request(prompt, **kwargs), timeout=timeout)
        try:
            for response in call:
                yield self._delta(response)
        except grpc.RpcError as e:
            raise GenerationError.from_rpc(e) from None
        finally:
            call.cancel()  # no-op once the stream ended; frees the daemon's slot if we stopped early

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Completion:
        text, ids, last = [], [], None
        for delta in self.stream(prompt, timeout=timeout, **kwargs):
            text.append(delta.text)
            ids.extend(delta.token_ids)
            last = delta
        if last is None or last.finish_reason is None:
            raise GenerationError("UNKNOWN", "the stream ended without a finish reason")
        return Completion("".join(text), ids, last.finish_reason, last.usage or {}, last.engine_id)

    def _delta(self, r) -> Delta:
        if not r.finish_reason:
            return Delta(r.text, list(r.token_ids))
        usage = {
            "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
            "queue_time_ms": r.usage.queue_time_ms, "time_to_first_token_ms": r.usage.time_to_first_token_ms,
            "total_time_ms": r.usage.total_time_ms,
        }
        return Delta(r.text, list(r.token_ids), _FINISH_NAMES.get(r.finish_reason, "unknown"), usage, r.engine_id)

    # ---- admin endpoint ---------------------------------------------------------------
    def _admin_call(self, method: str, request, timeout: float | None):
        try:
            return getattr(self._admin, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise GenerationError.from_rpc(e) from None

    def info(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Admin.GetInfo as a dict (field names as in the .proto)."""
        return _to_dict(self._admin_call("GetInfo", self._admin_pb.GetInfoRequest(), timeout))

    def list_requests(self, timeout: float | None = 10.0) -> list[dict[str, Any]]:
        return _to_dict(self._admin_call("ListRequests", self._admin_pb.ListRequestsRequest(), timeout)).get("requests", [])

    def drain(self, wait: bool = False, timeout: float | None = None) -> int:
        return self._admin_call("Drain", self._admin_pb.DrainRequest(wait=wait), timeout).in_flight

    def resume(self, timeout: float | None = 10.0) -> None:
        self._admin_call("Resume", self._admin_pb.ResumeRequest(), timeout)

    def cancel(self, request_id: int, timeout: float | None = 10.0) -> bool:
        return self._admin_call("Cancel", self._admin_pb.CancelRequest(id=request_id), timeout).found


def _to_dict(message) -> dict[str, Any]:
    """Every field, defaults included, enums by name, 64-bit integers as ints (protobuf's JSON
    mapping would make them strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and not _is_repeated(field) and not message.HasField(field.name):
            out[field.name] = None
            continue
        items = list(value) if _is_repeated(field) else [value]
        if field.message_type is not None:
            items = [_to_dict(v) for v in items]
        elif field.enum_type is not None:
            items = [field.enum_type.values_by_number[v].name if v in field.enum_type.values_by_number else v for v in items]
        out[field.name] = items if _is_repeated(field) else items[0]
    return out


def _is_repeated(field) -> bool:
    # FieldDescriptor.label is deprecated in newer protobuf; is_repeated is missing in older.
    repeated = getattr(field, "is_repeated", None)
    return repeated if isinstance(repeated, bool) else field.label == field.LABEL_REPEATED

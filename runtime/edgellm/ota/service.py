"""The Updates gRPC service (proto/edgellm/v1/updates.proto): network in, Updater calls out.

Add it to the admin endpoint only. It parses messages and maps refusals to gRPC statuses;
every decision is the Updater's.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import grpc

from edgellm.ota.errors import (
    Busy,
    MalformedBundle,
    NoPrevious,
    NoSpace,
    Oversized,
    UnknownVersion,
    UpdateRejected,
    UploadTruncated,
)
from edgellm.ota.store import VersionInfo
from edgellm.ota.updater import Updater
from edgellm.serving import rpc

REASON_KEY = "edgellm-update-reason"
SERVICE = "Updates"
_pb = None


def pb():
    global _pb
    if _pb is None:
        _pb = rpc.proto_module("updates")
    return _pb


def add_to_server(server: grpc.Server, updater: Updater) -> str:
    """Serve Updates on `server` (the admin one); returns the service's full name."""
    return rpc.add_service(server, rpc.service_descriptor("updates", SERVICE), UpdatesServicer(updater))


def status_code(error: UpdateRejected) -> grpc.StatusCode:
    if isinstance(error, Busy):
        return grpc.StatusCode.ABORTED
    if isinstance(error, UnknownVersion):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, (Oversized, NoSpace)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, NoPrevious):
        return grpc.StatusCode.FAILED_PRECONDITION
    # Every other refusal is about the bundle or its fit to this device.
    return grpc.StatusCode.FAILED_PRECONDITION


def version_message(info: VersionInfo):
    state = pb().EngineVersion.State
    return pb().EngineVersion(
        version=info.version,
        engine_id=info.engine_id,
        state={"current": state.STATE_CURRENT, "previous": state.STATE_PREVIOUS}.get(info.state, state.STATE_INSTALLED),
        key_id=info.key_id or "",
        signed_at=info.signed_at,
        expires=info.expires or "",
        size_bytes=info.size_bytes,
        installed_at=info.installed_at,
    )


class UpdatesServicer:
    def __init__(self, updater: Updater):
        self.updater = updater

    def _refuse(self, context: grpc.ServicerContext, error: UpdateRejected):
        context.set_trailing_metadata(((REASON_KEY, error.reason),))
        context.abort(status_code(error), str(error))

    def Push(self, request_iterator: Iterator, context: grpc.ServicerContext):
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise MalformedBundle("a push starts with a header message (size and sha256), then the chunks")
            header = first.header
            result = self.updater.push(
                header.size, header.sha256, _chunks(request_iterator), activate=not header.stage_only, peer=context.peer()
            )
            info = self.updater.store.describe(result.version)
        except UpdateRejected as e:
            self._refuse(context, e)
        return pb().PushResponse(engine=version_message(info), activated=result.activated, swap_mode=result.swap_mode)

    def List(self, request, context: grpc.ServicerContext):
        return pb().ListEnginesResponse(engines=[version_message(v) for v in self.updater.list_versions()])

    def Activate(self, request, context: grpc.ServicerContext):
        try:
            info, swap_mode = self.updater.activate(request.version)
        except UpdateRejected as e:
            self._refuse(context, e)
        return pb().ActivateResponse(engine=version_message(info), swap_mode=swap_mode)

    def Rollback(self, request, context: grpc.ServicerContext):
        try:
            from_version = self.updater.store.current_version()
            info = self.updater.rollback()
        except UpdateRejected as e:
            self._refuse(context, e)
        return pb().RollbackResponse(engine=version_message(info), from_version=from_version or 0)


def _chunks(requests: Iterator) -> Iterable[bytes]:
    try:
        for r in requests:
            if r.WhichOneof("part") != "chunk":
                raise MalformedBundle("only the first message of a push may be a header; the rest are chunks")
            yield r.chunk
    except grpc.RpcError:
        # The client went away mid-upload: what arrived is a truncated bundle.
        raise UploadTruncated("the upload stream was cut off before the end; re-send the bundle") from None

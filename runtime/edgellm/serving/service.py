"""The gRPC servicers: edgellm.v1.Generator (kiosk socket) and edgellm.v1.Admin (admin endpoint).

They translate between protobuf messages and the scheduler; every decision about requests
is the scheduler's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import grpc

from edgellm import __version__
from edgellm.engine.sampling import SamplingParams
from edgellm.serving.rpc import proto_module
from edgellm.serving.scheduler import Chunk, EngineSlots, Failure, Prompt, Rejected, Scheduler

if TYPE_CHECKING:
    from edgellm.serving.metrics import Metrics

log = logging.getLogger("edgellm.serving.service")

gen_pb = proto_module("generator")
admin_pb = proto_module("admin")

_FINISH = {"stop": gen_pb.FINISH_REASON_STOP, "length": gen_pb.FINISH_REASON_LENGTH,
           "cancelled": gen_pb.FINISH_REASON_CANCELLED}
_STATE = {"no_engine": admin_pb.SERVING_STATE_NO_ENGINE, "serving": admin_pb.SERVING_STATE_SERVING,
          "draining": admin_pb.SERVING_STATE_DRAINING, "swapping": admin_pb.SERVING_STATE_SWAPPING,
          "stopping": admin_pb.SERVING_STATE_STOPPING}
# A client deadline and our clock differ by the scheduling of one callback; a cancel this close
# to the deadline is the deadline.
_DEADLINE_SLACK = 0.05


def request_from_proto(msg) -> tuple[Prompt, SamplingParams, bool]:
    """(prompt, params, max_tokens left to the daemon's default)."""
    prompt = Prompt(
        text=msg.prompt or None,
        messages=[{"role": m.role, "content": m.content} for m in msg.messages] or None,
        token_ids=list(msg.prompt_token_ids) or None,
    )
    params = SamplingParams(
        max_new_tokens=msg.max_tokens or 1,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
    )
    return prompt, params, msg.max_tokens == 0


def chunk_to_proto(chunk: Chunk):
    response = gen_pb.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
    if chunk.finish_reason is not None:
        response.finish_reason = _FINISH[chunk.finish_reason]
        response.engine_id = chunk.engine_id
        u = chunk.usage
        response.usage.CopyFrom(gen_pb.Usage(
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
            queue_time_ms=u.queue_time * 1e3, time_to_first_token_ms=u.time_to_first_token * 1e3,
            total_time_ms=u.total_time * 1e3,
        ))
    return response


class GeneratorService:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def Generate(self, request, context: grpc.ServicerContext):
        prompt, params, use_default = request_from_proto(request)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            req = self.scheduler.submit(prompt, params, deadline, default_max_tokens=use_default)
        except Rejected as e:
            context.abort(grpc.StatusCode[e.code], e.message)

        def on_rpc_done() -> None:  # client cancelled, deadline passed, or the stream ended
            if req.finished:
                return
            if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK:
                self.scheduler.cancel(req, "DEADLINE_EXCEEDED", "the client's deadline passed")
            else:
                self.scheduler.cancel(req)

        if not context.add_callback(on_rpc_done):
            on_rpc_done()  # the RPC already ended
        while True:
            event = req.events.get()
            if isinstance(event, Failure):
                context.abort(grpc.StatusCode[event.code], event.message)
            yield chunk_to_proto(event)
            if event.finish_reason is not None:
                return


def engine_info(slots: EngineSlots):
    e = slots.engine
    m = e.manifest
    cfg = m.model.get("config", {})
    return admin_pb.EngineInfo(
        engine_id=e.engine_id, engine_version=slots.version, architecture=m.model.get("architecture", ""),
        quantization=m.quantization.get("scheme", ""), group_size=m.quantization.get("group_size") or 0,
        kv_dtype=m.kv_dtype, max_batch=e.max_batch, max_seq_len=e.max_seq_len, target_sms=m.target_sms,
        min_runtime_version=m.min_runtime_version, engine_dir=str(e.engine_dir), load_seconds=e.load_seconds,
        vocab_size=cfg.get("vocab_size", 0), num_layers=cfg.get("num_hidden_layers", 0),
        hidden_size=cfg.get("hidden_size", 0), int4_kernel=e.int4_kernel,
    )


class AdminService:
    def __init__(self, scheduler: Scheduler, metrics: "Metrics", started: float,
                 device_info: Callable[[], object], on_drain: Callable[[bool], None]):
        self.scheduler = scheduler
        self.metrics = metrics
        self.started = started
        self.device_info = device_info
        self.on_drain = on_drain  # the daemon refuses or takes requests (and updates health)

    def GetInfo(self, request, context):
        snap = self.scheduler.snapshot()
        info = admin_pb.Info(
            runtime_version=__version__, uptime_seconds=time.monotonic() - self.started, state=_STATE[snap.state],
            slots_total=snap.slots_total, slots_busy=snap.slots_busy, queue_depth=snap.queue_depth,
            queue_capacity=snap.queue_capacity,
            process_rss_bytes=int(self.metrics.process.read().get("rss_bytes", 0)),
            requests_total=self.scheduler.requests_accepted, tokens_generated=self.scheduler.tokens_generated,
        )
        if snap.current is not None:
            info.engine.CopyFrom(engine_info(snap.current))
        info.retiring_engines.extend(engine_info(g) for g in snap.retiring)
        info.device.CopyFrom(self.device_info())
        return info

    def ListRequests(self, request, context):
        snap = self.scheduler.snapshot()
        now = time.monotonic()
        out = admin_pb.ListRequestsResponse()
        engine_of = {id(r): g.engine.engine_id for g in ([snap.current] if snap.current else []) + snap.retiring
                     for r in g.busy()}
        for r in snap.requests:
            if r.slot < 0 or id(r) not in engine_of:
                state = admin_pb.RequestInfo.STATE_QUEUED
            elif r.prefilled < len(r.prompt_ids):
                state = admin_pb.RequestInfo.STATE_PREFILLING
            else:
                state = admin_pb.RequestInfo.STATE_GENERATING
            out.requests.add(
                id=r.id, state=state, slot=r.slot if id(r) in engine_of else -1, engine_id=engine_of.get(id(r), ""),
                prompt_tokens=len(r.prompt_ids), prefilled_tokens=r.prefilled,
                completion_tokens=len(r.seq.output_ids) if r.seq else 0, max_tokens=r.params.max_new_tokens,
                age_ms=(now - r.arrived) * 1e3,
            )
        return out

    def Drain(self, request, context):
        self.on_drain(True)
        if request.wait:
            self.scheduler.wait_idle(context.time_remaining())
        snap = self.scheduler.snapshot()
        return admin_pb.DrainResponse(in_flight=len(snap.requests))

    def Resume(self, request, context):
        self.on_drain(False)
        return admin_pb.ResumeResponse()

    def Cancel(self, request, context):
        return admin_pb.CancelResponse(found=self.scheduler.end_id(request.id))

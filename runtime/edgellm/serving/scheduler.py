"""The scheduler: fixed slots, a bounded FIFO queue in front, one loop thread driving the engine.

Each iteration of the loop:
  1. drops requests that were cancelled or whose deadline passed (their slots come free),
  2. admits queued requests into free slots, oldest first,
  3. advances every prefilling slot by one bounded chunk of its prompt, so a long prompt
     never holds up the tokens of streams already running,
  4. runs one decode step for every generating slot.
Each request's text deltas go to its own thread-safe queue, read by the gRPC handler thread
that serves that stream. Nothing here knows gRPC: outcomes are gRPC status code names.

Engines are swapped between two iterations (`swap_engine`): the loop reads the engine
reference once per iteration, under the lock, and steps every engine that still has live
slots, so an old engine can finish its streams beside the new one.

Test hook: when `debug_stall_file` is set (the daemon takes it from the environment
variable EDGELLM_DEBUG_STALL_FILE) and that file exists, the loop sleeps at the top of each
iteration until the file is removed, as a hung engine step would. Tests use it to show that
the watchdog pings stop and to hold requests in the queue; it is off unless set.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from typing import Callable, Union

from edgellm.engine.generate import Sequence
from edgellm.engine.runner import Engine, PendingTokens
from edgellm.engine.sampling import SamplingParams, sample_batch
from edgellm.errors import EdgeLLMError, RequestError

log = logging.getLogger("edgellm.serving.scheduler")

FINISH_CANCELLED = "cancelled"  # ended by the daemon, not by the engine (grace period over, Admin.Cancel)
_IDLE_WAIT = 0.25  # seconds the loop sleeps when idle, so it keeps calling on_iteration (watchdog)


class Rejected(EdgeLLMError):
    """A request refused before or instead of running: code is a gRPC status code name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class SwapError(EdgeLLMError):
    """An engine swap did not happen; the engine that was serving still is (unless said otherwise)."""


@dataclasses.dataclass
class Prompt:
    """What a client sent: exactly one of text, chat messages, token ids."""

    text: str | None = None
    messages: list[dict] | None = None
    token_ids: list[int] | None = None

    def encode(self, engine: Engine) -> list[int]:
        given = [name for name in ("text", "messages", "token_ids") if getattr(self, name)]
        if len(given) != 1:
            raise RequestError(
                "send exactly one of prompt, messages, prompt_token_ids"
                + (f" (got {', '.join(given)})" if given else " (all were empty)")
            )
        if self.token_ids:
            return list(self.token_ids)
        if self.messages:
            return engine.tokenizer.encode_chat(self.messages)
        return engine.tokenizer.encode(self.text)


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    time_to_first_token: float
    total_time: float


@dataclasses.dataclass
class Chunk:
    """Part of a stream; the last one has finish_reason and usage set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    engine_id: str = ""


@dataclasses.dataclass
class Failure:
    """The stream ends with this gRPC status instead of a last chunk."""

    code: str
    message: str


Event = Union[Chunk, Failure]


class Metrics:
    """What the scheduler reports; serving.metrics implements it for Prometheus."""

    def request_finished(self, code: str) -> None: ...
    def request_admitted(self, queue_time: float, prompt_tokens: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens_generated(self, n: int) -> None: ...


class Request:
    _ids = itertools.count(1)

    def __init__(self, prompt: Prompt, params: SamplingParams, prompt_ids: list[int], validated_with: Engine,
                 deadline: float | None, metrics: Metrics):
        self.id = next(Request._ids)
        self.prompt = prompt
        self.params = params
        self.prompt_ids = prompt_ids
        self.validated_with = validated_with
        self.deadline = deadline  # time.monotonic() value, or None
        self.arrived = time.monotonic()
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.seq: Sequence | None = None
        self.slot = -1
        self.prefilled = 0
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.code: str | None = None  # set once, when the request ends
        self._metrics = metrics
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self.code is not None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def finish(self, event: Event, code: str) -> bool:
        """End the request once: deliver its last event and count its outcome."""
        with self._lock:
            if self.code is not None:
                return False
            self.code = code
        self.events.put(event)
        self._metrics.request_finished(code)
        return True

    def usage(self, now: float) -> Usage:
        return Usage(
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.seq.output_ids) if self.seq else 0,
            queue_time=(self.admitted_at or now) - self.arrived,
            time_to_first_token=(self.first_token_at or now) - self.arrived,
            total_time=now - self.arrived,
        )


class EngineSlots:
    """One engine and the requests in its slots (None = free)."""

    def __init__(self, engine: Engine, version: int):
        self.engine = engine
        self.version = version
        self.slots: list[Request | None] = [None] * engine.max_batch
        self.freed = False
        self.pending: PendingTokens | None = None  # the decode step in flight, its tokens not yet read

    def busy(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def free_slots(self) -> int:
        return self.slots.count(None)


@dataclasses.dataclass
class Snapshot:
    state: str  # no_engine, serving, draining, swapping, stopping
    current: EngineSlots | None
    retiring: list[EngineSlots]
    slots_total: int
    slots_busy: int
    queue_depth: int
    queue_capacity: int
    requests: list[Request]  # running first (by engine, slot), then queued in order
    stalled: bool


class Scheduler:
    def __init__(
        self,
        queue_depth: int = 16,
        prefill_chunk: int = 128,
        default_max_tokens: int = 256,
        metrics: Metrics | None = None,
        on_iteration: Callable[[], None] | None = None,
        debug_stall_file: str | None = None,
    ):
        self.queue_depth = queue_depth
        self.prefill_chunk = prefill_chunk
        self.default_max_tokens = default_max_tokens
        self.metrics = metrics or Metrics()
        self.on_iteration = on_iteration or (lambda: None)
        self.on_change: list[Callable[[], None]] = []  # called after an engine or admission change
        self.debug_stall_file = debug_stall_file
        self.stalled = False
        self.iterations = 0
        self.requests_accepted = 0
        self.tokens_generated = 0

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._swap_lock = threading.Lock()  # one swap at a time
        self._current: EngineSlots | None = None
        self._retiring: list[EngineSlots] = []
        self._queue: collections.deque[Request] = collections.deque()
        self._holding = False  # a drain swap holds admission: queued requests wait
        self._validator: Engine | None = None  # limits and tokenizer to check requests with while holding
        self._refusal: str | None = None  # why new requests are refused (Admin.Drain, stopping)
        self._refusal_state = "serving"
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="edgellm-scheduler", daemon=True)
        self._thread.start()

    # ---- engine -----------------------------------------------------------------------
    @property
    def engine(self) -> Engine | None:
        with self._lock:
            return self._current.engine if self._current else None

    @property
    def engine_version(self) -> int:
        with self._lock:
            return self._current.version if self._current else 0

    def set_engine(self, engine: Engine, version: int = 0) -> None:
        """First install; afterwards use swap_engine."""
        with self._lock:
            if self._current is not None:
                raise SwapError(f"engine {self._current.engine.engine_id} is installed already: use swap_engine")
            self._current = EngineSlots(engine, version)
            self._wake.notify_all()
        self._changed()

    def swap_engine(
        self,
        new: Engine | Callable[[], Engine],
        mode: str = "beside",
        timeout: float | None = None,
        version: int = 0,
        restore: Callable[[], Engine] | None = None,
    ) -> bool:
        """Replace the serving engine between two iterations.

        beside: `new` (loaded and warm) takes every request admitted from the next iteration
            on; streams running on the old engine finish there, then it is freed. Returns
            whether the old one was freed within `timeout` (it is freed when its last stream
            ends in any case). Never cuts a stream.
        drain: for when two engines do not fit. Admission stops (queued and new requests
            wait, they do not fail), running streams finish, the old engine is freed, then
            `new` (an Engine, or a callable that loads one now) is installed and admission
            resumes. If the streams do not finish within `timeout`, SwapError and the old
            engine keeps serving. If loading fails, `restore()` (when given) is installed
            again and the error is raised.
        """
        if mode not in ("beside", "drain"):
            raise ValueError(f"swap mode must be 'beside' or 'drain', got {mode!r}")
        with self._swap_lock:
            if mode == "beside":
                return self._swap_beside(new() if callable(new) else new, timeout, version)
            self._swap_drain(new, timeout, version, restore)
            return True

    def _swap_beside(self, engine: Engine, timeout: float | None, version: int) -> bool:
        with self._lock:
            old = self._current
            self._current = EngineSlots(engine, version)
            if old is not None:
                self._retiring.append(old)
            self._wake.notify_all()
        self._changed()
        log.info("engine %s installed beside %s", engine.engine_id, old.engine.engine_id if old else "nothing")
        if old is None:
            return True
        return self._wait_for(lambda: old.freed, timeout)

    def _swap_drain(self, new, timeout: float | None, version: int, restore) -> None:
        with self._lock:
            old = self._current
            self._holding = True
            self._validator = old.engine if old else None
        self._changed()
        try:
            if old is not None:
                if not self._wait_for(lambda: not old.busy(), timeout):
                    raise SwapError(
                        f"running streams did not finish within {timeout} s; engine {old.engine.engine_id} keeps serving"
                    )
                with self._lock:
                    self._current = None
                old.engine.free()
                old.freed = True
                log.info("engine %s drained and freed", old.engine.engine_id)
            try:
                engine = new() if callable(new) else new
            except BaseException:
                if restore is not None and old is not None:
                    log.error("loading the new engine failed; restoring %s", old.engine.engine_id)
                    restored = restore()
                    with self._lock:
                        self._current = EngineSlots(restored, old.version)
                raise
            with self._lock:
                self._current = EngineSlots(engine, version)
            log.info("engine %s installed", engine.engine_id)
        finally:
            with self._lock:
                self._holding = False
                self._validator = None
                self._wake.notify_all()
            self._changed()

    def _wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        with self._wake:
            return self._wake.wait_for(predicate, timeout)

    def _changed(self) -> None:
        for callback in list(self.on_change):
            callback()

    # ---- admission --------------------------------------------------------------------
    def set_accepting(self, accepting: bool, reason: str = "", state: str = "draining") -> None:
        """Refuse (UNAVAILABLE, with `reason`) or take new requests; accepted ones still run."""
        with self._lock:
            self._refusal = None if accepting else reason
            self._refusal_state = "serving" if accepting else state
        self._changed()

    @property
    def accepting(self) -> bool:
        with self._lock:
            return self._refusal is None

    @property
    def serving(self) -> bool:
        """Takes requests and has an engine to run them on now."""
        with self._lock:
            return self._refusal is None and self._current is not None and not self._holding

    def submit(self, prompt: Prompt, params: SamplingParams, deadline: float | None = None,
               default_max_tokens: bool = False) -> Request:
        """Validate and queue, or raise Rejected at once. default_max_tokens: the client did
        not ask for a length, so params.max_new_tokens is replaced by the configured default,
        clamped to the room the prompt leaves."""
        try:
            with self._lock:
                self._check_open_locked()
                engine = self._current.engine if self._current else self._validator
            # Tokenizing is real work: keep it outside the lock.
            try:
                prompt_ids = prompt.encode(engine)
                if default_max_tokens:
                    room = max(1, engine.max_seq_len - len(prompt_ids))
                    params = dataclasses.replace(params, max_new_tokens=min(self.default_max_tokens, room))
                params.validate()
                engine.check_request(prompt_ids, params.max_new_tokens)
            except RequestError as e:
                raise Rejected("INVALID_ARGUMENT", str(e)) from None
            except EdgeLLMError as e:  # the engine cannot take this kind of request (e.g. no chat template)
                raise Rejected("FAILED_PRECONDITION", str(e)) from None
            request = Request(prompt, params, prompt_ids, engine, deadline, self.metrics)
            with self._lock:
                self._check_open_locked()
                room = self.queue_depth + (self._current.free_slots() if self._current and not self._holding else 0)
                if len(self._queue) >= room:
                    raise Rejected(
                        "RESOURCE_EXHAUSTED",
                        f"the request queue is full ({self.queue_depth} waiting, every slot busy); retry later",
                    )
                self._queue.append(request)
                self.requests_accepted += 1
                self._wake.notify_all()
            return request
        except Rejected as e:
            self.metrics.request_finished(e.code)
            raise

    def _check_open_locked(self) -> None:
        if self._refusal is not None:
            raise Rejected("UNAVAILABLE", self._refusal)
        if self._current is None and self._validator is None:
            raise Rejected("UNAVAILABLE", "no engine is installed yet; push one to this device, then retry")

    def cancel(self, request: Request, code: str = "CANCELLED", message: str = "the client cancelled the request") -> bool:
        """The client went away (cancel, deadline): end the request from another thread;
        the loop frees its slot at its next iteration."""
        return self._end(request, Failure(code, message), code)

    def end(self, request: Request) -> bool:
        """The daemon ends a request (Admin.Cancel, grace period over): the stream gets a
        normal last chunk with finish reason "cancelled"."""
        chunk = Chunk("", [], FINISH_CANCELLED, request.usage(time.monotonic()), self._engine_id_of(request))
        return self._end(request, chunk, "CANCELLED")

    def _end(self, request: Request, event: Event, code: str) -> bool:
        done = request.finish(event, code)
        with self._lock:
            self._wake.notify_all()
        return done

    def end_id(self, request_id: int) -> bool:
        request = next((r for r in self.snapshot().requests if r.id == request_id), None)
        return request is not None and self.end(request)

    def end_all(self) -> int:
        return sum(self.end(r) for r in self.snapshot().requests)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no request is queued or running (within timeout)."""
        return self._wait_for(lambda: not self._queue and not any(g.busy() for g in self._groups_locked()), timeout)

    def shutdown(self) -> None:
        """Stop the loop and free every engine (requests left are cancelled)."""
        self.end_all()
        with self._lock:
            self._running = False
            self._wake.notify_all()
        self._thread.join()
        with self._lock:
            groups, self._current, self._retiring = self._groups_locked(), None, []
        for group in groups:
            group.engine.free()

    # ---- inspection -------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            groups = self._groups_locked()
            running = [r for g in groups for r in g.busy()]
            if self._refusal is not None:
                state = self._refusal_state
            elif self._holding:
                state = "swapping"
            elif self._current is None:
                state = "no_engine"
            else:
                state = "serving"
            current = self._current
            return Snapshot(
                state=state,
                current=current,
                retiring=list(self._retiring),
                slots_total=len(current.slots) if current else 0,
                slots_busy=len(current.busy()) if current else 0,
                queue_depth=len(self._queue),
                queue_capacity=self.queue_depth,
                requests=running + list(self._queue),
                stalled=self.stalled,
            )

    def _groups_locked(self) -> list[EngineSlots]:
        return ([self._current] if self._current else []) + self._retiring

    def _engine_id_of(self, request: Request) -> str:
        with self._lock:
            for group in self._groups_locked():
                if request in group.slots:
                    return group.engine.engine_id
        return ""

    # ---- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self.on_iteration()
            self._stall_if_asked()
            with self._lock:
                if not self._running:
                    return
                admitted = self._admit_locked()
                groups = self._groups_locked()
                busy = bool(admitted) or any(g.busy() for g in groups)
            if busy:
                self.iterations += 1
                for group, request in admitted:
                    self._start(group, request)
                for group in groups:
                    self._step(group)
            self._retire()
            if not busy:
                with self._lock:
                    if self._running and not self._can_admit_locked():
                        self._wake.wait(_IDLE_WAIT)

    def _can_admit_locked(self) -> bool:
        current = self._current
        return bool(self._queue) and current is not None and not self._holding and None in current.slots

    def _stall_if_asked(self) -> None:
        if not self.debug_stall_file or not os.path.exists(self.debug_stall_file):
            return
        with self._lock:
            self.stalled = True
            self._wake.notify_all()
        while os.path.exists(self.debug_stall_file):
            time.sleep(0.05)
        with self._lock:
            self.stalled = False

    def _admit_locked(self) -> list[tuple[EngineSlots, Request]]:
        """Drop ended requests (cancelled, expired), then fill free slots from the queue."""
        now = time.monotonic()
        changed = False
        for group in self._groups_locked():
            for i, request in enumerate(group.slots):
                if request is None:
                    continue
                if request.expired(now) and not request.finished:
                    request.finish(Failure("DEADLINE_EXCEEDED", "the request's deadline passed while it was generating"),
                                   "DEADLINE_EXCEEDED")
                if request.finished:
                    group.slots[i] = None
                    changed = True
        kept = collections.deque()
        for request in self._queue:
            if request.expired(now) and not request.finished:
                request.finish(Failure("DEADLINE_EXCEEDED", "the request's deadline passed while it waited in the queue"),
                               "DEADLINE_EXCEEDED")
            if not request.finished:
                kept.append(request)
        changed |= len(kept) != len(self._queue)
        self._queue = kept
        admitted = []
        current = self._current
        if current is not None and not self._holding:
            while self._queue and None in current.slots:
                request = self._queue.popleft()
                slot = current.slots.index(None)
                current.slots[slot] = request
                request.slot = slot
                admitted.append((current, request))
        if changed or admitted:
            self._wake.notify_all()  # swaps and wait_idle() wait for slots and the queue to empty
        return admitted

    def _start(self, group: EngineSlots, request: Request) -> None:
        engine = group.engine
        request.admitted_at = time.monotonic()
        try:
            if request.validated_with is not engine:  # a swap came between queueing and now
                request.prompt_ids = request.prompt.encode(engine)
                request.validated_with = engine
            request.seq = Sequence.start(engine, request.prompt_ids, request.params)
        except EdgeLLMError as e:
            code = "INVALID_ARGUMENT" if isinstance(e, RequestError) else "FAILED_PRECONDITION"
            request.finish(Failure(code, f"engine {engine.engine_id}: {e}"), code)
            return
        self.metrics.request_admitted(request.admitted_at - request.arrived, len(request.prompt_ids))

    def _step(self, group: EngineSlots) -> None:
        """Prefill chunks, then one decode step for the group's live requests. The host stays one
        step behind the GPU: when the requests of the step in flight (N) are the ones to advance,
        step N + 1 is started with N's tokens while they are still on the GPU, and N's tokens are
        read, detokenized and streamed while the GPU computes N + 1 (Engine.decode_sample). A
        request that turns out to end at N gets a token from N + 1 too, which is dropped."""
        engine = group.engine
        try:
            for request in group.busy():
                if request.seq is not None and not request.finished and request.prefilled < len(request.prompt_ids):
                    self._prefill_chunk(engine, request)
            live = self._live(group)
            pending, group.pending = group.pending, None
            if pending is not None and live:
                positions = [r.seq.length for r in live]  # one past the tokens step N took
                if pending.continues(live, positions, engine.max_seq_len):
                    group.pending = engine.decode_sample(live, [r.slot for r in live], pending.tokens, positions,
                                                         [r.seq.sampler for r in live])
            if pending is not None:
                for request, token in zip(pending.rows, pending.result()):
                    if not request.finished and request.seq.finish_reason is None:
                        self._accept(engine, request, token)
            if group.pending is None and (live := self._live(group)):
                group.pending = engine.decode_sample(live, [r.slot for r in live], [r.seq.output_ids[-1] for r in live],
                                                     [r.seq.length - 1 for r in live], [r.seq.sampler for r in live])
            if group.pending is not None and not any(self._is_live(r) for r in group.pending.rows):
                group.pending.result()  # every row of the step in flight has ended: nothing to chain to it
                group.pending = None
        except Exception as e:  # an engine step failed: its requests cannot go on, the daemon can
            log.exception("engine %s step failed", engine.engine_id)
            group.pending = None
            for request in group.busy():
                request.finish(Failure("INTERNAL", f"engine {engine.engine_id} failed a step: {e}"), "INTERNAL")
        with self._lock:
            for i, request in enumerate(group.slots):
                if request is not None and request.finished:
                    group.slots[i] = None
            self._wake.notify_all()

    @staticmethod
    def _is_live(request: Request) -> bool:
        return (request.seq is not None and not request.finished and request.seq.finish_reason is None
                and request.prefilled == len(request.prompt_ids))

    def _live(self, group: EngineSlots) -> list[Request]:
        """The group's requests that decode this step (admitted, prefilled, not ended)."""
        return [r for r in group.busy() if self._is_live(r)]

    def _prefill_chunk(self, engine: Engine, request: Request) -> None:
        start = request.prefilled
        chunk = request.prompt_ids[start:start + self.prefill_chunk]
        logits = engine.prefill(request.slot, chunk, start)
        request.prefilled += len(chunk)
        if request.prefilled == len(request.prompt_ids):
            self._accept(engine, request, sample_batch(logits[None], [request.seq.sampler])[0])

    def _accept(self, engine: Engine, request: Request, token: int) -> None:
        seq = request.seq
        before = len(seq.output_ids)
        text = seq.accept(token, engine.eos_ids)
        new_ids = seq.output_ids[before:]
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.first_token(now - request.arrived)
        else:
            self.metrics.inter_token(now - request.last_token_at)
        request.last_token_at = now
        if new_ids:
            self.tokens_generated += len(new_ids)
            self.metrics.tokens_generated(len(new_ids))
        if seq.finish_reason is None:
            if not request.finished:
                request.events.put(Chunk(text, new_ids))
            return
        request.finish(Chunk(text, new_ids, seq.finish_reason, request.usage(now), engine.engine_id), "OK")

    def _retire(self) -> None:
        with self._lock:
            done = [g for g in self._retiring if not g.busy()]
            if not done:
                return
            self._retiring = [g for g in self._retiring if g.busy()]
        for group in done:
            group.engine.free()
            log.info("engine %s finished its last stream and was freed", group.engine.engine_id)
        with self._lock:
            for group in done:
                group.freed = True
            self._wake.notify_all()

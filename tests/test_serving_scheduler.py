"""The scheduler on its own (no gRPC): chunked prefill gives the same tokens as `edgellm run`,
and engines swap beside each other or by draining without dropping a stream."""

import json
import shutil
import threading
import time

import pytest

from edgellm.engine.generate import Sequence, generate
from edgellm.engine.runner import Engine
from edgellm.engine.sampling import SamplingParams, sample_batch
from edgellm.serving.scheduler import Chunk, Failure, Prompt, Rejected, Scheduler, SwapError

PROMPTS = ["apple blue", "river window", "kiosk garden lamp", "music stone", "train cloud", "seven apples and a river"]


def variant_engine(src, dest, **changes):
    """A copy of an engine directory with manifest fields changed (engine id, max batch):
    the weights are the same, the scheduler sees another engine."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(changes)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def engines(demo_engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("sched-engines")
    a = variant_engine(demo_engine, root / "a", engine_id="engine-a")
    b = variant_engine(demo_engine, root / "b", engine_id="engine-b", max_batch=2)
    return a, b


def load(path) -> Engine:
    engine = Engine.load(path, device="cpu", verify=False)
    engine.warm_up()
    return engine


def collect(request):
    """(text, token ids, last chunk) once the request ends; raises on a Failure."""
    text, ids = [], []
    while True:
        event = request.events.get(timeout=60)
        if isinstance(event, Failure):
            raise AssertionError(f"request failed: {event}")
        text.append(event.text)
        ids.extend(event.token_ids)
        if event.finish_reason is not None:
            return "".join(text), ids, event


def first_chunk(request) -> Chunk:
    event = request.events.get(timeout=60)
    assert isinstance(event, Chunk), event
    return event


def step_by_step(engine, prompts, params):
    """The decode loop without a step in flight: each step's tokens read before the next starts."""
    seqs = [Sequence.start(engine, p, sp) for p, sp in zip(prompts, params)]
    for slot, seq in enumerate(seqs):
        seq.accept(sample_batch(engine.prefill(slot, seq.prompt_ids)[None], [seq.sampler])[0], engine.eos_ids)
    while live := [i for i, s in enumerate(seqs) if s.finish_reason is None]:
        logits = engine.decode(live, [seqs[i].output_ids[-1] for i in live], [seqs[i].length - 1 for i in live])
        for i, token in zip(live, sample_batch(logits, [seqs[i].sampler for i in live])):
            seqs[i].accept(token, engine.eos_ids)
    return [(s.output_ids, s.finish_reason) for s in seqs]


def test_decode_one_step_ahead_gives_the_tokens_of_step_by_step_decode(engines):
    """generate() (and the scheduler) start step N + 1 from step N's tokens before reading them;
    rows ending at different steps (max tokens, a stop string) and sampled rows (temperature,
    top-k, repetition penalty, seeds) give exactly the tokens of the plain loop, and the max
    sequence length is never passed."""
    engine = load(engines[0])
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS[:4]]
    params = [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=17, temperature=0.8, top_k=30, seed=3),
              SamplingParams(max_new_tokens=11, repetition_penalty=1.3, seed=4),
              SamplingParams(max_new_tokens=engine.max_seq_len - len(prompts[3]), temperature=1.2, seed=5)]
    want = step_by_step(engine, prompts, params)
    got = [(r.token_ids, r.finish_reason) for r in generate(engine, prompts, params)]
    assert [len(ids) for ids, _ in want][:3] == [5, 17, 11]
    assert got == want


def test_chunked_prefill_gives_the_tokens_of_edgellm_run(engines):
    engine = load(engines[0])
    reference_engine = load(engines[0])
    scheduler = Scheduler(queue_depth=8, prefill_chunk=3)
    scheduler.set_engine(engine)
    try:
        params = [SamplingParams(max_new_tokens=24, temperature=0.9 if i % 2 else 0.0, top_k=40 if i % 3 else 0, seed=100 + i)
                  for i in range(len(PROMPTS))]
        requests = [scheduler.submit(Prompt(text=p), sp) for p, sp in zip(PROMPTS, params)]
        got = [collect(r) for r in requests]
        # `edgellm run` drives generate(); one prompt at a time, as the CLI does.
        for prompt, sp, (text, ids, last) in zip(PROMPTS, params, got):
            ref = generate(reference_engine, [reference_engine.tokenizer.encode(prompt)], [sp])[0]
            assert ids == ref.token_ids and text == ref.text and last.finish_reason == ref.finish_reason
            assert last.usage.completion_tokens == len(ids) and last.engine_id == "engine-a"
    finally:
        scheduler.shutdown()


def test_no_engine_refusals_and_a_full_queue(engines, tmp_path):
    stall = tmp_path / "stall"
    scheduler = Scheduler(queue_depth=1, prefill_chunk=16, debug_stall_file=str(stall))
    try:
        with pytest.raises(Rejected) as e:
            scheduler.submit(Prompt(text="hi"), SamplingParams(max_new_tokens=4))
        assert e.value.code == "UNAVAILABLE" and scheduler.snapshot().state == "no_engine"
        scheduler.set_engine(load(engines[1]))  # 2 slots
        scheduler.set_accepting(False, "held for the test")
        with pytest.raises(Rejected) as e:
            scheduler.submit(Prompt(text="hi"), SamplingParams(max_new_tokens=4))
        assert e.value.code == "UNAVAILABLE" and "held for the test" in e.value.message
        scheduler.set_accepting(True)
        with pytest.raises(Rejected) as e:
            scheduler.submit(Prompt(text="x " * 600), SamplingParams(max_new_tokens=4))
        assert e.value.code == "INVALID_ARGUMENT" and "max sequence length is 512" in e.value.message

        stall.touch()  # the loop admits nothing while stalled: 2 free slots + 1 queue place
        assert scheduler._wait_for(lambda: scheduler.stalled, 60)  # noqa: SLF001
        accepted = [scheduler.submit(Prompt(text=p), SamplingParams(max_new_tokens=4)) for p in PROMPTS[:3]]
        with pytest.raises(Rejected) as e:
            scheduler.submit(Prompt(text="hi"), SamplingParams(max_new_tokens=4))
        assert e.value.code == "RESOURCE_EXHAUSTED"
        stall.unlink()
        for request in accepted:
            assert collect(request)[2].finish_reason in ("stop", "length")
    finally:
        stall.unlink(missing_ok=True)
        scheduler.shutdown()


def test_swap_beside_finishes_old_streams_on_the_old_engine(engines):
    old, new = load(engines[0]), load(engines[1])
    reference_engine = load(engines[0])
    scheduler = Scheduler(queue_depth=8, prefill_chunk=16)
    scheduler.set_engine(old, version=1)
    try:
        params = SamplingParams(max_new_tokens=60)
        running = [scheduler.submit(Prompt(text=p), params) for p in PROMPTS[:4]]
        firsts = [first_chunk(r) for r in running]  # all four are generating on the old engine
        assert scheduler.swap_engine(new, mode="beside", timeout=0, version=2) is False  # old still busy
        snap = scheduler.snapshot()
        assert snap.current.engine is new and [g.engine for g in snap.retiring] == [old]
        later = [scheduler.submit(Prompt(text=p), SamplingParams(max_new_tokens=8)) for p in PROMPTS[4:]]
        for prompt, request, first in zip(PROMPTS, running, firsts):
            text, ids, last = collect(request)
            ref = generate(reference_engine, [reference_engine.tokenizer.encode(prompt)], [params])[0]
            assert first.token_ids + ids == ref.token_ids and last.engine_id == "engine-a"
        for request in later:
            assert collect(request)[2].engine_id == "engine-b"
        assert scheduler._wait_for(lambda: not scheduler._retiring, 60)  # noqa: SLF001
        assert old.model is None  # freed once its last stream ended
        assert scheduler.engine_version == 2
    finally:
        scheduler.shutdown()


def test_swap_drain_holds_new_requests_until_the_new_engine_is_in(engines):
    old = load(engines[0])
    scheduler = Scheduler(queue_depth=8, prefill_chunk=16)
    scheduler.set_engine(old)
    order: list[str] = []
    try:
        running = [scheduler.submit(Prompt(text=p), SamplingParams(max_new_tokens=40)) for p in PROMPTS[:2]]
        for r in running:
            first_chunk(r)

        def load_new():
            order.append("old freed" if old.model is None else "old NOT freed")
            return load(engines[1])

        swap = threading.Thread(target=scheduler.swap_engine, args=(load_new,), kwargs={"mode": "drain", "timeout": 60})
        swap.start()
        assert scheduler._wait_for(lambda: scheduler._holding, 60)  # noqa: SLF001
        waiting = scheduler.submit(Prompt(text="hello"), SamplingParams(max_new_tokens=8))  # waits, does not fail
        assert scheduler.snapshot().state == "swapping"
        for r in running:
            assert collect(r)[2].engine_id == "engine-a"
        text, ids, last = collect(waiting)
        swap.join(60)
        assert order == ["old freed"] and last.engine_id == "engine-b" and len(ids) > 0
        assert scheduler.snapshot().state == "serving"
    finally:
        scheduler.shutdown()


def test_swap_drain_failures_keep_or_restore_the_old_engine(engines):
    old = load(engines[0])
    scheduler = Scheduler(queue_depth=8, prefill_chunk=16)
    scheduler.set_engine(old, version=1)
    try:
        # Streams that do not finish in time: the swap is called off, the old engine serves on.
        running = scheduler.submit(Prompt(text=PROMPTS[0]), SamplingParams(max_new_tokens=300))
        first_chunk(running)
        with pytest.raises(SwapError, match="keeps serving"):
            scheduler.swap_engine(lambda: pytest.fail("must not load"), mode="drain", timeout=0.01, version=2)
        assert scheduler.engine is old and scheduler.snapshot().state == "serving"
        scheduler.end(running)
        assert collect(running)[2].finish_reason == "cancelled"

        # The new engine fails to load: the old one is loaded again and serves.
        def broken():
            raise RuntimeError("CUDA out of memory (simulated by the test)")

        with pytest.raises(RuntimeError, match="out of memory"):
            scheduler.swap_engine(broken, mode="drain", timeout=60, version=2, restore=lambda: load(engines[0]))
        assert old.model is None and scheduler.engine is not old and scheduler.engine_version == 1
        after = scheduler.submit(Prompt(text="hello"), SamplingParams(max_new_tokens=4))
        assert collect(after)[2].engine_id == "engine-a"
    finally:
        scheduler.shutdown()


def test_a_cancelled_last_stream_releases_the_old_engine(engines):
    old = load(engines[0])
    scheduler = Scheduler(queue_depth=8, prefill_chunk=16)
    scheduler.set_engine(old)
    try:
        group = scheduler.snapshot().current
        running = scheduler.submit(Prompt(text=PROMPTS[0]), SamplingParams(max_new_tokens=300))
        first_chunk(running)
        assert scheduler.swap_engine(load(engines[1]), mode="beside", timeout=0) is False
        scheduler.cancel(running)  # the client goes away: the old engine has nothing left to finish
        assert scheduler._wait_for(lambda: group.freed, 60)  # noqa: SLF001
        assert old.model is None and not scheduler.snapshot().retiring

        group = scheduler.snapshot().current
        running = scheduler.submit(Prompt(text=PROMPTS[1]), SamplingParams(max_new_tokens=300))
        first_chunk(running)
        threading.Timer(0.2, scheduler.cancel, args=(running,)).start()
        scheduler.swap_engine(lambda: load(engines[0]), mode="drain", timeout=60)  # proceeds once the stream is gone
        assert group.freed and scheduler.engine.engine_id == "engine-a"
    finally:
        scheduler.shutdown()


@pytest.mark.gpu
def test_an_engine_captures_its_graphs_beside_one_serving_on_the_gpu(engines):
    """A hot swap beside: the new engine loads and captures its CUDA graphs on this thread while
    the live one keeps decoding streams on the scheduler's thread. A capture in CUDA's global
    mode would make that thread's synchronizing calls fail (or the capture itself); the streams
    that end during the capture must give exactly the greedy tokens they give alone."""
    def load_on_gpu(path) -> Engine:
        engine = Engine.load(path, device="cuda", verify=False)
        engine.warm_up()
        return engine

    scheduler = Scheduler(queue_depth=8, prefill_chunk=16)
    scheduler.set_engine(load_on_gpu(engines[0]))
    try:
        greedy = SamplingParams(max_new_tokens=12)
        expected = {p: collect(scheduler.submit(Prompt(text=p), greedy))[1] for p in PROMPTS[:2]}
        done = threading.Event()
        finished, errors = [], []  # (monotonic time, prompt, token ids)

        def keep_streaming(prompt):
            while not done.is_set():
                try:
                    finished.append((time.monotonic(), prompt, collect(scheduler.submit(Prompt(text=prompt), greedy))[1]))
                except Exception as e:  # noqa: BLE001 - asserted on below
                    errors.append(e)
                    return

        threads = [threading.Thread(target=keep_streaming, args=(p,)) for p in expected]
        for t in threads:
            t.start()
        began = time.monotonic()
        new = load_on_gpu(engines[1])
        ended = time.monotonic()
        done.set()
        for t in threads:
            t.join(60)
        assert not errors, errors
        during = [(prompt, ids) for at, prompt, ids in finished if began < at < ended]
        assert during, f"no stream finished during the {ended - began:.2f} s load and warm-up"
        assert all(ids == expected[prompt] for prompt, ids in during)
        assert scheduler.swap_engine(new, mode="beside", timeout=60) is True
        assert collect(scheduler.submit(Prompt(text=PROMPTS[0]), greedy))[2].engine_id == "engine-b"
    finally:
        scheduler.shutdown()

"""Batched generation over an Engine: several prompts of different lengths, one decode loop.

`edgellm run` and tests use this; the daemon's scheduler drives the same Engine steps
itself (it admits and retires sequences between iterations).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from edgellm.engine.detokenizer import StreamDecoder
from edgellm.engine.runner import Engine
from edgellm.engine.sampling import Sampler, SamplingParams, sample_batch
from edgellm.errors import RequestError

FINISH_STOP = "stop"  # an end-of-sequence token or a stop string
FINISH_LENGTH = "length"  # max new tokens reached


@dataclasses.dataclass
class Sequence:
    """One request's generation state (shared by `generate` and the daemon's scheduler)."""

    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    decoder: StreamDecoder
    output_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @classmethod
    def start(cls, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> "Sequence":
        params.validate()
        engine.check_request(prompt_ids, params.max_new_tokens)
        sampler = Sampler(params, engine.config.vocab_size, engine.device, prompt_ids)
        return cls(prompt_ids, params, sampler, StreamDecoder(engine.tokenizer, params.stop))

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def accept(self, token: int, eos_ids: set[int]) -> str:
        """Record a sampled token; returns the text it makes safe to show. Sets finish_reason."""
        if token in eos_ids:
            self.finish_reason = FINISH_STOP
            return self.decoder.flush()
        self.output_ids.append(token)
        delta = self.decoder.push(token)
        if self.decoder.stopped:
            self.finish_reason = FINISH_STOP
        elif len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = FINISH_LENGTH
            delta += self.decoder.flush()
        return delta


@dataclasses.dataclass
class Result:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int

    def to_json_dict(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason}


class BatchGeneration:
    """Iterate to get (prompt index, text delta) as tokens come; `results` once exhausted.

    All prompts run as one batch: each is prefilled into its own slot, then one decode
    step advances every unfinished sequence.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
        if not 1 <= len(prompts) <= engine.max_batch:
            raise RequestError(f"a batch holds 1 to {engine.max_batch} prompts (this engine's max batch), got {len(prompts)}")
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts need as many sampling parameter sets, got {len(params)}")
        self.engine = engine
        self.sequences = [Sequence.start(engine, p, sp) for p, sp in zip(prompts, params)]
        self.results: list[Result] = []

    def __iter__(self) -> Iterator[tuple[int, str]]:
        engine, seqs = self.engine, self.sequences
        for slot, seq in enumerate(seqs):
            logits = engine.prefill(slot, seq.prompt_ids)
            delta = seq.accept(sample_batch(logits[None], [seq.sampler])[0], engine.eos_ids)
            if delta:
                yield slot, delta
        # Decode with the host one step behind the GPU, as the daemon's scheduler does
        # (Engine.decode_sample): step N + 1 starts from step N's tokens before they are read.
        pending = None
        while True:
            live = [i for i, s in enumerate(seqs) if s.finish_reason is None]
            following = None
            if pending is not None and live:
                positions = [seqs[i].length for i in live]
                if pending.continues(live, positions, engine.max_seq_len):
                    following = engine.decode_sample(live, live, pending.tokens, positions, [seqs[i].sampler for i in live])
            if pending is not None:
                for i, token in zip(pending.rows, pending.result()):
                    if seqs[i].finish_reason is None:  # else it ended at the step before: a token to drop
                        delta = seqs[i].accept(token, engine.eos_ids)
                        if delta:
                            yield i, delta
            if following is None:
                live = [i for i, s in enumerate(seqs) if s.finish_reason is None]
                if not live:
                    break
                following = engine.decode_sample(live, live, [seqs[i].output_ids[-1] for i in live],
                                                 [seqs[i].length - 1 for i in live], [seqs[i].sampler for i in live])
            pending = following
        self.results = [Result(s.output_ids, s.decoder.text, s.finish_reason, len(s.prompt_ids)) for s in seqs]


def generate(
    engine: Engine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    on_delta: Callable[[int, str], None] | None = None,
) -> list[Result]:
    batch = BatchGeneration(engine, prompts, params)
    for i, delta in batch:
        if on_delta:
            on_delta(i, delta)
    return batch.results

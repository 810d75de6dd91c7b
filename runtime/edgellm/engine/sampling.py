"""Sampling parameters and per-sequence samplers (greedy, temperature, top-k, top-p, repetition penalty)."""

from __future__ import annotations

import dataclasses
import os

import torch

from edgellm.errors import RequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise RequestError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be 0 (no limit) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise RequestError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")
        if len(self.stop) > 16:
            raise RequestError(f"at most 16 stop strings are allowed, got {len(self.stop)}")


class Sampler:
    """One sequence's sampling state: its random generator and the tokens it has seen."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device, prompt_ids: list[int]):
        self.params = params
        self.greedy = params.temperature == 0.0
        self.generator = None
        if not self.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids, device=device)] = True

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [V] float32. Returns a 0-d tensor on the same device (no host sync)."""
        p = self.params
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.greedy:
            token = torch.argmax(logits)
        else:
            logits = logits / p.temperature
            if p.top_k > 0 and p.top_k < logits.shape[-1]:
                kth = torch.topk(logits, p.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                # Drop a token once the mass before it already reaches top_p (the first always stays).
                drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
                logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
            probs = torch.softmax(logits, dim=-1)
            token = torch.multinomial(probs, 1, generator=self.generator)[0]
        if self.seen is not None:
            self.seen[token] = True
        return token


def only_argmax(samplers: list[Sampler]) -> bool:
    """Whether every row's token is the argmax of its logits (greedy, no repetition penalty)."""
    return all(s.greedy and s.seen is None for s in samplers)


def sample_tokens(logits: torch.Tensor, samplers: list[Sampler]) -> torch.Tensor:
    """One token per row of [B, V] logits -> int64 [B] on the logits' device (no host sync)."""
    if only_argmax(samplers):
        return greedy_tokens(logits)  # any float dtype: the argmax of fp16 logits is that of their fp32 values
    logits = logits.float()  # penalties, temperature and softmax in fp32 (the GPU's logits are fp16)
    return torch.stack([s.next_token(logits[i]) for i, s in enumerate(samplers)])


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """One token per row; a single device-to-host copy for the whole batch."""
    return sample_tokens(logits, samplers).tolist()


def greedy_tokens(logits: torch.Tensor, out=None) -> torch.Tensor:
    """argmax of each row of [B, V] logits, into `out` (int64 [B], or an ArgmaxOut, whose copy to
    host memory needs the GPU kernels) if given (on CUDA a Triton kernel: torch's reduction over a
    128K vocabulary takes longer than two transformer layers of a 1B model)."""
    from edgellm.engine import kernels
    from edgellm.engine.kernels.argmax import ArgmaxOut, argmax_rows  # not at import: it imports Triton

    if logits.is_cuda and kernels.available():
        return argmax_rows(logits, out=out)
    if isinstance(out, ArgmaxOut):
        if out.host is not None or out.positions is not None:
            raise ValueError("greedy tokens written to host memory, or positions advanced with them, need the GPU "
                             "kernels (CUDA and Triton)")
        out = out.tokens
    return logits.argmax(dim=-1) if out is None else torch.argmax(logits, dim=-1, out=out)

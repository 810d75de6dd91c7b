"""Samplers on fp16 logits (what the GPU's decode graph returns) pick what they pick from the same
values in fp32; greedy writes into a given buffer (the decode graph's token input)."""

import pytest
import torch

from edgellm.engine.sampling import Sampler, SamplingParams, greedy_tokens, only_argmax, sample_tokens

VOCAB = 500
PARAMS = [SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11),
          SamplingParams(repetition_penalty=1.5), SamplingParams(temperature=1.3, seed=3)]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "top-k-top-p", "penalty", "temperature"])
def test_fp16_logits_draw_the_token_of_their_fp32_values(params):
    torch.manual_seed(0)
    logits = (torch.randn(3, VOCAB) * 4).half()
    prompts = [[1, 2, 3], [7, 8], [400, 5]]
    picked = {}
    for dtype in (torch.float16, torch.float32):
        samplers = [Sampler(params, VOCAB, torch.device("cpu"), p) for p in prompts]
        tokens = sample_tokens(logits.to(dtype), samplers)
        assert tokens.dtype == torch.int64 and tokens.shape == (3,)
        picked[dtype] = tokens.tolist()
    assert picked[torch.float16] == picked[torch.float32]
    if only_argmax([Sampler(params, VOCAB, torch.device("cpu"), [1])]):
        assert picked[torch.float16] == logits.float().argmax(dim=-1).tolist()


def test_greedy_tokens_write_into_the_given_buffer():
    logits = torch.randn(4, VOCAB).half()
    out = torch.full((4,), -1, dtype=torch.int64)
    result = greedy_tokens(logits, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert out.tolist() == logits.float().argmax(dim=-1).tolist()


def test_a_low_temperature_does_not_overflow_fp16_logits():
    """Dividing fp16 logits by a small temperature overflows fp16 (65504): samplers compute in fp32."""
    logits = torch.zeros(1, VOCAB, dtype=torch.float16)
    logits[0, 123] = 20000.0
    logits[0, 7] = 19990.0
    sampler = Sampler(SamplingParams(temperature=0.05, seed=1), VOCAB, torch.device("cpu"), [1])
    assert sample_tokens(logits, [sampler]).tolist() == [123]  # 10 / 0.05 = 200 logits apart: certain

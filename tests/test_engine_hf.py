"""FP16 engines match Hugging Face transformers, architecture by architecture."""

from pathlib import Path

import pytest
import torch

from conftest import copy_tokenizer
from edgellm.engine.builder import BuildOptions, build_engine, default_target_sms
from edgellm.engine.generate import generate
from edgellm.engine.runner import Engine
from edgellm.engine.sampling import SamplingParams
from hf_models import ARCHITECTURES, make_checkpoint

PROMPT = [1, 17, 93, 250, 8, 301, 44, 77, 5, 160, 12, 480]
NEW_TOKENS = 64


def build_fp16(kind: str, tmp_path: Path, tokenizer_dir: Path):
    hf_dir = tmp_path / kind
    hf_model = make_checkpoint(kind, hf_dir)
    copy_tokenizer(tokenizer_dir, hf_dir)
    engine_dir = tmp_path / f"{kind}-engine"
    options = BuildOptions(quant="fp16", max_batch=3, max_seq_len=256, target_sms=["cpu", *default_target_sms()])
    build_engine(hf_dir, engine_dir, options, progress=lambda _m: None)
    return hf_model, engine_dir


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by plain full forward passes: no generation-config semantics involved."""
    device = next(hf_model.parameters()).device
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([ids], device=device)).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def check_against_hf(kind, tmp_path, tokenizer_dir, device, logits_tol):
    hf_model, engine_dir = build_fp16(kind, tmp_path, tokenizer_dir)
    engine = Engine.load(engine_dir, device=device)
    hf_model = hf_model.to(device)
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT], device=device)).logits[0].float()
    ours = engine.score(PROMPT).float()
    err = ((ours - ref).norm() / ref.norm()).item()
    print(f"{kind} on {device}: relative logits error {err:.2e}")
    assert err < logits_tol
    assert torch.equal(ours[-1].argmax(), ref[-1].argmax())

    expected = hf_greedy(hf_model, PROMPT, NEW_TOKENS)
    engine.eos_ids = set()  # random weights may pick EOS early: compare all 64 tokens
    result = generate(engine, [PROMPT], [SamplingParams(max_new_tokens=NEW_TOKENS)])[0]
    assert result.token_ids == expected
    return engine


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_fp16_engine_matches_transformers_cpu(kind, tmp_path, tokenizer_dir):
    check_against_hf(kind, tmp_path, tokenizer_dir, "cpu", logits_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_fp16_engine_matches_transformers_gpu(kind, tmp_path, tokenizer_dir):
    # Ours runs fp16 on the GPU, the reference float32: fp16 rounding bounds the agreement.
    check_against_hf(kind, tmp_path, tokenizer_dir, "cuda", logits_tol=5e-3)


def test_batched_generation_matches_one_by_one(tmp_path, tokenizer_dir):
    """Prompts of different lengths in one batch give what each gives alone."""
    _, engine_dir = build_fp16("llama-gqa", tmp_path, tokenizer_dir)
    engine = Engine.load(engine_dir, device="cpu")
    prompts = [PROMPT, PROMPT[:3], [1, 400, 401, 402, 403, 404, 405]]
    params = SamplingParams(max_new_tokens=20)
    engine.eos_ids = set()
    together = generate(engine, prompts, [params] * 3)
    alone = [generate(engine, [p], [params])[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]

"""INT4-AWQ: scale search, clip search, scale folding, and AWQ vs RTN engines end to end.

Real LLMs have a few input channels whose activations are far larger than the rest
(RMSNorm weights with large entries feed them); the checkpoints here are built with such
channels, since that is what AWQ exists for and random weights alone do not have them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import copy_tokenizer
from edgellm.engine import awq
from edgellm.engine.builder import BuildOptions, build_engine
from edgellm.engine.config import ModelConfig
from edgellm.engine.linear import dense_linear
from edgellm.engine.model import Transformer
from edgellm.engine.quant import fake_quantize, quantize
from edgellm.engine.runner import Engine
from edgellm.errors import ConfigError

GROUP = 64
OUTLIER_GAIN = 50.0

EVAL_TEXT = (
    "Deep in the mountains a small observatory keeps watch over the winter sky. Every night the "
    "astronomer climbs the iron stairs, opens the dome with a heavy crank and points the old "
    "telescope toward a faint comet that has been drifting past Jupiter since October. She writes "
    "its brightness in a leather notebook, measures the length of its tail against the star chart, "
    "and drinks tea that goes cold long before the first light of dawn turns the snow pink. In spring "
    "the comet will be gone, the notebook full, and the road to the village open again."
)


def outlier_channels(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:k]


def output_mse(x: torch.Tensor, w: torch.Tensor, w_used: torch.Tensor) -> float:
    return (x @ w.T - x @ w_used.T).pow(2).mean().item()


# ---- unit: the searches --------------------------------------------------------------------------------


def test_scale_search_beats_rtn_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=g)
    x[:, outlier_channels(256, 4, g)] *= OUTLIER_GAIN
    w = torch.randn(384, 256, generator=g) * 0.02
    inputs = awq.LinearInputs(abs_mean=x.abs().mean(0), sample=x)

    choice = awq.search_scales(inputs, w, GROUP)

    # Recomputed here from the definition, (X/s) Q(W s)^T against X W^T, not with the module's helper.
    s = choice.scales
    rtn = output_mse(x, w, fake_quantize(w, GROUP))
    scaled = ((x @ w.T - (x / s) @ fake_quantize(w * s, GROUP).T).pow(2).mean()).item()
    print(f"\nsynthetic linear with outlier channels: output MSE RTN {rtn:.3e}, AWQ scales {scaled:.3e} "
          f"(alpha={choice.alpha:.2f}, {scaled / rtn:.2f}x)")
    assert choice.alpha > 0
    assert scaled == pytest.approx(choice.error, rel=1e-3)
    assert scaled < 0.5 * rtn


def test_clip_search_never_increases_error():
    torch.manual_seed(1)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 256, generator=g)
    x[:, outlier_channels(256, 4, g)] *= 10
    # Heavy-tailed weights (Student t, 3 dof): a few large weights stretch their group's range.
    w = torch.distributions.StudentT(3.0).sample((192, 256)) * 0.02

    clip = awq.search_clip(x, w, GROUP)

    assert clip.shape == (192, 256 // GROUP)
    assert float(clip.min()) >= 0.5 and float(clip.max()) <= 1.0
    assert (clip < 1).any(), "heavy-tailed groups should want some clipping"
    # The searched objective: each group's partial output, x_g . w_g, per (row, group).
    xg = x.view(512, -1, GROUP)
    def group_errors(w_used):
        return torch.einsum("sgi,ngi->nsg", xg, (w - w_used).view(192, -1, GROUP)).pow(2).mean(1)
    plain, clipped = group_errors(fake_quantize(w, GROUP)), group_errors(fake_quantize(w, GROUP, clip))
    assert (clipped <= plain * (1 + 1e-5) + 1e-12).all()
    # And the whole output, which is what the engine feels.
    rtn, ours = output_mse(x, w, fake_quantize(w, GROUP)), output_mse(x, w, fake_quantize(w, GROUP, clip))
    print(f"\nheavy-tailed linear: output MSE clip=1.0 {rtn:.3e}, searched clip {ours:.3e} ({ours / rtn:.2f}x)")
    assert ours <= rtn


# ---- unit: folding, on the engine's own model ----------------------------------------------------------


def tiny_model(num_kv_heads: int, bias: bool, seed: int = 0) -> Transformer:
    """A 2-layer engine Transformer with dense weights and outlier RMSNorm channels."""
    config = ModelConfig(
        architecture="Qwen2ForCausalLM" if bias else "LlamaForCausalLM", vocab_size=512, hidden_size=128,
        intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads, head_dim=32, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=False,
        attention_bias=bias, hidden_act="silu", bos_token_id=1, eos_token_ids=(2,),
    )
    model = Transformer(config, lambda _name, i, o, b: dense_linear(i, o, b), max_seq_len=128)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                p[outlier_channels(p.shape[0], 3, g)] *= OUTLIER_GAIN
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def all_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    model.setup_caches(max_batch=ids.shape[0], dtype=torch.float32, device="cpu")
    n, t = ids.shape
    positions = torch.arange(t).expand(n, t)
    with torch.no_grad():
        return model(ids, positions, torch.arange(n), last_only=False, span=t)


@pytest.mark.parametrize("num_kv_heads,bias", [(4, True), (2, False)], ids=["mha-qkv-bias", "gqa"])
def test_folding_scales_keeps_the_dense_model_output(num_kv_heads, bias):
    model = tiny_model(num_kv_heads, bias)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512, (4, 64), generator=g)
    before = all_logits(model, ids)
    norm_before = model.layers[0].attention_norm.weight.clone()

    # Fold every block's searched scales without quantizing anything.
    model.setup_caches(max_batch=4, dtype=torch.float32, device="cpu")
    rope = (model.rope_cos, model.rope_sin)
    x = model.tok_embeddings(ids)
    with torch.no_grad():
        for block in model.layers:
            inputs = awq.capture_linear_inputs(block, x, rope, torch.arange(4 * 64))
            choices = awq.search_and_fold_scales(block, inputs, GROUP)
            x = awq.run_block(block, x, rope)
    after = all_logits(model, ids)

    assert choices["qkv"].alpha > 0 and choices["w13"].alpha > 0, "outlier channels should get scaled"
    assert ("o" in choices) == (num_kv_heads == 4), "v->o folds only without GQA"
    assert not torch.allclose(model.layers[0].attention_norm.weight, norm_before)
    err = ((after - before).norm() / before.norm()).item()
    print(f"\nfolded scales ({'MHA+bias' if bias else 'GQA'}): relative logits change {err:.1e} (float32 rounding)")
    assert err < 1e-5


def test_rtn_needs_no_calibration_and_leaves_the_model_computing_the_engine_weights():
    model = tiny_model(2, False)
    dense = {n: p.clone() for n, p in model.named_parameters()}
    out = awq.quantize_model(model, None, GROUP, method="rtn", progress=lambda _m: None)
    assert sorted(out) == sorted(f"layers.{i}.{n}" for i in range(2) for n in awq.LINEARS)
    for name, qw in out.items():
        expected = quantize(dense[f"{name}.weight"], GROUP)
        assert torch.equal(qw.qweight, expected.qweight) and torch.equal(qw.scales, expected.scales)
        assert torch.equal(model.get_parameter(f"{name}.weight"), qw.dequantize())
    assert torch.equal(model.layers[1].ffn_norm.weight, dense["layers.1.ffn_norm.weight"])


def test_awq_leaves_the_model_computing_the_engine_weights():
    model = tiny_model(4, True)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(3))
    messages = []
    out = awq.quantize_model(model, ids, GROUP, progress=messages.append)
    assert len(messages) == 2 and messages[1].startswith("calibrating layer 2/2: scales qkv α=")
    for name, qw in out.items():
        assert torch.equal(model.get_parameter(f"{name}.weight"), qw.dequantize())


def test_bad_inputs_are_refused():
    model = tiny_model(2, False)
    with pytest.raises(ConfigError, match="not one of"):
        awq.quantize_model(model, None, GROUP, method="gptq")
    with pytest.raises(ConfigError, match="calibration token ids"):
        awq.quantize_model(model, None, GROUP)
    with pytest.raises(ConfigError, match="longer than the model's max sequence length"):
        awq.quantize_model(model, torch.zeros(2, 500, dtype=torch.long), GROUP)
    with pytest.raises(ConfigError, match="group-size"):
        awq.quantize_model(model, None, 48, method="rtn")


# ---- end to end: engines built from a Hugging Face checkpoint ------------------------------------------


def make_outlier_checkpoint(out: Path, seed: int = 0) -> None:
    """A random Llama whose RMSNorms have a few large channels (activation outliers, as in real LLMs)
    and whose projections are heavy-tailed (weight outliers); weights rounded to fp16."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    student_t = torch.distributions.StudentT(4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
                p[torch.randperm(p.shape[0])[:4]] *= OUTLIER_GAIN
            elif "layers" in name:
                p.copy_(student_t.sample(p.shape) * 0.02)
            p.copy_(p.half().float())
    model.save_pretrained(out, safe_serialization=True)


def test_awq_engine_is_closer_to_fp16_than_rtn(tmp_path, tokenizer_dir):
    hf_dir = tmp_path / "outlier-llama"
    make_outlier_checkpoint(hf_dir)
    copy_tokenizer(tokenizer_dir, hf_dir)
    logits = {}
    for quant in ("fp16", "int4-rtn", "int4-awq"):
        # Calibration: the builder's built-in text; evaluation: EVAL_TEXT, which it does not contain.
        opts = BuildOptions(quant=quant, group_size=GROUP, max_batch=2, max_seq_len=256, target_sms=["cpu"],
                            calib_path=None, calib_samples=8, calib_seq_len=128)
        build_engine(hf_dir, tmp_path / quant, opts, progress=print if quant == "int4-awq" else (lambda _m: None))
        engine = Engine.load(tmp_path / quant, device="cpu")
        ids = engine.tokenizer.encode(EVAL_TEXT)[:192]
        assert len(ids) == 192
        logits[quant] = engine.score(ids)[-64:].float()

    ref = logits["fp16"]
    def error(quant):
        return ((logits[quant] - ref).norm() / ref.norm()).item()
    def top1(quant):
        return (logits[quant].argmax(-1) == ref.argmax(-1)).float().mean().item()
    rtn, ours = error("int4-rtn"), error("int4-awq")
    print(f"\nlogits error vs the fp16 engine, last 64 positions of unseen text (group size {GROUP}): "
          f"RTN {rtn:.4f} (top-1 agreement {top1('int4-rtn'):.0%}), "
          f"AWQ {ours:.4f} (top-1 agreement {top1('int4-awq'):.0%}); AWQ/RTN = {ours / rtn:.2f}")
    assert ours <= 0.9 * rtn


def test_greedy_out_is_the_argmax_of_the_last_position():
    """Transformer.forward(greedy_out=): each row's argmax of the logits it returns (the decode
    graphs pass their token input here); refused where every position's logits are asked for."""
    model = tiny_model(2, False)
    ids = torch.randint(3, 512, (3, 5), generator=torch.Generator().manual_seed(4))
    model.setup_caches(max_batch=3, dtype=torch.float32, device="cpu")
    greedy = torch.full((3,), -1, dtype=torch.long)
    with torch.no_grad():
        logits = model(ids, torch.arange(5).expand(3, 5), torch.arange(3), span=5, greedy_out=greedy)
        assert torch.equal(greedy, logits[:, -1].argmax(-1))
        with pytest.raises(ValueError, match="last_only"):
            model(ids, torch.arange(5).expand(3, 5), torch.arange(3), last_only=False, span=5, greedy_out=greedy)

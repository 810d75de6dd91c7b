"""INT4-AWQ: activation-aware weight quantization (Lin et al., 2023), block by block.

Why it beats plain round-to-nearest: a few input channels of each projection carry much
larger activations than the rest, so the rounding error of the weights in those columns
dominates the output error. Multiplying those columns by s > 1 before rounding (and the
activations by 1/s, folded into the preceding RMSNorm or linear so the float model is
unchanged) shrinks their relative rounding error. s = mean|x|^alpha per channel, alpha
chosen by grid search on calibration activations. A second search then shrinks each
weight group's range (clipping a few outlier weights) where that lowers the group's error.

Per block: capture the four projections' inputs on the calibration tokens, search and fold
scales for the four (input producer -> consumer) pairs, search clip ratios per linear,
quantize, and put the dequantized weights back so that the next block calibrates on what
the quantized engine will actually compute.

The scale objective is the fused linear's own output error, ||X W^T - (X/s) Q(W s)^T||^2,
on a token subsample; the clip objective is AWQ's per-(row, group) partial output error.

Cost is dominated by the searches' fake-quantize + GEMM per grid point, not by the
calibration forwards: a TinyLlama-1.1B-shaped layer takes ~9 s on 16 CPU cores with
16 x 512 calibration tokens (~18 s with 128 x 512), so ~3-7 minutes for the model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch
from torch import nn

from edgellm.engine.model import RMSNorm, Transformer, TransformerBlock
from edgellm.engine.quant import QuantizedWeight, check_group_size, fake_quantize, quantize
from edgellm.errors import ConfigError

METHODS = ("awq", "rtn")
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")

SCALE_GRID = 20  # alpha in {0, 0.05, ..., 0.95}; alpha = 0 is plain RTN, so the search never loses to it
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 down to 0.5
SCALE_TOKENS = 2048  # tokens that score each alpha: the cost is linear in it, the choice barely moves
CLIP_TOKENS = 512
CLIP_ROW_BATCH = 256  # output rows per clip step: bounds the [groups, tokens, rows] partial outputs
CALIB_BATCH = 8  # sequences per block forward: bounds attention and activation memory


@dataclasses.dataclass
class LinearInputs:
    """What the searches need from one projection's input on the calibration set."""

    abs_mean: torch.Tensor  # [K] mean |x| per input channel over all calibration tokens
    sample: torch.Tensor  # [S, K] a fixed random subset of token rows (float32)

    def rescale(self, s: torch.Tensor) -> None:
        """The producer of this input was divided by s: keep the captured input consistent."""
        self.abs_mean = self.abs_mean / s
        self.sample = self.sample / s


@dataclasses.dataclass
class ScaleChoice:
    alpha: float
    scales: torch.Tensor  # [K]
    error: float  # output MSE on the sample with these scales
    rtn_error: float  # output MSE on the sample without scaling


def quantize_model(
    model: Transformer,
    calib_ids: torch.Tensor | None,
    group_size: int,
    method: str = "awq",
    progress: Callable[[str], None] = print,
) -> dict[str, QuantizedWeight]:
    """INT4-quantize every block's four projections; returns them under the engine's names.

    Afterwards the model's norms and biases hold the folded AWQ scales and its dense
    weights hold the dequantized INT4 values, so the model computes what the engine will.
    Embeddings, the final norm and the LM head stay in floating point.
    """
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r} is not one of {', '.join(METHODS)}")
    c = model.config
    for name, k in (("wqkv/w13", c.hidden_size), ("wo", c.q_size), ("w2", c.intermediate_size)):
        check_group_size(k, group_size, name)
    with torch.no_grad():
        if method == "rtn":
            return _quantize_rtn(model, group_size, progress)
        return _quantize_awq(model, _check_calib_ids(model, calib_ids), group_size, progress)


def _check_calib_ids(model: Transformer, calib_ids: torch.Tensor | None) -> torch.Tensor:
    if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        shape = None if calib_ids is None else tuple(calib_ids.shape)
        raise ConfigError(f"AWQ needs calibration token ids shaped [samples, seq_len]; got {shape}")
    if calib_ids.shape[1] > model.max_seq_len:
        raise ConfigError(
            f"calibration sequences are {calib_ids.shape[1]} tokens, longer than the model's "
            f"max sequence length {model.max_seq_len}; use a shorter calibration length"
        )
    if int(calib_ids.min()) < 0 or int(calib_ids.max()) >= model.config.vocab_size:
        raise ConfigError(f"calibration token ids must lie in 0..{model.config.vocab_size - 1}")
    return calib_ids.to(device=model.tok_embeddings.weight.device, dtype=torch.long)


def _quantize_rtn(model: Transformer, group_size: int, progress) -> dict[str, QuantizedWeight]:
    out = {}
    for i, block in enumerate(model.layers):
        progress(f"quantizing layer {i + 1}/{len(model.layers)} (round-to-nearest)")
        out.update(quantize_block(block, i, group_size, clips={}))
    return out


def _quantize_awq(model: Transformer, calib_ids: torch.Tensor, group_size: int, progress) -> dict[str, QuantizedWeight]:
    n, t = calib_ids.shape
    device = calib_ids.device
    generator = torch.Generator().manual_seed(0)  # the same calibration gives the same engine
    sample_rows = torch.randperm(n * t, generator=generator)[:SCALE_TOKENS].sort().values.to(device)
    # Caches for CALIB_BATCH rows, not n: run_block feeds the sequences through in chunks.
    model.setup_caches(max_batch=min(n, CALIB_BATCH), dtype=torch.float32, device=device)
    rope = (model.rope_cos, model.rope_sin)
    x = model.tok_embeddings(calib_ids).float()
    out = {}
    for i, block in enumerate(model.layers):
        started = time.perf_counter()
        inputs = capture_linear_inputs(block, x, rope, sample_rows)
        scales = search_and_fold_scales(block, inputs, group_size)
        clips = search_clips(block, inputs, group_size)
        out.update(quantize_block(block, i, group_size, clips))
        x = run_block(block, x, rope)
        progress(
            f"calibrating layer {i + 1}/{len(model.layers)}: scales "
            + " ".join(f"{k} α={v.alpha:.2f} (err {v.error / max(v.rtn_error, 1e-30):.2f}×RTN)" for k, v in scales.items())
            + ", clip "
            + " ".join(f"{_SHORT[k]} {_clipped_share(clip):.0%}" for k, clip in clips.items())
            + f" of groups shrunk [{time.perf_counter() - started:.1f}s]"
        )
    return out


# ---- running a block on the calibration set -------------------------------------------------------------


def run_block(block: TransformerBlock, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """block(x) over [n, T, hidden] in chunks of CALIB_BATCH sequences, each at positions 0..T-1
    (rope: the model's cos/sin tables)."""
    n, t, _ = x.shape
    out = torch.empty_like(x)
    batch = block.attention.kv_cache.k.shape[0]
    positions = torch.arange(t, device=x.device).expand(batch, t)
    slots = torch.arange(batch, device=x.device)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        rows = slice(start, start + b)
        y, residual = block(x[rows], None, rope, slots[:b], positions[:b], span=t)
        out[rows] = y + residual
    return out


def capture_linear_inputs(
    block: TransformerBlock, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], sample_rows: torch.Tensor
) -> dict[str, LinearInputs]:
    """Run the block once with hooks on its projections; keep per-channel mean |x| and sampled rows.

    sample_rows: sorted flat indices into the n*T calibration tokens (the same tokens for all four).
    """
    n, t, _ = x.shape
    sums: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in LINEARS}
    seen = {name: 0 for name in LINEARS}  # tokens each projection has seen: chunks arrive in order

    def hook(name):
        def record(_module, args, _output):
            inp = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + inp.abs().sum(0)
            lo, hi = seen[name], seen[name] + inp.shape[0]
            picked = sample_rows[(sample_rows >= lo) & (sample_rows < hi)] - lo
            samples[name].append(inp[picked])
            seen[name] = hi
        return record

    handles = [block.get_submodule(name).register_forward_hook(hook(name)) for name in LINEARS]
    try:
        run_block(block, x, rope)
    finally:
        for h in handles:
            h.remove()
    return {name: LinearInputs(sums[name] / (n * t), torch.cat(samples[name])) for name in LINEARS}


# ---- scales ---------------------------------------------------------------------------------------------


def activation_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised so that max(s) * min(s) = 1 (keeps folded weights in range)."""
    s = abs_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_output_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, group_size: int, ref: torch.Tensor) -> float:
    """MSE of (x/s) Q(w*s)^T against ref = x w^T; computed as x (Q(w*s)/s)^T, the same product."""
    w_q = fake_quantize(w * s, group_size) / s
    return (x @ w_q.T - ref).pow(2).mean().item()


def search_scales(inputs: LinearInputs, w: torch.Tensor, group_size: int) -> ScaleChoice:
    x = inputs.sample
    w = w.float()
    ref = x @ w.T
    best = None
    for i in range(SCALE_GRID):
        alpha = i / SCALE_GRID
        s = activation_scales(inputs.abs_mean, alpha)
        err = scaled_output_error(x, w, s, group_size, ref)
        if best is None or err < best.error:
            best = ScaleChoice(alpha, s, err, rtn_error=best.rtn_error if best else err)
    return best


def fold_scales_into_norm(norm: RMSNorm, linear: nn.Linear, s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    linear.weight.mul_(s.to(linear.weight.dtype))


def fold_scales_into_rows(producer: nn.Linear, rows: slice, linear: nn.Linear, s: torch.Tensor) -> None:
    """producer's output rows `rows` feed linear's input columns one to one (through attention or the SwiGLU product)."""
    producer.weight[rows].div_(s.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias[rows].div_(s.to(producer.bias.dtype))
    linear.weight.mul_(s.to(linear.weight.dtype))


def search_and_fold_scales(
    block: TransformerBlock, inputs: dict[str, LinearInputs], group_size: int
) -> dict[str, ScaleChoice]:
    """Search and fold s for each (producer -> linear) pair, in forward order; updates `inputs` to match."""
    c = block.attention.config
    attn, ffn = block.attention, block.feed_forward
    choices = {}

    choice = choices["qkv"] = search_scales(inputs["attention.wqkv"], attn.wqkv.weight, group_size)
    fold_scales_into_norm(block.attention_norm, attn.wqkv, choice.scales)
    inputs["attention.wqkv"].rescale(choice.scales)

    # wo's input channel j is v's output row j only without GQA; with GQA one v row feeds
    # several heads' channels, which could each want a different scale (the original skips it too).
    if c.num_heads == c.num_kv_heads:
        choice = choices["o"] = search_scales(inputs["attention.wo"], attn.wo.weight, group_size)
        v_rows = slice(c.q_size + c.kv_size, c.q_size + 2 * c.kv_size)
        fold_scales_into_rows(attn.wqkv, v_rows, attn.wo, choice.scales)
        inputs["attention.wo"].rescale(choice.scales)

    choice = choices["w13"] = search_scales(inputs["feed_forward.w13"], ffn.w13.weight, group_size)
    fold_scales_into_norm(block.ffn_norm, ffn.w13, choice.scales)
    inputs["feed_forward.w13"].rescale(choice.scales)

    choice = choices["w2"] = search_scales(inputs["feed_forward.w2"], ffn.w2.weight, group_size)
    up_rows = slice(ffn.intermediate_size, 2 * ffn.intermediate_size)
    fold_scales_into_rows(ffn.w13, up_rows, ffn.w2, choice.scales)
    inputs["feed_forward.w2"].rescale(choice.scales)
    return choices


# ---- clipping -------------------------------------------------------------------------------------------


def group_partial_outputs(x: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[groups, tokens, rows]: each K-group's contribution to each output, x [S, K] . w [N, K]."""
    s, k = x.shape
    n = w.shape[0]
    g = k // group_size
    xg = x.view(s, g, group_size).transpose(0, 1)  # [g, S, G]
    wg = w.view(n, g, group_size).permute(1, 2, 0)  # [g, G, N]
    return torch.bmm(xg, wg)


def search_clip(x: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per (row, group) shrink ratio of the quantization range minimising that group's partial output error.

    Returns [N, K // G]; ratio 1.0 is on the grid, so no group gets worse than plain min/max.
    """
    n, k = w.shape
    g = k // group_size
    w = w.float()
    best_ratio = torch.ones(n, g, device=w.device)
    for r0 in range(0, n, CLIP_ROW_BATCH):
        wb = w[r0 : r0 + CLIP_ROW_BATCH]
        nb = wb.shape[0]
        ref = group_partial_outputs(x, wb, group_size)
        best_err = torch.full((g, nb), math.inf, device=w.device)
        for ratio in CLIP_RATIOS:
            clip = torch.full((nb, g), ratio, device=w.device)
            out = group_partial_outputs(x, fake_quantize(wb, group_size, clip), group_size)
            err = (out - ref).pow(2).mean(1)  # [g, nb]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0 : r0 + nb] = torch.where(better.T, ratio, best_ratio[r0 : r0 + nb])
    return best_ratio


def search_clips(block: TransformerBlock, inputs: dict[str, LinearInputs], group_size: int) -> dict[str, torch.Tensor]:
    """Clip ratios per linear. q and k rows keep 1.0: their error reaches the output through
    softmax(q k^T), which a linear output error does not measure (the original skips them too)."""
    c = block.attention.config
    clips = {}
    for name in LINEARS:
        x = inputs[name].sample
        x = x[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]
        w = block.get_submodule(name).weight
        if name == "attention.wqkv":
            clip = torch.ones(w.shape[0], w.shape[1] // group_size, device=w.device)
            v_rows = slice(c.q_size + c.kv_size, c.q_size + 2 * c.kv_size)
            clip[v_rows] = search_clip(x, w[v_rows], group_size)
        else:
            clip = search_clip(x, w, group_size)
        clips[name] = clip
    return clips


_SHORT = {"attention.wqkv": "v", "attention.wo": "o", "feed_forward.w13": "w13", "feed_forward.w2": "w2"}


def _clipped_share(clip: torch.Tensor) -> float:
    return (clip < 1.0).float().mean().item()


# ---- quantizing ----------------------------------------------------------------------------------------


def quantize_block(
    block: TransformerBlock, index: int, group_size: int, clips: dict[str, torch.Tensor]
) -> dict[str, QuantizedWeight]:
    """Quantize the four projections and put their dequantized values back into the dense weights."""
    out = {}
    for name in LINEARS:
        linear = block.get_submodule(name)
        qw = quantize(linear.weight.float(), group_size, clips.get(name))
        linear.weight.copy_(qw.dequantize(torch.float32).to(linear.weight))
        out[f"layers.{index}.{name}"] = _to_cpu(qw)
    return out


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.qweight.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.group_size)

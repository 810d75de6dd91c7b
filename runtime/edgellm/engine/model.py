"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) with a static, slot-indexed KV cache.

One short file in the gpt-fast manner. Linear layers are fused where they share an input
(q|k|v as `wqkv`, gate|up as `w13`) so that a decode step launches fewer, larger kernels;
which implementation a linear is (dense FP16 or INT4) is decided outside this file
(see `linear.py`): the model only calls it.

Shapes: the KV cache is [max_batch, n_kv_heads, max_seq_len, head_dim] per layer, and a
forward pass works on `slots` (which cache row each batch row owns) and `positions`
(where each token sits in its row), so prefill of one sequence and decode of several
share one code path.

On CUDA the runner calls `use_gpu_kernels()`: the small operations between the projections
(residual add + RMSNorm, rotary embedding + KV-cache write, SiLU * up) then run as fused
Triton kernels (engine/kernels/fused.py; an INT4 gate|up projection on the tensor-core kernel
applies SiLU * up itself), and a decode step's attention is one kernel per layer (rotary
embedding, KV write, attention over only the live part of each cache row). Where every
projection is on the INT4 tensor-core kernel, steps of up to 16 tokens also fold each RMSNorm
into the projections on either side of it (`_folded_layers`, w4a16_cuda.Fold), and the final
norm runs inside the LM head's kernel (kernels/lm_head.py). The PyTorch code below is the
reference they are tested against, and what the CPU runs.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.engine.config import ModelConfig
from edgellm.engine.sampling import greedy_tokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = None  # engine/kernels/fused.py on CUDA

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (RMSNorm(x + residual), x + residual): the sum is the new residual stream."""
        if self.kernels is not None:
            return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype), x


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling["rope_type"]
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low_freq_factor = scaling.get("low_freq_factor", 1.0)
        high_freq_factor = scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_ctx / low_freq_factor
        high_freq_wavelen = old_ctx / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, blended, scaled).float()
    raise ValueError(f"rope scaling {kind!r} not handled")  # ModelConfig.from_hf refuses it first


def rope_cos_sin(config: ModelConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(config).double()
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # HF's rotate_half convention
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D] for each token's position."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # The GPU decode attention's per-(row, kv head) counters (kernels/decode_attention.py): zero
        # between its launches, which leave them so.
        self.register_buffer("merge_counters", torch.zeros(max_batch * n_kv_heads, dtype=torch.int32, device=device),
                             persistent=False)

    def write(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, T, Hkv, D] for tokens at positions [B, T] of rows slots [B]."""
        rows = slots[:, None].expand_as(positions)
        self.k[rows, :, positions] = k.to(self.k.dtype)
        self.v[rows, :, positions] = v.to(self.v.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, wqkv: nn.Module, wo: nn.Module):
        super().__init__()
        self.config = config
        self.wqkv = wqkv
        self.wo = wo
        self.kv_cache: KVCache | None = None
        self.kernels = None  # engine/kernels/fused.py on CUDA

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], slots, positions,
                span: int | None = None) -> torch.Tensor:
        """rope: the (cos, sin) tables [max_seq_len, head_dim], indexed by position; span: the
        longest row's live KV length after this step (positions.max() + 1), where the caller
        knows it (else the reference path reads it from the device, which waits for the GPU)."""
        return self.wo(self.attend(self.wqkv(x), rope, slots, positions, span))

    def attend(self, qkv, rope, slots, positions, span: int | None = None) -> torch.Tensor:
        """From the q|k|v projection [B, T, (Hq + 2 Hkv) D] to the attention output [B, T, Hq D]
        (before the output projection); writes k and v into the cache."""
        c = self.config
        b, t, _ = qkv.shape
        cache = self.kv_cache
        scale = 1.0 / math.sqrt(c.head_dim)
        if self.kernels is not None:
            if t == 1:  # decode: rotary embedding, KV write and attention in one kernel
                out = self.kernels.decode_attention_rope(qkv.view(b, -1), positions, slots, *rope, cache.k, cache.v,
                                                         c.num_heads, c.num_kv_heads, scale, cache.merge_counters)
                return out.reshape(b, 1, c.q_size)
            q = self.kernels.rope_and_write_kv(
                qkv.view(b * t, -1), positions, slots, *rope, cache.k, cache.v, c.num_heads, c.num_kv_heads,
            ).view(b, t, c.num_heads, c.head_dim)
        else:
            cos, sin = rope[0][positions], rope[1][positions]
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = apply_rope(q.view(b, t, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(k.view(b, t, c.num_kv_heads, c.head_dim), cos, sin)
            cache.write(slots, positions, k, v.view(b, t, c.num_kv_heads, c.head_dim))

        # Reference path (CPU, and prefill on GPU): attend over the row's cache up to the
        # longest live length in the batch, masking each query to its own causal prefix.
        span = int(positions.max()) + 1 if span is None else span
        keys = cache.k[slots, :, :span].to(q.dtype)
        values = cache.v[slots, :, :span].to(q.dtype)
        if span == t:
            # Every row holds just these t tokens, from position 0: plain causal attention, with
            # no mask to build (fewer launches, and the flash kernels take it).
            mask, causal = None, True
        else:
            key_pos = torch.arange(span, device=qkv.device)
            mask, causal = key_pos[None, None, None, :] <= positions[:, None, :, None], False  # [B, 1, T, span]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, scale=scale,
            enable_gqa=c.num_heads != c.num_kv_heads,
        )
        return out.transpose(1, 2).reshape(b, t, c.q_size)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, w13: nn.Module, w2: nn.Module):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.w13 = w13
        self.w2 = w2
        self.kernels = None  # engine/kernels/fused.py on CUDA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.w13, "fuses_silu", False):  # INT4 on the GPU: SiLU(gate) * up comes out of the projection
            return self.w2(self.w13.silu_gate_up(x))
        gate_up = self.w13(x)
        if self.kernels is not None:
            return self.w2(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, linears: dict[str, nn.Module]):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, linears["wqkv"], linears["wo"])
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config, linears["w13"], linears["w2"])

    def forward(self, x, residual, rope, slots, positions, span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this block's output, the residual stream before it): the next norm adds them."""
        h, residual = self.attention_norm(x, residual)
        h, residual = self.ffn_norm(self.attention(h, rope, slots, positions, span), residual)
        return self.feed_forward(h), residual

    def forward_folded(self, h, scaled, sumsq, next_norm, rope, slots, positions, span=None) -> None:
        """This block with its norms folded into its INT4 projections (see Transformer.folds_norms).
        h: the residual stream [M, D], updated in place; scaled: h * attention_norm.weight on
        entry, h * next_norm.weight on exit; sumsq: [3, M] sums of squares of h at this
        block's two norms and the next one (added to by the projections before them)."""
        from edgellm.engine.kernels.w4a16_cuda import Fold

        attention, ffn = self.attention, self.feed_forward
        b, t = positions.shape
        qkv = attention.wqkv.folded(scaled, Fold(in_sumsq=sumsq[0], eps=self.attention_norm.eps))
        out = attention.attend(qkv.view(b, t, -1), rope, slots, positions, span)
        attention.wo.folded(out.view(b * t, -1), Fold(add_to_out=True, out_sumsq=sumsq[1], next_weight=self.ffn_norm.weight,
                                                       scaled=scaled), out=h)
        act = ffn.w13.folded(scaled, Fold(in_sumsq=sumsq[1], eps=self.ffn_norm.eps))
        last = next_norm is None
        ffn.w2.folded(act, Fold(add_to_out=True, out_sumsq=None if last else sumsq[2],
                                next_weight=None if last else next_norm.weight, scaled=None if last else scaled), out=h)


class Transformer(nn.Module):
    """linear_factory(name, in_features, out_features, bias) builds each projection."""

    def __init__(self, config: ModelConfig, linear_factory, max_seq_len: int):
        super().__init__()
        self.config = config
        c = config
        # An explicit (empty) weight skips nn.Embedding's random init: every weight is loaded
        # anyway, and on the meta device that init imports torch._dynamo (seconds of start-up).
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.layers = nn.ModuleList()
        for i in range(c.num_layers):
            p = f"layers.{i}."
            linears = {
                "wqkv": linear_factory(p + "attention.wqkv", c.hidden_size, c.q_size + 2 * c.kv_size, c.attention_bias),
                "wo": linear_factory(p + "attention.wo", c.q_size, c.hidden_size, False),
                "w13": linear_factory(p + "feed_forward.w13", c.hidden_size, 2 * c.intermediate_size, False),
                "w2": linear_factory(p + "feed_forward.w2", c.intermediate_size, c.hidden_size, False),
            }
            self.layers.append(TransformerBlock(c, linears))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.output = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.max_seq_len = max_seq_len
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        # Set by use_gpu_kernels where every projection is on the INT4 tensor-core kernel: steps of up
        # to fold_rows tokens run their norms inside the projections (_folded_layers).
        self.folds_norms = False
        self.fold_rows = 0

    def setup_caches(self, max_batch: int, dtype: torch.dtype, device) -> None:
        """Preallocate the KV cache (max_batch x max_seq_len) and the rotary tables, once."""
        c = self.config
        cos, sin = rope_cos_sin(c, self.max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, c.num_kv_heads, self.max_seq_len, c.head_dim, dtype, device)

    def use_gpu_kernels(self) -> None:
        """Run the fused Triton kernels (CUDA only; see the module docstring)."""
        from edgellm.engine.kernels import fused

        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, FeedForward)):
                module.kernels = fused
        linears = [lin for layer in self.layers for lin in (layer.attention.wqkv, layer.attention.wo,
                                                            layer.feed_forward.w13, layer.feed_forward.w2)]
        norms = [n for layer in self.layers for n in (layer.attention_norm, layer.ffn_norm)]
        self.fold_rows = min(getattr(lin, "fold_rows", 0) for lin in linears)
        self.folds_norms = (self.fold_rows > 0 and all(layer.feed_forward.w13.fuses_silu for layer in self.layers)
                            and all(n.weight.dtype == torch.float16 for n in norms)
                            and os.environ.get("EDGELLM_FOLD_NORMS", "1") != "0")  # 0: for measuring it

    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        positions: torch.Tensor,  # [B, T]
        slots: torch.Tensor,  # [B]
        last_only: bool = True,
        span: int | None = None,  # positions.max() + 1, where the caller knows it (else each layer reads it from the device)
        last_index: torch.Tensor | None = None,  # [1]: the logits of this position only (a padded prompt's last token)
        greedy_out=None,  # int64 [B] (or kernels.argmax.ArgmaxOut): also write each row's argmax there (last position only)
    ) -> torch.Tensor:
        if greedy_out is not None and not (last_only or last_index is not None):
            raise ValueError("greedy_out takes the argmax of one position per row: pass last_only or last_index")
        residual = None
        rope = (self.rope_cos, self.rope_sin)
        if self.folds_norms and tokens.numel() <= self.fold_rows:
            x = self._folded_layers(tokens, rope, slots, positions, span)  # the residual stream, whole
        else:
            x = self.tok_embeddings(tokens)
            for layer in self.layers:
                x, residual = layer(x, residual, rope, slots, positions, span)
        if last_index is not None:
            x = x.index_select(1, last_index)
            residual = None if residual is None else residual.index_select(1, last_index)
        elif last_only:
            x = x[:, -1:]
            residual = None if residual is None else residual[:, -1:]
        # Logits in the activations' dtype (fp16 on the GPU): greedy's argmax reads them as they
        # are, and samplers that compute with them convert first (sampling.sample_tokens). A
        # conversion here was a kernel of its own in every decode step (4.3 us on an H100).
        weight, kernels = self.lm_head_weight(), self.norm.kernels
        b, t, d = x.shape
        if kernels is not None and kernels.lm_head_supports(b * t, d, weight, self.norm.weight):
            # the final norm inside the LM head's kernel (decode steps, a prompt's last token), and
            # greedy's argmax found beside the logits rather than by reading them again
            return kernels.lm_head(x.reshape(b * t, d), None if residual is None else residual.reshape(b * t, d),
                                   self.norm.weight, self.norm.eps, weight, argmax_out=greedy_out).view(b, t, -1)
        x, _ = self.norm(x, residual)
        logits = F.linear(x, weight)
        if greedy_out is not None:
            greedy_tokens(logits[:, -1], out=greedy_out)
        return logits

    def _folded_layers(self, tokens, rope, slots, positions, span) -> torch.Tensor:
        """The layers with every RMSNorm folded into the INT4 projections before and after it
        (w4a16_cuda.Fold): no norm kernel runs between the projections. tokens: [B, T]; returns
        the residual stream after the last layer [B, T, D]."""
        from edgellm.engine.kernels import fused

        b, t = tokens.shape
        n = len(self.layers)
        # each norm's sums of squares, fp64: summed exactly whatever the order of the kernels' atomics (w4a16_cuda.Fold)
        sumsq = torch.empty(2 * n + 1, b * t, dtype=torch.float64, device=tokens.device)
        # h: the embeddings, the residual stream from here on (updated in place by the projections)
        h, scaled = fused.embed_and_start_folded_norms(tokens.reshape(-1), self.tok_embeddings.weight,
                                                       self.layers[0].attention_norm.weight, sumsq)
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].attention_norm if i + 1 < n else None
            layer.forward_folded(h, scaled, sumsq[2 * i:2 * i + 3], next_norm, rope, slots, positions, span)
        return h.view(b, t, -1)

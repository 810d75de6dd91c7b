"""Fused Triton kernels for the small per-layer operations of a decode (or prefill) step.

At batch 1 on an H100 a whole 8B decode step should take ~2 ms; in unfused PyTorch the
glue between the big projections (RMSNorm in float32, rotary embedding, KV-cache scatter,
SiLU * up, residual adds) is ~40 tiny kernels per layer, each a few microseconds even
inside a CUDA graph: more time than the weights take to stream. Each function here does
one of those groups in one launch, with the numerics of the reference path in
engine/model.py (float32 arithmetic, one rounding to fp16 at the end):

* `add_rms_norm`: residual add and RMSNorm (the sum is also returned: it is the new
  residual stream, kept in fp16 as transformers keeps it).
* `rope_and_write_kv`: rotary embedding of q and k, straight from the fused q|k|v
  projection output, and k, v written into the static KV cache at each token's slot and
  position (decode and prefill alike: one program per token and head).
* `silu_mul`: SiLU(gate) * up from the fused gate|up projection output.
* `embed_and_start_folded_norms`: where the norms are folded into the INT4 projections
  (w4a16_cuda.Fold), the embedding lookup and the first norm's input for the first
  projection.

All take and return fp16 CUDA tensors and allocate nothing but their outputs, so they are
CUDA-graph capturable. On hosts without Triton the module imports; the functions raise.

This module is the model's one handle on the GPU kernels (`Transformer.use_gpu_kernels`),
so it also offers decode attention and the fused final norm + LM head.
"""

from __future__ import annotations

import torch

from edgellm.engine.kernels import pdl
from edgellm.engine.kernels.decode_attention import decode_attention_rope  # noqa: F401 (re-exported for the model)
from edgellm.engine.kernels.lm_head import lm_head  # noqa: F401 (re-exported for the model)
from edgellm.engine.kernels.lm_head import supports as lm_head_supports  # noqa: F401

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts: the module imports, the kernels do not exist
    triton = None
    tl = None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused kernels need Triton; on this host the model uses its reference path")


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) over the last axis; residual may be None."""
    _require_triton()
    shape = x.shape
    d = shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    rows = x2.shape[0]
    normed = torch.empty_like(x2)
    if residual is None:
        total = x2
    else:
        r2 = residual.reshape(-1, d).contiguous()
        total = torch.empty_like(x2)
    if rows:
        block = triton.next_power_of_2(d)
        _add_rms_norm_kernel[(rows,)](
            x2, x2 if residual is None else r2, weight, normed, total, d, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            **pdl.triton_options(x.device),
        )
    return normed.view(shape), total.view(shape)


def embed_and_start_folded_norms(tokens: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                                 sumsq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The start of a decode step whose norms are folded into the INT4 projections
    (w4a16_cuda.Fold), in one kernel: h = table[tokens] (int64 [M] ids into the fp16 [V, D]
    embedding table) is the residual stream, `weight` the first norm's. Returns (h, h * weight),
    both fp16 [M, D], and writes sumsq[0, m] = sum(h[m]^2) and zero into the rest of sumsq
    ([norms, M] fp64: the later norms' sums are added up by the projections before them,
    exactly in any order)."""
    _require_triton()
    rows, d = tokens.numel(), table.shape[1]
    if (tokens.dim() != 1 or not tokens.is_contiguous() or tokens.dtype != torch.int64 or table.stride(1) != 1
            or sumsq.dim() != 2 or sumsq.shape[1] != rows or not sumsq.is_contiguous() or sumsq.dtype != torch.float64):
        raise ValueError(f"expected int64 tokens [M], a table [V, D] contiguous in D and sumsq [norms, M] contiguous "
                         f"fp64; got tokens {tokens.dtype} {tuple(tokens.shape)}, table {tuple(table.shape)}, "
                         f"sumsq {tuple(sumsq.shape)} {sumsq.dtype}")
    h = torch.empty(rows, d, dtype=table.dtype, device=table.device)
    scaled = torch.empty_like(h)
    if rows:
        block = triton.next_power_of_2(d)
        _embed_start_folded_norms_kernel[(rows,)](
            tokens, table, weight, h, scaled, sumsq, d, table.stride(0), rows, sumsq.shape[0],
            BLOCK=block, BLOCK_NORMS=triton.next_power_of_2(sumsq.shape[0]), num_warps=min(16, max(1, block // 256)),
            **pdl.triton_options(table.device),
        )
    return h, scaled


def rope_and_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """qkv [B * T, (Hq + 2 Hkv) * D] fp16 for T tokens of each of B rows; token t of row b
    sits at positions[b, t] of cache row slots[b]. Writes roped k and v into the caches
    [rows, Hkv, S_max, D]; returns roped q [B * T, Hq, D]. cos/sin: float32 [S_max, D]
    tables in the rotate-half convention."""
    _require_triton()
    rows, per_row = positions.shape
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if tokens != rows * per_row or slots.shape != (rows,):
        raise ValueError(f"qkv has {tokens} tokens; positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must be [B, T] and [B]")
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [T, (Hq + 2 Hkv) * D] contiguous in the last axis, got {tuple(qkv.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides and be contiguous in D")
    if head_dim % 2 or head_dim != triton.next_power_of_2(head_dim):
        raise ValueError(f"head_dim must be an even power of two, got {head_dim}")
    positions, slots = positions.contiguous(), slots.contiguous()  # no-ops on the engine's own inputs
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        sk = k_cache.stride()
        _rope_kv_kernel[(tokens, num_heads + num_kv_heads)](
            qkv, positions, slots, cos, sin, q, k_cache, v_cache,
            per_row, qkv.stride(0), cos.stride(0), sk[0], sk[1], sk[2],
            HQ=num_heads, HKV=num_kv_heads, HALF=head_dim // 2, num_warps=1, **pdl.triton_options(qkv.device),
        )
    return q


def silu_mul(gate_up: torch.Tensor, interleaved: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2I] (gate | up) fp16 -> SiLU(gate) * up [..., I]. interleaved: each 16 columns hold
    8 features' gates, then the same features' ups (the INT4 kernel's gate|up order,
    w4a16_cuda.interleave_gate_up). out: a contiguous [rows, I] fp16 tensor to write into."""
    _require_triton()
    shape = gate_up.shape
    inter = shape[-1] // 2
    g2 = gate_up.reshape(-1, shape[-1])
    if g2.stride(1) != 1:
        g2 = g2.contiguous()
    if out is None:
        out = torch.empty(g2.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (g2.shape[0], inter) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {(g2.shape[0], inter)} tensor, got {tuple(out.shape)}")
    if g2.shape[0]:
        block = 1024
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(inter, block))](
            g2, out, inter, g2.stride(0), INTERLEAVED=interleaved, BLOCK=block, num_warps=4,
            **pdl.triton_options(g2.device),
        )
    return out.view(*shape[:-1], inter)


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, normed_ptr, total_ptr, D, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl.start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * D + cols, mask=mask, other=0.0)
            # The residual stream is fp16 (rounded after each add, as the reference does).
            x = (x.to(tl.float32) + r.to(tl.float32)).to(tl.float16)
            tl.store(total_ptr + row * D + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row * D + cols, (xf * inv_rms * w).to(tl.float16), mask=mask)

    @triton.jit
    def _embed_start_folded_norms_kernel(tok_ptr, table_ptr, w_ptr, h_ptr, scaled_ptr, sumsq_ptr, D, stride_table, M,
                                         NORMS, BLOCK: tl.constexpr, BLOCK_NORMS: tl.constexpr, PDL: tl.constexpr):
        pdl.start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        token = tl.load(tok_ptr + row)
        h = tl.load(table_ptr + token * stride_table + cols, mask=mask, other=0.0)
        tl.store(h_ptr + row * D + cols, h, mask=mask)
        x = h.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(scaled_ptr + row * D + cols, (x * w).to(tl.float16), mask=mask)
        norms = tl.arange(0, BLOCK_NORMS)
        sums = tl.where(norms == 0, tl.sum(x * x, axis=0), 0.0)
        tl.store(sumsq_ptr + norms * M + row, sums.to(tl.float64), mask=norms < NORMS)

    @triton.jit
    def _rope_kv_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                        tokens_per_row, stride_t, stride_cos, stride_kslot, stride_kh, stride_ks,
                        HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr):
        pdl.start(PDL)
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        rd = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + t)
        c = tl.load(cos_ptr + pos * stride_cos + rd)
        s = tl.load(sin_ptr + pos * stride_cos + rd)
        src = qkv_ptr + t * stride_t + h * (2 * HALF)
        x1 = tl.load(src + rd).to(tl.float32)
        x2 = tl.load(src + HALF + rd).to(tl.float32)
        # rotate-half: [x1, x2] * cos + [-x2, x1] * sin
        o1 = (x1 * c - x2 * s).to(tl.float16)
        o2 = (x2 * c + x1 * s).to(tl.float16)
        if h < HQ:
            dst = q_ptr + (t * HQ + h) * (2 * HALF)
            tl.store(dst + rd, o1)
            tl.store(dst + HALF + rd, o2)
        else:
            kv_head = h - HQ
            slot = tl.load(slot_ptr + t // tokens_per_row).to(tl.int64)
            off = slot * stride_kslot + kv_head * stride_kh + pos * stride_ks
            tl.store(k_ptr + off + rd, o1)
            tl.store(k_ptr + off + HALF + rd, o2)
            v_src = qkv_ptr + t * stride_t + (HQ + HKV + kv_head) * (2 * HALF)
            tl.store(v_ptr + off + rd, tl.load(v_src + rd))
            tl.store(v_ptr + off + HALF + rd, tl.load(v_src + HALF + rd))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_row, INTERLEAVED: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
        pdl.start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        if INTERLEAVED:
            gate_cols = (cols // 8) * 16 + cols % 8
            up_cols = gate_cols + 8
        else:
            gate_cols = cols
            up_cols = I + cols
        g = tl.load(gu_ptr + row * stride_row + gate_cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_row + up_cols, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * I + cols, y.to(tl.float16), mask=mask)

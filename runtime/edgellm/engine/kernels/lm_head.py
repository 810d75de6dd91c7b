"""The LM head of a decode step (or of a prefill's last token) in one Triton launch: the final
RMSNorm and the logits norm(x) W^T over the fp16 vocabulary matrix, for up to MAX_ROWS rows.

Why: the LM head is the largest single read of a step (128256 x 4096 fp16 = 1.05 GB for the
Llama-3.1-8B shape, half of the step's weight bytes; 0.53 GB for the 1B, whose step it is a
quarter of). Before this the step ran the final norm as a kernel of its own and then cuBLAS's
GEMM, which zeroes a workspace with a memset first: three launches, ~4 us of them not reading
weights, and the GEMM read the matrix at ~93% of the read-only bandwidth.

Each program takes BLOCK_N rows of W (vocabulary entries) over the whole K and all rows of x
(padded to 16, the tensor cores' narrow side): per K tile it adds the residual (where the
caller has one), accumulates each row's sum of squares, multiplies by the norm's weight and
rounds to fp16 (as the reference RMSNorm rounds its output), and adds W_tile x_tile^T on the
tensor cores. The norm's 1 / rms is a per-row factor of the result, so it is applied once, to
the fp32 sums, at the end: the reference rounds x * (1 / rms) * weight to fp16, this kernel
x * weight, a difference within one fp16 rounding of the operand. Started early (kernels/pdl.py)
a program requests its first weight tile before it waits for the previous kernel. For greedy
decoding each program also keeps the first maximum of its columns, from which one small kernel
picks each row's argmax (argmax.pick_first_block): no kernel reads the logits again.
"""

from __future__ import annotations

import functools
import os

import torch

from edgellm.engine.kernels import pdl
from edgellm.engine.kernels.argmax import ArgmaxOut, pick_first_block

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts: the module imports, the kernel does not exist
    triton = None
    tl = None

MAX_ROWS = 16  # one tensor-core tile of x rows; more rows (scoring every position) go to cuBLAS


def supports(rows: int, k: int, weight: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """Whether lm_head takes this call: CUDA fp16 weights ([V, K] contiguous in K, and the norm's),
    K a multiple of 32 (the smallest K tile), 1 to MAX_ROWS rows. EDGELLM_FUSED_LM_HEAD=0 says no
    (the norm kernel and cuBLAS then run, for measuring)."""
    return (triton is not None and weight.is_cuda and weight.dtype == torch.float16 and weight.dim() == 2
            and weight.shape[1] == k and weight.stride(1) == 1 and k % 32 == 0 and 0 < rows <= MAX_ROWS
            and norm_weight.dtype == torch.float16 and os.environ.get("EDGELLM_FUSED_LM_HEAD", "1") != "0")


# (BLOCK_N, BLOCK_K, num_stages, num_warps), fastest first as measured on an H100 (bench/lm_head.py,
# docs/benchmarks.md): 256 x 128 x 3 stages read the 8B and 1B heads at 99-102% of a torch.sum's
# read bandwidth at 1-8 rows (within 0.3% of the best of twelve at each shape and row count), the
# next two 94-102%. A GPU takes the first whose pipeline fits its shared memory per block (227 KB
# on SM 9.0, 163 KB on an Orin's SM 8.7, 99 KB on an L40S's SM 8.9); only the H100 was measured.
CONFIGS = ((256, 128, 3, 8), (128, 128, 3, 4), (64, 128, 4, 4), (64, 64, 3, 4))
SMEM_SLACK = 16 * 1024  # beyond the pipeline's tiles: the compiler's own layout conversions


def _config(k: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_stages, num_warps) for K on this device. EDGELLM_LM_HEAD_CONFIG=
    NxKxSTAGESxWARPS (e.g. 128x128x4x4) overrides it, for measuring (bench/lm_head.py, ab_decode.py)."""
    override = os.environ.get("EDGELLM_LM_HEAD_CONFIG")
    if override:
        block_n, block_k, stages, warps = (int(v) for v in override.split("x"))
    else:
        limit = _shared_memory_per_block(device.index if device.index is not None else torch.cuda.current_device())
        block_n, block_k, stages, warps = next(
            (c for c in CONFIGS if c[2] * (c[0] + 16) * c[1] * 2 + SMEM_SLACK <= limit), CONFIGS[-1])
    while k % block_k:
        block_k //= 2
    return block_n, block_k, stages, warps


@functools.cache
def _shared_memory_per_block(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def lm_head(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
            weight: torch.Tensor, out: torch.Tensor | None = None, argmax_out: torch.Tensor | ArgmaxOut | None = None
            ) -> torch.Tensor:
    """RMSNorm(x + residual) * norm_weight @ weight^T -> fp16 logits [M, V].

    x, residual: fp16 [M, K] (residual may be None), contiguous in K, M <= MAX_ROWS; norm_weight
    fp16 [K]; weight fp16 [V, K] contiguous in K (supports() says which calls qualify); out: fp16
    [M, V] contiguous in V, or None to allocate it. argmax_out: where given (int64 [M], or an
    argmax.ArgmaxOut), each row's argmax over the logits as returned (the first of equal maxima, as
    torch.argmax), for greedy sampling: each program also finds the maximum of its own columns, and
    one small kernel picks among them (argmax.pick_first_block), instead of an argmax reading the
    logits again."""
    if triton is None:
        raise RuntimeError("lm_head needs Triton; on this host the model runs its norm and F.linear")
    if x.dim() != 2 or x.dtype != torch.float16 or x.stride(1) != 1:
        raise ValueError(f"x must be fp16 [M, K] contiguous in K, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
        raise ValueError(f"residual must be like x ({tuple(x.shape)}, fp16, contiguous in K), got "
                         f"{residual.dtype} {tuple(residual.shape)}")
    if norm_weight.shape != (k,) or norm_weight.dtype != torch.float16 or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be a contiguous fp16 [{k}] tensor, got {norm_weight.dtype} "
                         f"{tuple(norm_weight.shape)}")
    if not supports(m, k, weight, norm_weight):
        raise ValueError(f"lm_head takes 1..{MAX_ROWS} rows, K a multiple of 32 and a CUDA fp16 weight [V, K={k}] "
                         f"contiguous in K; got {m} rows, weight {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    v = weight.shape[0]
    if out is None:
        out = torch.empty(m, v, dtype=torch.float16, device=x.device)
    elif out.shape != (m, v) or out.dtype != torch.float16 or out.stride(1) != 1:
        raise ValueError(f"out must be fp16 [{m}, {v}] contiguous in V")
    if argmax_out is not None:
        argmax_out = ArgmaxOut.of(argmax_out, m, x.device)
    block_n, block_k, stages, warps = _config(k, x.device)
    programs = triton.cdiv(v, block_n)
    if argmax_out is None:
        part_val = part_idx = out  # not written
    else:
        part_val = torch.empty(m, programs, dtype=torch.float32, device=x.device)
        part_idx = torch.empty(m, programs, dtype=torch.int64, device=x.device)
    r = x if residual is None else residual
    _lm_head_kernel[(programs,)](
        x, r, norm_weight, weight, out, part_val, part_idx, m, v, k, x.stride(0), r.stride(0), weight.stride(0),
        out.stride(0), eps, programs, HAS_RESIDUAL=residual is not None, ARGMAX=argmax_out is not None, BLOCK_M=16,
        BLOCK_N=block_n, BLOCK_K=block_k, num_stages=stages, num_warps=warps, **pdl.triton_options(x.device))
    if argmax_out is not None:
        pick_first_block(part_val, part_idx, argmax_out)
    return out


if triton is not None:

    @triton.jit
    def _add_tile(acc, sumsq, w, x_ptrs, r_ptrs, g_ptr, k0, m_mask, HAS_RESIDUAL: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """acc += w (x[:, k0:k0 + BLOCK_K] * g)^T, sumsq += the tile's squares of x (+ residual)."""
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        if HAS_RESIDUAL:
            # the residual stream is fp16, rounded after the add (as the reference adds)
            x = (x.to(tl.float32) + tl.load(r_ptrs + k0, mask=m_mask[:, None], other=0.0).to(tl.float32)).to(tl.float16)
        xf = x.to(tl.float32)
        g = tl.load(g_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        acc = tl.dot(w, tl.trans((xf * g[None, :]).to(tl.float16)), acc)
        return acc, sumsq + tl.sum(xf * xf, axis=1)

    @triton.jit
    def _lm_head_kernel(x_ptr, r_ptr, g_ptr, w_ptr, out_ptr, part_val_ptr, part_idx_ptr, M, V, K, stride_x, stride_r,
                        stride_w, stride_o, eps, n_parts, HAS_RESIDUAL: tl.constexpr, ARGMAX: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm = tl.arange(0, BLOCK_M)
        n_mask = rn < V
        m_mask = rm < M
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
        x_ptrs = x_ptr + rm[:, None] * stride_x + rk[None, :]
        r_ptrs = r_ptr + rm[:, None] * stride_r + rk[None, :]
        # The weights depend on no earlier kernel: the first tile is requested before the wait,
        # and the loop over the others is left whole for the compiler to pipeline.
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        pdl.start(PDL)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, sumsq = _add_tile(acc, sumsq, w, x_ptrs, r_ptrs, g_ptr, 0, m_mask, HAS_RESIDUAL, BLOCK_K)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0)
            acc, sumsq = _add_tile(acc, sumsq, w, x_ptrs, r_ptrs, g_ptr, k0, m_mask, HAS_RESIDUAL, BLOCK_K)
        inv_rms = tl.rsqrt(sumsq / K + eps)
        logits = (tl.trans(acc) * inv_rms[:, None]).to(tl.float16)  # [BLOCK_M, BLOCK_N]
        tl.store(out_ptr + rm[:, None] * stride_o + rn[None, :], logits, mask=m_mask[:, None] & n_mask[None, :])
        if ARGMAX:
            # this program's first maximum of each row, over the fp16 logits as stored
            vals = tl.where(n_mask[None, :], logits.to(tl.float32), float("-inf"))
            best, where = tl.max(vals, axis=1, return_indices=True, return_indices_tie_break_left=True)
            part = rm * n_parts + tl.program_id(0)
            tl.store(part_val_ptr + part, best, mask=m_mask)
            tl.store(part_idx_ptr + part, (tl.program_id(0) * BLOCK_N + where).to(tl.int64), mask=m_mask)

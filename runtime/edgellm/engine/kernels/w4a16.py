"""W4A16 linear: fp16 activations times the INT4 row-packed weights of engine/quant.py.

    out[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k // G]) * scale[n, k // G]  (+ bias[n])

One Triton kernel serves decode and prefill. Each program owns BLOCK_N output features and
a slice of K (split-K), dequantizes its weight tile in registers and feeds it to the
tensor cores as the A operand of out^T = W @ x^T, so a decode step with M = 1..16 costs
one pass over the packed weights. Decode is bound by memory bandwidth, and at 3 TB/s the
chip has only ~5 instructions per weight to spare, so the dequantization is done in PTX
two words at a time with f16x2 arithmetic (2 instructions per weight instead of ~5 with
integer-to-float conversions, which also run at a quarter rate).

Split-K partial sums meet in an fp32 workspace; the last program of each output tile
(an atomic ticket) writes the fp16 result and zeroes the workspace and its ticket again,
so one launch does the whole linear and the call is CUDA-graph capturable. The workspace
is per device and shared: calls must not overlap on two streams at once.

Configurations are a fixed table (measured offline with bench/kernels.py on an H100; see
docs/dev/kernels-notes.md): nothing is tuned at start-up.
"""

from __future__ import annotations

import dataclasses

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts: the module imports, the kernels do not exist
    triton = None
    tl = None


@dataclasses.dataclass(frozen=True)
class W4A16Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


def _m_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def pick_config(m: int, n: int, k: int, group_size: int, num_sms: int = 132) -> W4A16Config:
    """The fixed configuration table.

    Decode (M <= 16): enough programs to keep every SM busy with several weight tiles in
    flight, splitting K when N alone gives too few tiles. Prefill: large tiles, no split.
    """
    block_m = _m_block(m)
    if m > 16:
        block_n = 128 if m > 32 else 64
        return W4A16Config(block_m, block_n, 64, 1, num_warps=4, num_stages=3)
    block_n = 64
    block_k = 128 if k % 256 else 256
    tiles = triton_cdiv(n, block_n)
    iters = triton_cdiv(k, block_k)
    split = 1
    # Aim at >= 4 programs per SM, but keep >= 2 K iterations per program.
    while tiles * split < 4 * num_sms and iters // (split * 2) >= 2:
        split *= 2
    return W4A16Config(block_m, block_n, block_k, split, num_warps=4, num_stages=3)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n_acc: int, n_tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed split-K scratch, kept zero by the kernel itself after every call."""
    acc, tickets = _workspaces.get(device, (None, None))
    if acc is None or acc.numel() < n_acc or tickets.numel() < n_tickets:
        # Grow to a size that serves the largest decode shapes at once, so growth (a fresh
        # zeroed allocation) happens during warm-up, not inside a captured graph.
        n_acc = max(n_acc, 16 * 65536, 0 if acc is None else acc.numel())
        n_tickets = max(n_tickets, 8192, 0 if tickets is None else tickets.numel())
        acc = torch.zeros(n_acc, dtype=torch.float32, device=device)
        tickets = torch.zeros(n_tickets, dtype=torch.int32, device=device)
        _workspaces[device] = (acc, tickets)
    return acc, tickets


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    if x.dim() != 2 or x.dtype != torch.float16:
        raise ValueError(f"x must be a 2-D fp16 tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    n, kw = qweight.shape
    k = kw * 8
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} in-features, the weight has {k}")
    if qweight.dtype != torch.int32 or scales.dtype != torch.float16 or zeros.dtype != torch.float16:
        raise ValueError("qweight must be int32 and scales/zeros fp16 (the int4-rowpacked-v1 layout)")
    if group_size % 8 or k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales/zeros must be [N, K // group_size] = [{n}, {k // max(group_size, 1)}] with group_size a "
            f"multiple of 8 dividing K={k}; got group_size={group_size}, scales {tuple(scales.shape)}"
        )
    return n, k


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """x [M, K] fp16 @ dequant(qweight)^T -> [M, N] fp16 (fp32 accumulation)."""
    if triton is None:
        raise RuntimeError("the W4A16 kernel needs Triton; use the dequantized weights on this host")
    n, k = _check(x, qweight, scales, zeros, group_size)
    m = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    if m == 0:
        return out
    cfg = config or pick_config(m, n, k, group_size, _num_sms(x.device))
    n_tiles = triton_cdiv(n, cfg.block_n)
    m_tiles = triton_cdiv(m, cfg.block_m)
    iters = triton_cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, iters))
    per_split = triton_cdiv(iters, split)
    split = triton_cdiv(iters, per_split)  # no program without K iterations
    if split > 1:
        ws, tickets = _workspace(x.device, m * n, n_tiles * m_tiles)
    else:
        ws, tickets = out, out  # unused
    grid = (n_tiles * split, m_tiles)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else out, out, ws, tickets,
        # K // 8 and K // G travel as arguments so that Triton sees their divisibility by
        # 16 and loads 16 bytes per thread.
        m, n, k, k // 8, k // group_size, per_split, x.stride(0), out.stride(0),
        G=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        HAS_BIAS=bias is not None, EVEN_NK=n % cfg.block_n == 0 and k % cfg.block_k == 0,
        EVEN_K=k % cfg.block_k == 0,
        USE_ASM=_use_asm(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def dequantize_fp16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp16 weight [N, K] (for prefill through cuBLAS, and for checks)."""
    if triton is None:
        raise RuntimeError("the dequantization kernel needs Triton")
    n, kw = qweight.shape
    k = kw * 8
    out = torch.empty(n, k, dtype=torch.float16, device=qweight.device)
    block_n, block_k = 32, 256
    grid = (triton_cdiv(n, block_n), triton_cdiv(k, block_k))
    _dequant_kernel[grid](
        qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, n, k,
        G=group_size, BLOCK_N=block_n, BLOCK_K=block_k, USE_ASM=_use_asm(), num_warps=4,
    )
    return out


_sm_counts: dict[torch.device, int] = {}


def _num_sms(device: torch.device) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


def _use_asm() -> bool:
    # Triton's interpreter (TRITON_INTERPRET=1, used to check the kernels on a CPU) runs
    # no PTX; the plain-Triton dequantization computes the same values.
    import os

    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


if triton is not None:

    @triton.jit
    def _dequant_tile(w, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
        """int32 words [BN, BK // 8] + fp16 scale/zero (broadcastable) -> fp16 [BN, BK], natural K order."""
        if USE_ASM:
            # Two words per instance: PRMT gathers the same half of both words into one
            # register so that each f16x2 result holds nibble t of word 0 and of word 1,
            # which is how Triton packs two consecutive fp16 elements of an output.
            # 0x6400 | q is the fp16 1024 + q; minus (1024 + zero) is q - zero exactly;
            # times scale rounds once, as an fp16 dequantization would.
            q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                asm="""
                {
                .reg .b32 lo, hi, zz, t, mg;
                mov.b32 mg, 0x64006400;
                prmt.b32 lo, $8, $9, 0x5410;
                prmt.b32 hi, $8, $9, 0x7632;
                add.rn.f16x2 zz, $10, mg;
                lop3.b32 t, lo, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $0, t, $11;
                shr.u32 t, lo, 4;
                lop3.b32 t, t, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $1, t, $11;
                shr.u32 t, lo, 8;
                lop3.b32 t, t, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $2, t, $11;
                shr.u32 t, lo, 12;
                lop3.b32 t, t, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $3, t, $11;
                lop3.b32 t, hi, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $4, t, $11;
                shr.u32 t, hi, 4;
                lop3.b32 t, t, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $5, t, $11;
                shr.u32 t, hi, 8;
                lop3.b32 t, t, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $6, t, $11;
                shr.u32 t, hi, 12;
                lop3.b32 t, t, 0x000F000F, mg, 0xEA;
                sub.rn.f16x2 t, t, zz;
                mul.rn.f16x2 $7, t, $11;
                }
                """,
                constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
                args=[w, z, s],
                dtype=(tl.float16,) * 8,
                is_pure=True,
                pack=2,
            )
            # join() appends an innermost axis: the last join picks the lowest bit of the
            # nibble index, so the reshape lays nibble t of word j at k = 8j + t.
            even = tl.join(tl.join(q0, q4), tl.join(q2, q6))
            odd = tl.join(tl.join(q1, q5), tl.join(q3, q7))
            return tl.reshape(tl.join(even, odd), [BLOCK_N, BLOCK_K])
        else:
            shifts = tl.arange(0, 8) * 4
            q = (w[:, :, None] >> shifts[None, None, :]) & 0xF
            wf = (q.to(tl.float32) - z[:, :, None].to(tl.float32)) * s[:, :, None].to(tl.float32)
            return tl.reshape(wf.to(tl.float16), [BLOCK_N, BLOCK_K])

    @triton.jit
    def _load_scale_zero(s_ptr, z_ptr, rn, n_mask, rw, it, NG,
                         G: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        """Scale and zero for the words of one K tile: [BN, 1] when the tile lies in one group."""
        if G % BLOCK_K == 0:
            g = (it * BLOCK_K) // G
            offs = rn[:, None] * NG + g
            if EVEN:
                s = tl.load(s_ptr + offs)
                z = tl.load(z_ptr + offs)
            else:
                s = tl.load(s_ptr + offs, mask=n_mask[:, None], other=0.0)
                z = tl.load(z_ptr + offs, mask=n_mask[:, None], other=0.0)
        else:
            g = (it * (BLOCK_K // 8) + rw) // (G // 8)
            offs = rn[:, None] * NG + g[None, :]
            if EVEN:
                s = tl.load(s_ptr + offs)
                z = tl.load(z_ptr + offs)
            else:
                m = n_mask[:, None] & (g[None, :] < NG)
                s = tl.load(s_ptr + offs, mask=m, other=0.0)
                z = tl.load(z_ptr + offs, mask=m, other=0.0)
        return s, z

    @triton.jit
    def _w4a16_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, ticket_ptr,
        M, N, K, KW, NG, iters_per_split, stride_xm, stride_om,
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_NK: tl.constexpr, EVEN_K: tl.constexpr,
        USE_ASM: tl.constexpr,
    ):
        BKW: tl.constexpr = BLOCK_K // 8
        pid = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_n = pid // SPLIT_K
        pid_k = pid % SPLIT_K
        n_tiles = tl.cdiv(N, BLOCK_N)

        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rw = tl.arange(0, BKW)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        m_mask = rm < M

        total_iters = tl.cdiv(K, BLOCK_K)
        it0 = pid_k * iters_per_split
        it1 = tl.minimum(it0 + iters_per_split, total_iters)

        w_ptrs = qw_ptr + rn[:, None] * KW + rw[None, :]
        x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for it in range(it0, it1):
            if EVEN_NK:
                w = tl.load(w_ptrs + it * BKW)
            else:
                w = tl.load(w_ptrs + it * BKW, mask=n_mask[:, None] & (it * BKW + rw[None, :] < KW), other=0)
            s, z = _load_scale_zero(s_ptr, z_ptr, rn, n_mask, rw, it, NG, G, BLOCK_K, EVEN_NK)
            if EVEN_K:
                xt = tl.load(x_ptrs + it * BLOCK_K, mask=m_mask[None, :], other=0.0)
            else:
                xt = tl.load(x_ptrs + it * BLOCK_K, mask=m_mask[None, :] & (it * BLOCK_K + rk[:, None] < K), other=0.0)
            wt = _dequant_tile(w, s, z, BLOCK_N, BLOCK_K, USE_ASM)
            acc = tl.dot(wt, xt, acc)

        out_mask = n_mask[:, None] & m_mask[None, :]
        out_ptrs = out_ptr + rm[None, :] * stride_om + rn[:, None]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptrs, acc.to(tl.float16), mask=out_mask)
        else:
            ws_ptrs = ws_ptr + rm[None, :] * N + rn[:, None]
            tl.atomic_add(ws_ptrs, acc, mask=out_mask, sem="relaxed")
            # Every thread's partial sums are issued before the ticket is taken; the
            # ticket's release/acquire hands them to the last program.
            tl.debug_barrier()
            ticket = ticket_ptr + pid_m * n_tiles + pid_n
            arrived = tl.atomic_add(ticket, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                # Read through L2 with an exchange, which also leaves zeros for the next call.
                total = tl.atomic_xchg(ws_ptrs, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32),
                                       mask=out_mask, sem="relaxed")
                tl.atomic_xchg(ticket, 0, sem="relaxed")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                tl.store(out_ptrs, total.to(tl.float16), mask=out_mask)

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K,
                        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
        BKW: tl.constexpr = BLOCK_K // 8
        pid_n = tl.program_id(0)
        it = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rw = tl.arange(0, BKW)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        KW = K // 8
        w = tl.load(qw_ptr + rn[:, None] * KW + it * BKW + rw[None, :],
                    mask=n_mask[:, None] & (it * BKW + rw[None, :] < KW), other=0)
        s, z = _load_scale_zero(s_ptr, z_ptr, rn, n_mask, rw, it, K // G, G, BLOCK_K, False)
        wt = _dequant_tile(w, s, z, BLOCK_N, BLOCK_K, USE_ASM)
        tl.store(out_ptr + rn[:, None] * K + it * BLOCK_K + rk[None, :], wt,
                 mask=n_mask[:, None] & (it * BLOCK_K + rk[None, :] < K))

"""W4A16 linear in Triton: fp16 activations times the INT4 row-packed weights of engine/quant.py.

Engines on a GPU where NVRTC is usable run the tensor-core kernel of w4a16_cuda.py instead
(faster at every batch size, see docs/benchmarks.md); these kernels are the fallback, and
the reference that one is measured beside in bench/kernels.py.

    out[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k // G]) * scale[n, k // G]  (+ bias[n])

Decode is bound by memory bandwidth: at ~3 TB/s an H100 streams ~6e12 INT4 weights a
second, which leaves each SM about 5 instructions per weight for everything. Both decode
kernels therefore dequantize in PTX with the fp16 "magic number" trick (0x6400 | q is the
fp16 1024 + q, so one LOP3 turns two nibbles into two fp16 values; integer-to-float
conversions would cost more and run at a quarter rate):

* `gemv` (CUDA cores, M <= 2, up to 4): per packed word, the 8 weights are dequantized and
  multiplied by x in f16x2 arithmetic, the 8 products summed in fp16 (as ExLlama does) and
  the word's sum added to an fp32 accumulator. Nothing leaves the registers. Each extra
  row of x costs ~1.4 instructions per weight, so this kernel serves M <= 2.
* `mma` (tensor cores): the dequantized tile is the A operand of out^T = W @ x^T, so up to
  16 rows of x ride in one MMA N-slot at no extra cost. When a K tile lies inside one
  quantization group, the tile holds q - zero exactly and the scale multiplies the
  tile's partial dot product instead of every weight.

Both split K over programs when N alone gives too few tiles. Split-K partial sums meet in a
per-device fp32 workspace; the last program of each output tile (an atomic ticket) writes
the fp16 result and zeroes the workspace and its ticket again, so one launch does the whole
linear, nothing is allocated per call but the output, and the call is CUDA-graph
capturable. Calls sharing a device must therefore not overlap on two streams.

Prefill with large M dequantizes to fp16 once and calls cuBLAS (`dense`).

Configurations come from a fixed table measured offline with bench/kernels.py (see
docs/dev/kernels-notes.md): nothing is tuned at start-up.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from edgellm.engine.kernels import sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts: the module imports, the kernels do not exist
    triton = None
    tl = None


@dataclasses.dataclass(frozen=True)
class W4A16Config:
    kind: str  # "gemv" | "mma" | "dense"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = True  # gemv: load the next K tile before this one's arithmetic


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_for(n_tiles: int, iters: int, num_sms: int, min_iters: int = 2, waves: int = 4) -> int:
    """Split K until there are ~`waves` programs per SM, keeping >= min_iters K tiles each."""
    split = 1
    while n_tiles * split < waves * num_sms and iters // (split * 2) >= min_iters:
        split *= 2
    return split


def pick_config(m: int, n: int, k: int, group_size: int, num_sms: int = 132) -> W4A16Config:
    """The fixed configuration table, from bench/kernels.py --sweep on an H100
    (docs/dev/kernels-notes.md has the numbers).

    M <= 2: the CUDA-core gemv, K split until ~4 programs per SM. M <= 16: the tensor-core
    kernel, ~2 programs per SM (its extra rows are free, the gemv's are not). Up to M = 256:
    tensor cores with 128 x 128 tiles when those alone fill the GPU, 64 x 64 otherwise.
    Beyond that, dequantizing to fp16 and calling cuBLAS wins (at the cost of an fp16 copy
    of the weight for the duration of the call).
    """
    if m <= 2:
        return W4A16Config("gemv", block_m=m, block_n=64, block_k=128,
                           split_k=_split_for(cdiv(n, 64), cdiv(k, 128), num_sms, waves=4), num_warps=4, num_stages=1)
    if m <= 16:
        return W4A16Config("mma", block_m=16, block_n=64, block_k=128,
                           split_k=_split_for(cdiv(n, 64), cdiv(k, 128), num_sms, waves=2), num_warps=4, num_stages=3)
    if m <= 256:
        if cdiv(n, 128) * cdiv(m, 128) >= num_sms:
            return W4A16Config("mma", block_m=128, block_n=128, block_k=64, split_k=1, num_warps=8, num_stages=3)
        return W4A16Config("mma", block_m=64, block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3)
    return W4A16Config("dense")


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n_acc: int, n_tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed split-K scratch, kept zero by the kernels themselves after every call."""
    acc, tickets = _workspaces.get(device, (None, None))
    if acc is None or acc.numel() < n_acc or tickets.numel() < n_tickets:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "w4a16_linear needs a larger split-K workspace while a CUDA graph is being captured; "
                "run the same shapes once eagerly (warm-up) before capturing"
            )
        # Generous first size, so that warm-up of the smallest shape already serves the rest.
        n_acc = max(n_acc, 8 * 65536, 0 if acc is None else acc.numel())
        n_tickets = max(n_tickets, 16384, 0 if tickets is None else tickets.numel())
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
    if group_size <= 0 or group_size % 8 or k % group_size or tuple(scales.shape) != (n, k // group_size) \
            or zeros.shape != scales.shape:
        raise ValueError(
            f"scales/zeros must be [N, K // group_size] with group_size a multiple of 8 dividing K={k}; "
            f"got group_size={group_size}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}"
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] fp16 @ dequant(qweight)^T (+ bias) -> [M, N] fp16, accumulated in fp32.

    `out` (contiguous [M, N] fp16), when given, receives the result (a static buffer for graphs).
    """
    if triton is None:
        raise RuntimeError("the W4A16 kernels need Triton; on this host use the dequantized weights")
    n, k = _check(x, qweight, scales, zeros, group_size)
    m = x.shape[0]
    # The gemv kernel reads x as int32 pairs: rows must start on even elements.
    if x.stride(1) != 1 or x.stride(0) % 2 or x.data_ptr() % 16:
        x = x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    cfg = config or pick_config(m, n, k, group_size, sm_count(x.device))
    if out is None:
        out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != torch.float16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp16 [{m}, {n}] tensor, got {out.dtype} {tuple(out.shape)}")
    if cfg.kind == "dense":
        w = dequantize_fp16(qweight, scales, zeros, group_size)
        if bias is None:
            return torch.matmul(x, w.t(), out=out)
        return torch.addmm(bias, x, w.t(), out=out)
    if m == 0:
        return out
    if cfg.kind == "gemv" and m > cfg.block_m:
        raise ValueError(f"the gemv kernel was configured for M <= {cfg.block_m}, got M={m}")
    n_tiles = cdiv(n, cfg.block_n)
    m_tiles = cdiv(m, cfg.block_m)
    iters = cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, iters))
    while iters % split:  # equal K slices: the kernel's loop has no ragged end
        split -= 1
    per_split = iters // split
    if split > 1:
        ws, tickets = _workspace(x.device, m * n, n_tiles * m_tiles)
    else:
        ws, tickets = out, out  # not read
    grid = (n_tiles * split, m_tiles)
    # K // 8 and K // G travel as arguments so that Triton sees their divisibility by 16
    # (it specializes integer arguments) and loads 16 bytes per thread.
    args = (x, qweight, scales, zeros, bias if bias is not None else out, out, ws, tickets,
            m, n, k, k // 8, k // group_size, per_split, x.stride(0), out.stride(0))
    common = dict(G=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
                  HAS_BIAS=bias is not None, EVEN_NK=n % cfg.block_n == 0 and k % cfg.block_k == 0,
                  USE_ASM=_use_asm(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.kind == "gemv":
        _gemv_kernel[grid](*args, BLOCK_M=cfg.block_m, EVEN_M=m == cfg.block_m, ASM=_GEMV_ASM[cfg.block_m],
                           PREFETCH=cfg.prefetch, **common)
    elif cfg.kind == "mma":
        _mma_kernel[grid](*args, BLOCK_M=cfg.block_m, **common)
    else:
        raise ValueError(f"unknown W4A16 kernel kind {cfg.kind!r}")
    return out


def dequantize_fp16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp16 weight [N, K] (prefill through cuBLAS; also a check of the unpacking)."""
    if triton is None:
        raise RuntimeError("the dequantization kernel needs Triton")
    n, kw = qweight.shape
    k = kw * 8
    out = torch.empty(n, k, dtype=torch.float16, device=qweight.device)
    block_n, block_k = 32, 256
    grid = (cdiv(n, block_n), cdiv(k, block_k))
    _dequant_kernel[grid](
        qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, n, k, k // 8, k // group_size,
        G=group_size, BLOCK_N=block_n, BLOCK_K=block_k, USE_ASM=_use_asm(), num_warps=4,
    )
    return out


def _use_asm() -> bool:
    # Triton's interpreter (TRITON_INTERPRET=1, used to check the kernels on a CPU) runs
    # no PTX; the plain-Triton dequantization computes the same values.
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _gemv_asm(rows: int) -> str:
    """PTX for one packed word and `rows` rows of x: fp32 sum_i w[i] * x[r, i] per row.

    Operands: $0..$rows-1 the fp32 results; then the word, 1024 + zero and scale (fp16),
    then for each row four registers holding x[8j .. 8j+7] as fp16 pairs.
    """
    w, zc, sc = f"${rows}", f"${rows + 1}", f"${rows + 2}"
    lines = [
        "{",
        ".reg .b32 mg, zz, ss, t, d0, d1, d2, d3, xa0, xa1, xa2, xa3, acc;",
        ".reg .f16 lo, hi;",
        "mov.b32 mg, 0x64006400;",
        f"mov.b32 zz, {{{zc}, {zc}}};",
        f"mov.b32 ss, {{{sc}, {sc}}};",
    ]
    # d_t holds weights t and t + 4 of the word: (1024 + q) - (1024 + zero) is exact, times
    # the scale rounds once, as an fp16 dequantization would.
    for t in range(4):
        src = w
        if t:
            lines.append(f"shr.u32 t, {w}, {4 * t};")
            src = "t"
        lines += [
            f"lop3.b32 t, {src}, 0x000F000F, mg, 0xEA;",
            "sub.rn.f16x2 t, t, zz;",
            f"mul.rn.f16x2 d{t}, t, ss;",
        ]
    for r in range(rows):
        x0, x1, x2, x3 = (f"${rows + 3 + 4 * r + i}" for i in range(4))
        lines += [
            # x pairs in the order of d_t: (x[t], x[t + 4])
            f"prmt.b32 xa0, {x0}, {x2}, 0x5410;",
            f"prmt.b32 xa1, {x0}, {x2}, 0x7632;",
            f"prmt.b32 xa2, {x1}, {x3}, 0x5410;",
            f"prmt.b32 xa3, {x1}, {x3}, 0x7632;",
            "mul.rn.f16x2 acc, d0, xa0;",
            "fma.rn.f16x2 acc, d1, xa1, acc;",
            "fma.rn.f16x2 acc, d2, xa2, acc;",
            "fma.rn.f16x2 acc, d3, xa3, acc;",
            "mov.b32 {lo, hi}, acc;",
            "add.rn.f16 lo, lo, hi;",
            f"cvt.f32.f16 ${r}, lo;",
        ]
    lines.append("}")
    return "\n".join(lines)


def _gemv_constraints(rows: int) -> str:
    return ",".join(["=f"] * rows + ["r", "h", "h"] + ["r"] * (4 * rows))


def _dequant_asm(scaled: bool) -> str:
    """PTX for two words per instance ($8, $9), zero ($10) and scale ($11) as fp16 pairs.

    Output t ($t) holds weight t of both words, so Triton's natural element order is K
    order. (1024 + q) - (1024 + zero) is q - zero exactly; times the scale (when `scaled`)
    rounds once, as an fp16 dequantization would.
    """
    lines = [
        "{",
        ".reg .b32 lo, hi, zz, t, mg;",
        "mov.b32 mg, 0x64006400;",
        "prmt.b32 lo, $8, $9, 0x5410;",  # low halves (weights 0-3) of both words
        "prmt.b32 hi, $8, $9, 0x7632;",  # high halves (weights 4-7)
        "add.rn.f16x2 zz, $10, mg;",
    ]
    for t in range(8):
        src = "lo" if t < 4 else "hi"
        if t % 4:
            lines.append(f"shr.u32 t, {src}, {4 * (t % 4)};")
            src = "t"
        lines.append(f"lop3.b32 t, {src}, 0x000F000F, mg, 0xEA;")
        if scaled:
            lines += ["sub.rn.f16x2 t, t, zz;", f"mul.rn.f16x2 ${t}, t, $11;"]
        else:
            lines.append(f"sub.rn.f16x2 ${t}, t, zz;")
    lines.append("}")
    return "\n".join(lines)


_GEMV_ASM = {rows: _gemv_asm(rows) for rows in (1, 2, 4)}


if triton is not None:
    # Triton kernels may read module globals only when they are constexpr.
    _DEQUANT_ASM_C = tl.constexpr(_dequant_asm(scaled=True))
    _DEQUANT_ZERO_ASM_C = tl.constexpr(_dequant_asm(scaled=False))

    @triton.jit
    def _load_scale_zero(s_ptr, z_ptr, rn, n_mask, rw, it, NG,
                         G: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        """Scale and zero of K tile `it`: [BN, 1] when the tile lies in one group, else per word."""
        if G % BLOCK_K == 0:
            offs = rn[:, None] * NG + (it * BLOCK_K) // G
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
                mask = n_mask[:, None] & (g[None, :] < NG)
                s = tl.load(s_ptr + offs, mask=mask, other=0.0)
                z = tl.load(z_ptr + offs, mask=mask, other=0.0)
        return s, z

    @triton.jit
    def _load_tile(w_ptrs, s_ptr, z_ptr, rn, n_mask, rw, it, KW, NG,
                   G: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        """Packed words [BN, BK // 8] of K tile `it`, with their scales and zeros."""
        if EVEN:
            w = tl.load(w_ptrs + it * (BLOCK_K // 8))
        else:
            w = tl.load(w_ptrs + it * (BLOCK_K // 8),
                        mask=n_mask[:, None] & (it * (BLOCK_K // 8) + rw[None, :] < KW), other=0)
        s, z = _load_scale_zero(s_ptr, z_ptr, rn, n_mask, rw, it, NG, G, BLOCK_K, EVEN)
        return w, s, z

    @triton.jit
    def _x_pairs(xp, mask, MASKED: tl.constexpr):
        """The four int32 x pairs of each word of the tile, as [1, BKW] tensors."""
        if MASKED:
            a = tl.load(xp, mask=mask, other=0)
            b = tl.load(xp + 1, mask=mask, other=0)
            c = tl.load(xp + 2, mask=mask, other=0)
            d = tl.load(xp + 3, mask=mask, other=0)
        else:
            a = tl.load(xp)
            b = tl.load(xp + 1)
            c = tl.load(xp + 2)
            d = tl.load(xp + 3)
        return a[None, :], b[None, :], c[None, :], d[None, :]

    @triton.jit
    def _dequant_plain(w, s, z):
        """int32 words [BN, BKW] -> fp32 weights [BN, BKW, 8] (natural order), no PTX."""
        shifts = tl.arange(0, 8) * 4
        q = (w[:, :, None] >> shifts[None, None, :]) & 0xF
        wf = (q.to(tl.float32) - z[:, :, None].to(tl.float32)) * s[:, :, None].to(tl.float32)
        # fp16 rounding of each weight, as the PTX paths do
        return wf.to(tl.float16).to(tl.float32)

    @triton.jit
    def _dequant_tile(w, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
        """int32 words [BN, BK // 8] -> fp16 [BN, BK] in K order: (q - zero) * scale, or q - zero."""
        if SCALED:
            q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                _DEQUANT_ASM_C, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w, z, s],
                dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        else:
            q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                _DEQUANT_ZERO_ASM_C, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w, z, s],
                dtype=(tl.float16,) * 8, is_pure=True, pack=2)
        # join() appends an innermost axis: the last join picks the lowest bit of the
        # weight index, so the reshape puts weight t of word j at 8j + t.
        even = tl.join(tl.join(q0, q4), tl.join(q2, q6))
        odd = tl.join(tl.join(q1, q5), tl.join(q3, q7))
        return tl.reshape(tl.join(even, odd), [BLOCK_N, BLOCK_K])

    @triton.jit
    def _finish(acc, rn, rm, n_mask, m_mask, pid_n, pid_m, n_tiles, N, stride_om,
                bias_ptr, out_ptr, ws_ptr, ticket_ptr,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """acc [BN, BM] fp32 partial (over this program's K slice) -> out[m, n] fp16."""
        out_mask = n_mask[:, None] & m_mask[None, :]
        out_ptrs = out_ptr + rm[None, :] * stride_om + rn[:, None]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptrs, acc.to(tl.float16), mask=out_mask)
        else:
            ws_ptrs = ws_ptr + rm[None, :] * N + rn[:, None]
            tl.atomic_add(ws_ptrs, acc, mask=out_mask, sem="relaxed")
            # All threads' partial sums are issued before the ticket is taken; the ticket's
            # release/acquire hands them to the program that arrives last.
            tl.debug_barrier()
            ticket = ticket_ptr + pid_m * n_tiles + pid_n
            arrived = tl.atomic_add(ticket, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                # Read through L2 with an exchange, which also leaves zeros for the next call.
                ws_bits = ws_ptr.to(tl.pointer_type(tl.int32)) + rm[None, :] * N + rn[:, None]
                total = tl.atomic_xchg(ws_bits, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32),
                                       mask=out_mask, sem="relaxed").to(tl.float32, bitcast=True)
                tl.atomic_xchg(ticket, 0, sem="relaxed")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                tl.store(out_ptrs, total.to(tl.float16), mask=out_mask)

    @triton.jit
    def _gemv_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, ticket_ptr,
        M, N, K, KW, NG, iters_per_split, stride_xm, stride_om,
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_NK: tl.constexpr, EVEN_M: tl.constexpr,
        USE_ASM: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        BKW: tl.constexpr = BLOCK_K // 8
        pid = tl.program_id(0)
        pid_n = pid // SPLIT_K
        pid_k = pid % SPLIT_K
        n_tiles = tl.cdiv(N, BLOCK_N)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rw = tl.arange(0, BKW)
        n_mask = rn < N
        it0 = pid_k * iters_per_split

        w_ptrs = qw_ptr + rn[:, None] * KW + rw[None, :]
        acc0 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, BKW], dtype=tl.float32)
        last = it0 + iters_per_split - 1
        w_nx, s_nx, z_nx = _load_tile(w_ptrs, s_ptr, z_ptr, rn, n_mask, rw, it0, KW, NG, G, BLOCK_K, EVEN_NK)
        for i in range(0, iters_per_split):
            it = it0 + i
            k_ok = it * BKW + rw < KW
            if PREFETCH:
                # Triton pipelines no loads without a dot: issue the next tile's loads before
                # this tile's arithmetic so that each warp has two tiles in flight.
                w, s, z = w_nx, s_nx, z_nx
                w_nx, s_nx, z_nx = _load_tile(w_ptrs, s_ptr, z_ptr, rn, n_mask, rw, tl.minimum(it + 1, last),
                                              KW, NG, G, BLOCK_K, EVEN_NK)
            else:
                w, s, z = _load_tile(w_ptrs, s_ptr, z_ptr, rn, n_mask, rw, it, KW, NG, G, BLOCK_K, EVEN_NK)
            if USE_ASM:
                zc = (z + 1024.0).to(tl.float16)
                # x as int32 pairs: word j of the tile needs pairs 4j .. 4j + 3 of each row.
                xp = x_ptr.to(tl.pointer_type(tl.int32)) + it * (BLOCK_K // 2) + rw * 4
                xa0, xa1, xa2, xa3 = _x_pairs(xp, k_ok, not EVEN_NK)
                if BLOCK_M == 1:
                    r0 = tl.inline_asm_elementwise(
                        ASM, "=f,r,h,h,r,r,r,r", [w, zc, s, xa0, xa1, xa2, xa3],
                        dtype=tl.float32, is_pure=True, pack=1)
                    acc0 += r0
                elif BLOCK_M == 2:
                    xb0, xb1, xb2, xb3 = _x_pairs(xp + stride_xm // 2, k_ok & (1 < M), not (EVEN_NK and EVEN_M))
                    r0, r1 = tl.inline_asm_elementwise(
                        ASM, "=f,=f,r,h,h,r,r,r,r,r,r,r,r", [w, zc, s, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3],
                        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
                    acc0 += r0
                    acc1 += r1
                else:
                    xb0, xb1, xb2, xb3 = _x_pairs(xp + stride_xm // 2, k_ok & (1 < M), not (EVEN_NK and EVEN_M))
                    xc0, xc1, xc2, xc3 = _x_pairs(xp + stride_xm, k_ok & (2 < M), not (EVEN_NK and EVEN_M))
                    xd0, xd1, xd2, xd3 = _x_pairs(xp + 3 * (stride_xm // 2), k_ok & (3 < M),
                                                  not (EVEN_NK and EVEN_M))
                    r0, r1, r2, r3 = tl.inline_asm_elementwise(
                        ASM, "=f,=f,=f,=f,r,h,h,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                        [w, zc, s, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3, xc0, xc1, xc2, xc3, xd0, xd1, xd2, xd3],
                        dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
                    acc0 += r0
                    acc1 += r1
                    acc2 += r2
                    acc3 += r3
            else:
                wf = _dequant_plain(w, s, z)
                xo = it * BLOCK_K + rw[:, None] * 8 + tl.arange(0, 8)[None, :]
                xk = xo < K
                acc0 += tl.sum(wf * tl.load(x_ptr + xo, mask=xk, other=0.0).to(tl.float32)[None, :, :], axis=2)
                if BLOCK_M >= 2:
                    xv = tl.load(x_ptr + stride_xm + xo, mask=xk & (1 < M), other=0.0).to(tl.float32)
                    acc1 += tl.sum(wf * xv[None, :, :], axis=2)
                if BLOCK_M >= 4:
                    xv = tl.load(x_ptr + 2 * stride_xm + xo, mask=xk & (2 < M), other=0.0).to(tl.float32)
                    acc2 += tl.sum(wf * xv[None, :, :], axis=2)
                    xv = tl.load(x_ptr + 3 * stride_xm + xo, mask=xk & (3 < M), other=0.0).to(tl.float32)
                    acc3 += tl.sum(wf * xv[None, :, :], axis=2)

        rm = tl.arange(0, BLOCK_M)
        if BLOCK_M == 1:
            acc = tl.sum(acc0, axis=1)[:, None]
        elif BLOCK_M == 2:
            acc = tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1))
        else:
            acc = tl.reshape(tl.join(tl.join(tl.sum(acc0, axis=1), tl.sum(acc2, axis=1)),
                                     tl.join(tl.sum(acc1, axis=1), tl.sum(acc3, axis=1))), [BLOCK_N, BLOCK_M])
        _finish(acc, rn, rm, n_mask, rm < M, pid_n, 0, n_tiles, N, stride_om, bias_ptr, out_ptr, ws_ptr,
                ticket_ptr, SPLIT_K, HAS_BIAS, BLOCK_N, BLOCK_M)

    @triton.jit
    def _mma_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, ticket_ptr,
        M, N, K, KW, NG, iters_per_split, stride_xm, stride_om,
        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_NK: tl.constexpr, USE_ASM: tl.constexpr,
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
        it0 = pid_k * iters_per_split

        w_ptrs = qw_ptr + rn[:, None] * KW + rw[None, :]
        x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for i in range(0, iters_per_split):
            it = it0 + i
            if EVEN_NK:
                w = tl.load(w_ptrs + it * BKW)
                xt = tl.load(x_ptrs + it * BLOCK_K, mask=m_mask[None, :], other=0.0)
            else:
                w = tl.load(w_ptrs + it * BKW, mask=n_mask[:, None] & (it * BKW + rw[None, :] < KW), other=0)
                xt = tl.load(x_ptrs + it * BLOCK_K, mask=m_mask[None, :] & (it * BLOCK_K + rk[:, None] < K),
                             other=0.0)
            s, z = _load_scale_zero(s_ptr, z_ptr, rn, n_mask, rw, it, NG, G, BLOCK_K, EVEN_NK)
            if USE_ASM:
                if G % BLOCK_K == 0:
                    # One group per tile: q - zero exactly in the tile, the scale after the dot.
                    wt = _dequant_tile(w, s, z, BLOCK_N, BLOCK_K, False)
                    acc += tl.dot(wt, xt) * s.to(tl.float32)
                else:
                    acc = tl.dot(_dequant_tile(w, s, z, BLOCK_N, BLOCK_K, True), xt, acc)
            else:
                wt = tl.reshape(_dequant_plain(w, s, z), [BLOCK_N, BLOCK_K]).to(tl.float16)
                acc = tl.dot(wt, xt, acc)
        _finish(acc, rn, rm, n_mask, m_mask, pid_n, pid_m, n_tiles, N, stride_om, bias_ptr, out_ptr, ws_ptr,
                ticket_ptr, SPLIT_K, HAS_BIAS, BLOCK_N, BLOCK_M)

    @triton.jit
    def _dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, NG,
                        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
        BKW: tl.constexpr = BLOCK_K // 8
        pid_n = tl.program_id(0)
        it = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rw = tl.arange(0, BKW)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        w = tl.load(qw_ptr + rn[:, None] * KW + it * BKW + rw[None, :],
                    mask=n_mask[:, None] & (it * BKW + rw[None, :] < KW), other=0)
        s, z = _load_scale_zero(s_ptr, z_ptr, rn, n_mask, rw, it, NG, G, BLOCK_K, False)
        if USE_ASM:
            wt = _dequant_tile(w, s, z, BLOCK_N, BLOCK_K, True)
        else:
            wt = tl.reshape(_dequant_plain(w, s, z), [BLOCK_N, BLOCK_K]).to(tl.float16)
        tl.store(out_ptr + rn[:, None] * K + it * BLOCK_K + rk[None, :], wt,
                 mask=n_mask[:, None] & (it * BLOCK_K + rk[None, :] < K))

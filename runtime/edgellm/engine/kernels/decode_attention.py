"""Decode attention over the static KV cache (one new query token per row), in Triton.

    q        [B, Hq, D] fp16          the current token's queries
    k_cache  [S_slots, Hkv, S_max, D] fp16, v_cache alike
    slot_ids [B]                      which cache slot each row uses
    seq_lens [B] int32                valid positions per row, the current token included

Flash-decoding: the sequence is cut into chunks of CHUNK positions; one program handles one
(row, kv head, chunk) and all Hq / Hkv query heads that share that kv head (GQA: the
query heads are the M side of the tile, so K and V are read once per kv head). A second
small kernel merges the chunks' partial softmax results. Only [0, seq_len) of each row is
read: programs whose chunk starts past seq_len return at once.

For CUDA graphs the grid depends only on static sizes (B, Hkv, S_max), never on seq_lens,
which the kernels read from device memory. When S_max fits in one chunk the first kernel
writes the output itself and the merge is skipped.
"""

from __future__ import annotations

import torch

from edgellm.engine.kernels import pdl, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts: the module imports, the kernels do not exist
    triton = None
    tl = None


def pick_chunk(batch: int, kv_heads: int, max_seq: int, num_sms: int = 132, block_s: int = 64) -> int:
    """Sequence positions per program: enough (row, kv head, chunk) programs to fill the GPU
    at full length, and no more than ~4 per SM so that chunks stay long and the merge cheap."""
    chunk = block_s * 2
    while batch * kv_heads * triton_cdiv(max_seq, chunk) > 4 * num_sms and chunk < 8192:
        chunk *= 2
    return chunk


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    chunk: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over positions [0, seq_lens[b]) of slot slot_ids[b] -> [B, Hq, D]."""
    if triton is None:
        raise RuntimeError("decode_attention needs Triton; on this host use the reference attention")
    b, hq, d = q.shape
    n_slots, hkv, s_max, d_k = k_cache.shape
    if d_k != d or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(
            f"expected q [B, Hq, D] and caches [slots, Hkv, S_max, D] with Hq a multiple of Hkv; "
            f"got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    if d != triton.next_power_of_2(d) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if q.dtype != torch.float16 or k_cache.dtype != torch.float16 or v_cache.dtype != torch.float16:
        raise ValueError("q and the caches must be fp16")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must be contiguous in D and share strides")
    q = q.contiguous()
    group = hq // hkv
    block_g = max(16, triton.next_power_of_2(group))  # the tensor-core M side
    block_s = 64 if d <= 64 else 32 if block_g > 16 else 64
    if chunk is None:
        chunk = pick_chunk(b, hkv, s_max, sm_count(q.device), block_s)
    chunk = max(block_s, triton_cdiv(chunk, block_s) * block_s)
    n_chunks = triton_cdiv(s_max, chunk)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be an fp16 {tuple(q.shape)} tensor contiguous in D")
    if b == 0:
        return out
    single = n_chunks == 1
    if single:
        part_o, part_ml = out, out  # not used
    else:
        # Fixed-size scratch (allocated per call; inside a captured graph it is the graph's).
        part_o = torch.empty(b, hq, n_chunks, d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(b, hq, n_chunks, 2, dtype=torch.float32, device=q.device)
    sk = k_cache.stride()
    early = pdl.triton_options(q.device)
    _attn_chunk_kernel[(b * hkv, n_chunks)](
        q, k_cache, v_cache, slot_ids, seq_lens, out, part_o, part_ml,
        q.stride(0), q.stride(1), sk[0], sk[1], sk[2],
        out.stride(0), out.stride(1), scale * 1.4426950408889634,
        HKV=hkv, GROUP=group, D=d, BLOCK_G=block_g, BLOCK_S=block_s, CHUNK=chunk,
        N_CHUNKS=n_chunks, SINGLE=single, num_warps=4, num_stages=3, **early,
    )
    if not single:
        _attn_merge_kernel[(b * hq,)](
            part_o, part_ml, seq_lens, out, hq, out.stride(0), out.stride(1),
            D=d, CHUNK=chunk, N_CHUNKS=n_chunks, BLOCK_C=triton.next_power_of_2(n_chunks), num_warps=4, **early,
        )
    return out


if triton is not None:

    @triton.jit
    def _attn_chunk_kernel(
        q_ptr, k_ptr, v_ptr, slot_ptr, len_ptr, out_ptr, part_o_ptr, part_ml_ptr,
        stride_qb, stride_qh, stride_kslot, stride_kh, stride_ks,
        stride_ob, stride_oh, qk_scale,
        HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, SINGLE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl.start(PDL)
        pid = tl.program_id(0)
        c = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        seq_len = tl.load(len_ptr + b).to(tl.int32)
        start = c * CHUNK
        if start < seq_len:
            slot = tl.load(slot_ptr + b).to(tl.int64)
            rg = tl.arange(0, BLOCK_G)
            rd = tl.arange(0, D)
            rs = tl.arange(0, BLOCK_S)
            g_mask = rg < GROUP
            q = tl.load(q_ptr + b * stride_qb + (h * GROUP + rg[:, None]) * stride_qh + rd[None, :],
                        mask=g_mask[:, None], other=0.0)
            kv_off = slot * stride_kslot + h * stride_kh
            k_ptrs = k_ptr + kv_off + rs[None, :] * stride_ks + rd[:, None]  # [D, BLOCK_S]
            v_ptrs = v_ptr + kv_off + rs[:, None] * stride_ks + rd[None, :]  # [BLOCK_S, D]
            m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
            end = tl.minimum(start + CHUNK, seq_len)
            for s0 in range(start, end, BLOCK_S):
                s_mask = s0 + rs < end
                kt = tl.load(k_ptrs + s0 * stride_ks, mask=s_mask[None, :], other=0.0)
                v = tl.load(v_ptrs + s0 * stride_ks, mask=s_mask[:, None], other=0.0)
                scores = tl.dot(q, kt) * qk_scale  # log2 domain
                scores = tl.where(s_mask[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
                m_i = m_new
            hq = h * GROUP + rg
            if SINGLE:
                o = acc / l_i[:, None]
                tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + rd[None, :], o.to(tl.float16),
                         mask=g_mask[:, None])
            else:
                row = (b * (HKV * GROUP) + hq) * N_CHUNKS + c
                tl.store(part_o_ptr + row[:, None] * D + rd[None, :], acc, mask=g_mask[:, None])
                tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
                tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)
        elif SINGLE:
            if c == 0:
                # seq_len == 0 (an idle slot): defined output instead of 0/0.
                rg = tl.arange(0, BLOCK_G)
                rd = tl.arange(0, D)
                hq = h * GROUP + rg
                tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + rd[None, :],
                         tl.zeros([BLOCK_G, D], dtype=tl.float16), mask=(rg < GROUP)[:, None])

    @triton.jit
    def _attn_merge_kernel(
        part_o_ptr, part_ml_ptr, len_ptr, out_ptr, HQ, stride_ob, stride_oh,
        D: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pdl.start(PDL)
        pid = tl.program_id(0)
        b = pid // HQ
        h = pid % HQ
        seq_len = tl.load(len_ptr + b).to(tl.int32)
        n_valid = (seq_len + CHUNK - 1) // CHUNK
        rc = tl.arange(0, BLOCK_C)
        rd = tl.arange(0, D)
        c_mask = rc < n_valid
        row = pid * N_CHUNKS + rc
        m = tl.load(part_ml_ptr + row * 2, mask=c_mask, other=float("-inf"))
        l = tl.load(part_ml_ptr + row * 2 + 1, mask=c_mask, other=0.0)
        o = tl.load(part_o_ptr + row[:, None] * D + rd[None, :], mask=c_mask[:, None], other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(c_mask, tl.exp2(m - m_max), 0.0)
        denom = tl.sum(l * w, axis=0)
        res = tl.sum(o * w[:, None], axis=0)
        res = tl.where(denom > 0, res / denom, 0.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rd, res.to(tl.float16))

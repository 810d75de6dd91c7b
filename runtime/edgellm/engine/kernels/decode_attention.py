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

`decode_attention_rope` is the decode step's whole attention in ONE launch per layer
(before it, the rotary embedding + KV write, the chunks and the merge were three kernels of
~2-5 us each, mostly latency). It starts from the fused q|k|v projection output:

* each program ropes the GROUP query heads it needs itself (a few hundred bytes);
* the program whose chunk holds the new token's position ropes its k, writes k and v into
  the cache with the arithmetic of fused.rope_and_write_kv (the same bits), and waits on a
  block barrier so that its own loads below see them;
* the merge is done by the last of the row's valid chunks to finish: each stores its
  partial (acc, m, l), then increments a per-(row, kv head) counter with an acq_rel atomic;
  the program that sees the count reach n_valid - 1 reads the others' partials (past L1,
  which is not coherent across SMs), writes the output and puts the counter back to zero,
  so the caller's counters need no reset between calls or graph replays. Sequences that fit
  in one chunk write the output directly and touch neither partials nor counters.

Triton's interpreter cannot loop over runtime bounds (numpy 2), so under it the loops run to
their static bounds (CHUNK, N_CHUNKS) with the same masks; compiled for the GPU they stop at
the row's sequence length, as the chunk kernel's loop does.
"""

from __future__ import annotations

import os

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


def _tiles(b: int, hq: int, hkv: int, d: int, s_max: int, device, chunk: int | None) -> tuple[int, int, int, int, int]:
    """(group, block_g, block_s, chunk, n_chunks) of the decode attention kernels."""
    group = hq // hkv
    block_g = max(16, triton.next_power_of_2(group))  # the tensor-core M side
    block_s = 64 if d <= 64 else 32 if block_g > 16 else 64
    if chunk is None:
        chunk = pick_chunk(b, hkv, s_max, sm_count(device), block_s)
    chunk = max(block_s, triton_cdiv(chunk, block_s) * block_s)
    return group, block_g, block_s, chunk, triton_cdiv(s_max, chunk)


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    group, block_g, block_s, chunk, n_chunks = _tiles(b, hq, hkv, d, s_max, q.device, chunk)
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


def decode_attention_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    counters: torch.Tensor,
    partials: torch.Tensor | None = None,
    chunk: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A decode step's attention in one launch: rotary embedding of q and k from the fused
    projection output, k and v of the new token written into the caches (what
    fused.rope_and_write_kv writes), and softmax(q k^T * scale) v over positions
    [0, positions[b]] of cache row slots[b] -> [B, Hq, D] fp16.

    qkv [B, (Hq + 2 Hkv) * D] fp16, contiguous in the last axis; positions [B] or [B, 1]
    (the new token's position: seq_len = position + 1); slots [B]; cos/sin float32
    [S_max, D] in the rotate-half convention; caches [rows, Hkv, S_max, D] fp16.
    counters: int32, at least B * Hkv elements, all zero; they are zero again when the kernel
    ends, so one tensor serves every layer and graph replay on a stream (not two launches
    running at once). partials: float32 scratch of at least B * Hq * n_chunks * (D + 2)
    elements (n_chunks = cdiv(S_max, chunk)); allocated here when None. Neither is used when
    S_max fits in one chunk."""
    if triton is None:
        raise RuntimeError("decode_attention_rope needs Triton; on this host use the reference attention")
    n_slots, hkv, s_max, d = k_cache.shape
    hq = num_heads
    if hkv != num_kv_heads or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(
            f"expected caches [slots, Hkv={num_kv_heads}, S_max, D] and Hq={hq} a multiple of Hkv; "
            f"got k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    if d != triton.next_power_of_2(d) or d < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if qkv.dim() != 2 or qkv.shape[1] != (hq + 2 * hkv) * d or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [B, (Hq + 2 Hkv) * D] = [B, {(hq + 2 * hkv) * d}] contiguous in the last axis, "
                         f"got {tuple(qkv.shape)}")
    b = qkv.shape[0]
    if positions.numel() != b or positions.shape[0] != b or slots.shape != (b,):
        raise ValueError(f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must be [B] (or [B, 1]) "
                         f"and [B] for B = {b}")
    if qkv.dtype != torch.float16 or k_cache.dtype != torch.float16 or v_cache.dtype != torch.float16:
        raise ValueError("qkv and the caches must be fp16")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must be contiguous in D and share strides")
    if (cos.dtype != torch.float32 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != d
            or cos.stride(1) != 1 or cos.stride() != sin.stride()):
        raise ValueError(f"cos and sin must be float32 [S_max, D={d}] tables with the same strides, "
                         f"got {tuple(cos.shape)} {cos.dtype} and {tuple(sin.shape)}")
    if counters.dtype != torch.int32 or counters.numel() < b * hkv or not counters.is_contiguous():
        raise ValueError(f"counters must be a contiguous int32 tensor of at least B * Hkv = {b * hkv} elements")
    group, block_g, block_s, chunk, n_chunks = _tiles(b, hq, hkv, d, s_max, qkv.device, chunk)
    if out is None:
        out = torch.empty(b, hq, d, dtype=qkv.dtype, device=qkv.device)
    elif out.shape != (b, hq, d) or out.dtype != torch.float16 or out.stride(-1) != 1:
        raise ValueError(f"out must be an fp16 {(b, hq, d)} tensor contiguous in D")
    if b == 0:
        return out
    positions, slots = positions.reshape(b).contiguous(), slots.contiguous()  # no-ops on the engine's own inputs
    single = n_chunks == 1
    if single:
        part_o, part_ml = out, out  # not used: the one chunk writes the output
    else:
        n_o = b * hq * n_chunks * d
        if partials is None:
            # Fixed-size scratch (allocated per call; inside a captured graph it is the graph's).
            partials = torch.empty(n_o + b * hq * n_chunks * 2, dtype=torch.float32, device=qkv.device)
        elif (partials.dtype != torch.float32 or not partials.is_contiguous()
              or partials.numel() < n_o + b * hq * n_chunks * 2):
            raise ValueError(f"partials must be a contiguous float32 tensor of at least B * Hq * n_chunks * (D + 2) = "
                             f"{n_o + b * hq * n_chunks * 2} elements (n_chunks = {n_chunks})")
        partials = partials.view(-1)
        part_o, part_ml = partials[:n_o], partials[n_o:]  # acc [B, Hq, n_chunks, D], then (m, l)
    block_h = triton.next_power_of_2(group)
    # The merge reads [heads, chunks, D] fp32 tiles: at most 8192 values (64 registers a thread).
    merge_c = max(1, min(triton.next_power_of_2(n_chunks), 8192 // (block_h * d)))
    sk = k_cache.stride()
    _attn_rope_kernel[(b * hkv, n_chunks)](
        qkv, positions, slots, cos, sin, k_cache, v_cache, out, part_o, part_ml, counters,
        qkv.stride(0), cos.stride(0), sk[0], sk[1], sk[2], out.stride(0), out.stride(1),
        scale * 1.4426950408889634,
        HQ=hq, HKV=hkv, GROUP=group, D=d, BLOCK_G=block_g, BLOCK_S=block_s, CHUNK=chunk, N_CHUNKS=n_chunks,
        BLOCK_H=block_h, MERGE_C=merge_c, INTERPRET=_interpreting(), num_warps=4, num_stages=3,
        **pdl.triton_options(qkv.device),
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

    @triton.jit
    def _attn_rope_kernel(
        qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_ml_ptr, count_ptr,
        stride_t, stride_cos, stride_kslot, stride_kh, stride_ks, stride_ob, stride_oh, qk_scale,
        HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, BLOCK_H: tl.constexpr,
        MERGE_C: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl.start(PDL)
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        c = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        pos = tl.load(pos_ptr + b).to(tl.int32)
        seq_len = pos + 1
        start = c * CHUNK
        if start < seq_len:
            slot = tl.load(slot_ptr + b).to(tl.int64)
            row = qkv_ptr + b.to(tl.int64) * stride_t  # this row's q heads, then k heads, then v heads
            kv_off = slot * stride_kslot + h * stride_kh
            rd = tl.arange(0, D)
            if pos < start + CHUNK:
                # The new token is in this chunk: rope its k and write k and v into the cache,
                # with fused._rope_kv_kernel's arithmetic (the caches hold the same bits).
                rh = tl.arange(0, HALF)
                cs = tl.load(cos_ptr + pos * stride_cos + rh)
                sn = tl.load(sin_ptr + pos * stride_cos + rh)
                x1 = tl.load(row + (HQ + h) * D + rh).to(tl.float32)
                x2 = tl.load(row + (HQ + h) * D + HALF + rh).to(tl.float32)
                dst = kv_off + pos * stride_ks
                tl.store(k_ptr + dst + rh, (x1 * cs - x2 * sn).to(tl.float16))
                tl.store(k_ptr + dst + HALF + rh, (x2 * cs + x1 * sn).to(tl.float16))
                tl.store(v_ptr + dst + rd, tl.load(row + (HQ + HKV + h) * D + rd))
                # Other threads of this block load those rows in the loop below: a block barrier
                # orders their loads after the stores.
                tl.debug_barrier()
            # The GROUP query heads of kv head h, roped: x * cos + rotate_half(x) * sin, with
            # rotate_half(x) = [-x2, x1] read as the other half of each head.
            rg = tl.arange(0, BLOCK_G)
            g_mask = rg < GROUP
            q_row = row + (h * GROUP + rg[:, None]) * D
            x = tl.load(q_row + rd[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
            x_other = tl.load(q_row + ((rd + HALF) % D)[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
            rotated = tl.where(rd[None, :] < HALF, -x_other, x_other)
            cs_d = tl.load(cos_ptr + pos * stride_cos + rd)
            sn_d = tl.load(sin_ptr + pos * stride_cos + rd)
            q = (x * cs_d[None, :] + rotated * sn_d[None, :]).to(tl.float16)

            rs = tl.arange(0, BLOCK_S)
            k_ptrs = k_ptr + kv_off + rs[None, :] * stride_ks + rd[:, None]  # [D, BLOCK_S]
            v_ptrs = v_ptr + kv_off + rs[:, None] * stride_ks + rd[None, :]  # [BLOCK_S, D]
            m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
            end = tl.minimum(start + CHUNK, seq_len)
            # The interpreter needs static loop bounds (the masks do the rest); compiled, the
            # loop stops at the sequence's end.
            for s0 in range(0, CHUNK if INTERPRET else end - start, BLOCK_S):
                s_mask = start + s0 + rs < end
                kt = tl.load(k_ptrs + (start + s0) * stride_ks, mask=s_mask[None, :], other=0.0)
                v = tl.load(v_ptrs + (start + s0) * stride_ks, mask=s_mask[:, None], other=0.0)
                scores = tl.dot(q, kt) * qk_scale  # log2 domain
                scores = tl.where(s_mask[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
                m_i = m_new

            hq = h * GROUP + rg
            n_valid = (seq_len + CHUNK - 1) // CHUNK  # chunks holding part of the sequence
            if n_valid == 1:
                # The whole sequence is in this chunk (always so when N_CHUNKS == 1): no merge.
                o = acc / l_i[:, None]
                tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + rd[None, :], o.to(tl.float16),
                         mask=g_mask[:, None])
            elif N_CHUNKS > 1:
                part = (b * HQ + hq) * N_CHUNKS + c
                tl.store(part_o_ptr + part[:, None] * D + rd[None, :], acc, mask=g_mask[:, None])
                tl.store(part_ml_ptr + part * 2, m_i, mask=g_mask)
                tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_mask)
                # One thread issues the atomic: the barrier puts every thread's partial stores
                # before it, and its release makes them visible, at GPU scope, to the program
                # whose acquire reads the final count.
                tl.debug_barrier()
                done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
                if done == n_valid - 1:
                    # The last of this (row, kv head)'s chunks: merge them all as
                    # _attn_merge_kernel does, for the GROUP heads at once.
                    rh = tl.arange(0, BLOCK_H)
                    # Padding rows (GROUP not a power of two) re-read the last head: finite
                    # maxima, no NaN; they are not stored.
                    heads = b * HQ + h * GROUP + tl.minimum(rh, GROUP - 1)
                    rc = tl.arange(0, MERGE_C)
                    m_run = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
                    l_run = tl.zeros([BLOCK_H], dtype=tl.float32)
                    o_run = tl.zeros([BLOCK_H, D], dtype=tl.float32)
                    for c0 in tl.range(0, N_CHUNKS if INTERPRET else n_valid, MERGE_C, num_stages=1):
                        cc = c0 + rc
                        c_mask = cc < n_valid
                        prow = heads[:, None] * N_CHUNKS + cc[None, :]  # [BLOCK_H, MERGE_C]
                        # .cg: other SMs wrote these; this SM's L1 may hold stale lines.
                        m = tl.load(part_ml_ptr + prow * 2, mask=c_mask[None, :], other=float("-inf"),
                                    cache_modifier=".cg")
                        l = tl.load(part_ml_ptr + prow * 2 + 1, mask=c_mask[None, :], other=0.0, cache_modifier=".cg")
                        o = tl.load(part_o_ptr + prow[:, :, None] * D + rd[None, None, :], mask=c_mask[None, :, None],
                                    other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m_run, tl.max(m, axis=1))
                        alpha = tl.exp2(m_run - m_new)
                        w = tl.where(c_mask[None, :], tl.exp2(m - m_new[:, None]), 0.0)
                        l_run = l_run * alpha + tl.sum(l * w, axis=1)
                        o_run = o_run * alpha[:, None] + tl.sum(o * w[:, :, None], axis=1)
                        m_run = m_new
                    res = o_run / l_run[:, None]
                    tl.store(out_ptr + b * stride_ob + (h * GROUP + rh)[:, None] * stride_oh + rd[None, :],
                             res.to(tl.float16), mask=(rh < GROUP)[:, None])
                    # Every valid chunk has counted: ready for the next call (or graph replay).
                    tl.store(count_ptr + pid, 0)

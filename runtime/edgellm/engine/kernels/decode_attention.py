"""Decode attention over the static KV cache, one launch per layer and step, in Triton.

`decode_attention_rope` starts from the fused q|k|v projection output of the new token
and does the step's whole attention (before it, the rotary embedding + KV write, the
flash-decoding chunks and their merge were three kernels of ~2-5 us each, mostly latency):

* flash-decoding: each (row, kv head) is cut into `splits` programs; one program handles
  one (row, kv head, split) and all Hq / Hkv query heads that share that kv head (GQA: the
  query heads are the M side of the tile, so K and V are read once per kv head);
* the splits share the row's *current* length, not the cache's: chunk = seq_len / splits
  rounded up to the tile (BLOCK_S). A 512-token row at splits 32 is 8 chunks of 64, a
  4096-token row 32 chunks of 128. The grid depends only on static sizes (B, Hkv,
  splits), as a CUDA graph needs, and every program that has positions to read gets an
  equal share; only [0, seq_len) of each row is read;
* each program ropes the GROUP query heads it needs itself (a few hundred bytes);
* the cache is read only before the new token's position, so a program requests its first
  K/V tile before it waits for the q|k|v projection (early start); the program whose chunk
  holds the new token ropes its k, writes k and v into the cache with the arithmetic of
  fused.rope_and_write_kv (the same bits), and adds that token to its softmax from registers;
* the merge is done by the last of the row's valid chunks to finish: each stores its
  partial (acc, m, l), then increments a per-(row, kv head) counter with an acq_rel atomic;
  the program that sees the count reach n_valid - 1 reads the others' partials (past L1,
  which is not coherent across SMs), writes the output and puts the counter back to zero,
  so the caller's counters need no reset between calls or graph replays. Rows that fit in
  one chunk write the output directly and touch neither partials nor counters.

Triton's interpreter cannot loop over runtime bounds (numpy 2), so under it the loops run to
their static bounds (MAX_CHUNK, SPLITS) with the same masks; compiled for the GPU they stop
at the row's sequence length.
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


def pick_splits(batch: int, kv_heads: int, max_seq: int, num_sms: int = 132, block_s: int = 64,
                head_dim: int = 128) -> int:
    """Programs per (row, kv head): a power of two with batch * kv_heads * splits at most
    256 / head_dim per SM (2 at head dim 128, 4 at 64: the same K/V tile bytes per SM), and no
    more than the cache has tiles. Measured inside the decode graph on an H200, where the kernel
    starts early beside the q|k|v projection (bench/ab_decode.py, EDGELLM_ATTN_PROGRAMS_PER_SM,
    docs/benchmarks.md): against one program per SM, which had been the fastest alone (H100),
    at context 4000 two per SM took the 8B step from 2.227 / 3.063 / 4.031 ms to 2.205 / 2.946 /
    3.705 at batch 1 / 4 / 8 and four per SM the 1B step from 0.712 / 1.054 / 1.444 to 0.669 /
    0.857 / 1.074; four per SM at head dim 128 lost at batch 1 (2.326 ms: 64 chunks to merge).
    EDGELLM_ATTN_PROGRAMS_PER_SM overrides the programs per SM, for measuring."""
    per_sm = os.environ.get("EDGELLM_ATTN_PROGRAMS_PER_SM")
    programs = num_sms * (int(per_sm) if per_sm else max(1, 256 // head_dim))
    splits = 1
    while batch * kv_heads * splits * 2 <= programs and splits * 2 * block_s <= max_seq:
        splits *= 2
    return splits


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(hq: int, hkv: int, d: int) -> tuple[int, int, int]:
    """(group, block_g, block_s) of the decode attention kernel."""
    group = hq // hkv
    block_g = max(16, triton.next_power_of_2(group))  # the tensor-core M side
    block_s = 64 if d <= 64 else 32 if block_g > 16 else 64
    return group, block_g, block_s


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    splits: int | None = None,
    out: torch.Tensor | None = None,
    min_chunk: int | None = None,
) -> torch.Tensor:
    """A decode step's attention in one launch: rotary embedding of q and k from the fused
    projection output, k and v of the new token written into the caches (what
    fused.rope_and_write_kv writes), and softmax(q k^T * scale) v over positions
    [0, positions[b]] of cache row slots[b] -> [B, Hq, D] fp16.

    qkv [B, (Hq + 2 Hkv) * D] fp16, contiguous in the last axis; positions [B] or [B, 1]
    (the new token's position: seq_len = position + 1); slots [B]; cos/sin float32
    [S_max, D] in the rotate-half convention; caches [rows, Hkv, S_max, D] fp16. Launched to
    start early (kernels/pdl.py), the kernel reads positions, slots, cos, sin and the caches
    before each row's position before it waits for the kernel launched just before it: that
    kernel must not write them (in the engine they are the decode step's inputs, written
    before the step, and the caches of earlier steps).
    counters: int32, at least B * Hkv elements, all zero; they are zero again when the kernel
    ends, so one tensor serves every layer and graph replay on a stream (not two launches
    running at once). splits: programs per (row, kv head), each taking an equal share of
    the row's sequence, and at least min_chunk positions (None: one tile of the kernel; a
    larger min_chunk gives a short row fewer programs, each with more of it). partials: float32 scratch of at least
    B * Hq * splits * (D + 2) elements; allocated here when None. Neither partials nor
    counters are used when splits is 1."""
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
    group, block_g, block_s = _tiles(hq, hkv, d)
    if splits is None:
        splits = pick_splits(b, hkv, s_max, sm_count(qkv.device), block_s, d)
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    min_chunk = block_s if min_chunk is None else triton_cdiv(min_chunk, block_s) * block_s
    if out is None:
        out = torch.empty(b, hq, d, dtype=qkv.dtype, device=qkv.device)
    elif out.shape != (b, hq, d) or out.dtype != torch.float16 or out.stride(-1) != 1:
        raise ValueError(f"out must be an fp16 {(b, hq, d)} tensor contiguous in D")
    if b == 0:
        return out
    positions, slots = positions.reshape(b).contiguous(), slots.contiguous()  # no-ops on the engine's own inputs
    if splits == 1:
        part_o, part_ml = out, out  # not used: the one chunk writes the output
    else:
        n_o = b * hq * splits * d
        if partials is None:
            # Fixed-size scratch (allocated per call; inside a captured graph it is the graph's).
            partials = torch.empty(n_o + b * hq * splits * 2, dtype=torch.float32, device=qkv.device)
        elif (partials.dtype != torch.float32 or not partials.is_contiguous()
              or partials.numel() < n_o + b * hq * splits * 2):
            raise ValueError(f"partials must be a contiguous float32 tensor of at least B * Hq * splits * (D + 2) = "
                             f"{n_o + b * hq * splits * 2} elements (splits = {splits})")
        partials = partials.view(-1)
        part_o, part_ml = partials[:n_o], partials[n_o:]  # acc [B, Hq, splits, D], then (m, l)
    block_h = triton.next_power_of_2(group)
    # The merge reads [heads, chunks, D] fp32 tiles: at most 8192 values (64 registers a thread).
    merge_c = max(1, min(triton.next_power_of_2(splits), 8192 // (block_h * d)))
    sk = k_cache.stride()
    _attn_rope_kernel[(b * hkv, splits)](
        qkv, positions, slots, cos, sin, k_cache, v_cache, out, part_o, part_ml, counters,
        qkv.stride(0), cos.stride(0), sk[0], sk[1], sk[2], out.stride(0), out.stride(1),
        scale * 1.4426950408889634,
        HQ=hq, HKV=hkv, GROUP=group, D=d, BLOCK_G=block_g, BLOCK_S=block_s, SPLITS=splits,
        MIN_CHUNK=min_chunk, MAX_CHUNK=max(min_chunk, triton_cdiv(triton_cdiv(s_max, splits), block_s) * block_s),
        BLOCK_H=block_h, MERGE_C=merge_c, INTERPRET=_interpreting(), num_warps=4, num_stages=3,
        # The next kernel (the o projection) may start once every program has passed its wait
        # (NEXT_EARLY) or only as programs end: EDGELLM_ATTN_NEXT_EARLY=0 measures the second.
        NEXT_EARLY=os.environ.get("EDGELLM_ATTN_NEXT_EARLY", "1") != "0",
        **pdl.triton_options(qkv.device),
    )
    return out


if triton is not None:

    @triton.jit
    def _attn_rope_kernel(
        qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_ml_ptr, count_ptr,
        stride_t, stride_cos, stride_kslot, stride_kh, stride_ks, stride_ob, stride_oh, qk_scale,
        HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr, MAX_CHUNK: tl.constexpr,
        BLOCK_H: tl.constexpr,
        MERGE_C: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr, NEXT_EARLY: tl.constexpr,
    ):
        HALF: tl.constexpr = D // 2
        pid = tl.program_id(0)
        c = tl.program_id(1)
        b = pid // HKV
        h = pid % HKV
        # Under early start (PDL) the step's inputs (positions, slots: written before the step's
        # first kernel) and the rotary tables are read before waiting for the previous kernel
        # (the q|k|v projection), so that only its output is waited on; programs with no part
        # of the sequence end without waiting.
        pos = tl.load(pos_ptr + b).to(tl.int32)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        seq_len = pos + 1
        # This row's chunk: an equal share of its current length, whole tiles, at least MIN_CHUNK.
        chunk = tl.maximum(tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_S) * BLOCK_S, MIN_CHUNK)
        start = c * chunk
        if start < seq_len:
            rd = tl.arange(0, D)
            cs_d = tl.load(cos_ptr + pos * stride_cos + rd)
            sn_d = tl.load(sin_ptr + pos * stride_cos + rd)
            end = tl.minimum(start + chunk, seq_len)
            # Positions [start, cached_end) come from the cache; the new token's (pos), if in this
            # chunk, from the q|k|v projection, in registers. So the cache tiles depend on no
            # kernel of this step: the first is requested before the wait, beside the projection.
            cached_end = tl.minimum(end, pos)
            kv_off = slot * stride_kslot + h * stride_kh
            rs = tl.arange(0, BLOCK_S)
            k_ptrs = k_ptr + kv_off + rs[None, :] * stride_ks + rd[:, None]  # [D, BLOCK_S]
            v_ptrs = v_ptr + kv_off + rs[:, None] * stride_ks + rd[None, :]  # [BLOCK_S, D]
            s_mask = start + rs < cached_end
            kt = tl.load(k_ptrs + start * stride_ks, mask=s_mask[None, :], other=0.0)
            v = tl.load(v_ptrs + start * stride_ks, mask=s_mask[:, None], other=0.0)
            if PDL:
                tl.extra.cuda.gdc_wait()
                if NEXT_EARLY:
                    tl.extra.cuda.gdc_launch_dependents()
            row = qkv_ptr + b.to(tl.int64) * stride_t  # this row's q heads, then k heads, then v heads
            # The GROUP query heads of kv head h, roped: x * cos + rotate_half(x) * sin, with
            # rotate_half(x) = [-x2, x1] read as the other half of each head.
            rg = tl.arange(0, BLOCK_G)
            g_mask = rg < GROUP
            q_row = row + (h * GROUP + rg[:, None]) * D
            x = tl.load(q_row + rd[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
            x_other = tl.load(q_row + ((rd + HALF) % D)[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
            rotated = tl.where(rd[None, :] < HALF, -x_other, x_other)
            q = (x * cs_d[None, :] + rotated * sn_d[None, :]).to(tl.float16)

            # A finite start for the running maximum: a chunk may have no cached position (the new
            # token first in it), and the interpreter runs the loop over fully masked tiles, where
            # -inf - -inf would be NaN; from the first real score on, the results are the same.
            m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
            # The interpreter needs static loop bounds (the masks do the rest); compiled, the
            # loop stops at the cached part's end. Each pass requests the next tile.
            for s0 in range(0, MAX_CHUNK if INTERPRET else cached_end - start, BLOCK_S):
                s_mask = start + s0 + rs < cached_end
                scores = tl.dot(q, kt) * qk_scale  # log2 domain
                scores = tl.where(s_mask[None, :], scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
                m_i = m_new
                next_mask = start + s0 + BLOCK_S + rs < cached_end
                kt = tl.load(k_ptrs + (start + s0 + BLOCK_S) * stride_ks, mask=next_mask[None, :], other=0.0)
                v = tl.load(v_ptrs + (start + s0 + BLOCK_S) * stride_ks, mask=next_mask[:, None], other=0.0)
            if pos < end:
                # The new token is in this chunk: rope its k and write k and v into the cache
                # with fused._rope_kv_kernel's arithmetic (the caches hold the same bits), and add
                # it to the softmax as one more column from registers, with the tiles' rounding
                # (p to fp16 before it meets v). Its score takes q by halves, roped likewise.
                rh = tl.arange(0, HALF)
                cs = tl.load(cos_ptr + pos * stride_cos + rh)
                sn = tl.load(sin_ptr + pos * stride_cos + rh)
                x1 = tl.load(row + (HQ + h) * D + rh).to(tl.float32)
                x2 = tl.load(row + (HQ + h) * D + HALF + rh).to(tl.float32)
                k1 = (x1 * cs - x2 * sn).to(tl.float16)
                k2 = (x2 * cs + x1 * sn).to(tl.float16)
                v_new = tl.load(row + (HQ + HKV + h) * D + rd)
                dst = kv_off + pos * stride_ks
                tl.store(k_ptr + dst + rh, k1)
                tl.store(k_ptr + dst + HALF + rh, k2)
                tl.store(v_ptr + dst + rd, v_new)
                q1x = tl.load(q_row + rh[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
                q2x = tl.load(q_row + HALF + rh[None, :], mask=g_mask[:, None], other=0.0).to(tl.float32)
                q1 = (q1x * cs[None, :] - q2x * sn[None, :]).to(tl.float16).to(tl.float32)
                q2 = (q2x * cs[None, :] + q1x * sn[None, :]).to(tl.float16).to(tl.float32)
                score = (tl.sum(q1 * k1.to(tl.float32)[None, :], axis=1)
                         + tl.sum(q2 * k2.to(tl.float32)[None, :], axis=1)) * qk_scale
                m_new = tl.maximum(m_i, score)
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(score - m_new)
                l_i = l_i * alpha + p
                acc = acc * alpha[:, None] + p.to(tl.float16).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
                m_i = m_new

            hq = h * GROUP + rg
            n_valid = tl.cdiv(seq_len, chunk)  # chunks holding part of the sequence
            if n_valid == 1:
                # The whole sequence is in this chunk (always so when SPLITS == 1): no merge.
                o = acc / l_i[:, None]
                tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + rd[None, :], o.to(tl.float16),
                         mask=g_mask[:, None])
            elif SPLITS > 1:
                part = (b * HQ + hq) * SPLITS + c
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
                    for c0 in tl.range(0, SPLITS if INTERPRET else n_valid, MERGE_C, num_stages=1):
                        cc = c0 + rc
                        c_mask = cc < n_valid
                        prow = heads[:, None] * SPLITS + cc[None, :]  # [BLOCK_H, MERGE_C]
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

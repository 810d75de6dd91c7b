"""The W4A16 tensor-core kernels' CUDA C++ source, its entries, and the name of its compiled form.
Torch-free (the doctor names the cubin an engine must ship); the host side is w4a16_cuda.py.


Why: a CUDA-core gemv spends ~35 instructions per packed word (dequantize, multiply by x,
reduce), which on an H100 is about the time the word takes to arrive from memory, so
decode ran at ~60% of bandwidth and every extra row of x cost more. Here the tensor cores
do the products and the fp32 sums (`mma.sync.m16n8k16`): per packed word a lane only
turns 8 nibbles into the A operand (4 LOP3 + 4 HSUB2), whatever the batch up to 8 rows
(up to 16 with a second MMA on the same operand).

The layout ("mma" below) puts in each lane's 32-bit word exactly the 8 weights that lane
holds in its A fragment, so no data moves between lanes (each lane's shared-memory ring slot
holds only what that lane copied):

    word (tile T, chunk c, lane l = 4 g + t, step j) holds, for the 16 x 16 block
    A[r][kk] = W[16 T + r][64 c + k(j, kk)], k(j, 2 t' + 8 h + e) = 16 t' + 4 j + 2 h + e
    (this K order puts a lane's B fragments of the chunk in 16 consecutive x values):
        bits  0..3 A[g][2t]      bits 16..19 A[g][2t+1]      -> a0 = (w >> 0)  & 0x000F000F
        bits  4..7 A[g+8][2t]    bits 20..23 A[g+8][2t+1]    -> a1 = (w >> 4)  & ...
        bits  8..11 A[g][2t+8]   bits 24..27 A[g][2t+9]      -> a2 = (w >> 8)  & ...
        bits 12..15 A[g+8][2t+8] bits 28..31 A[g+8][2t+9]    -> a3 = (w >> 12) & ...
    stored at ((T * chunks + c) * 32 + l) * 4 + j, so a warp reads a chunk as 512
    contiguous bytes, 16 per lane.

`to_mma_layout` builds it from the engine's int4-rowpacked-v1 weights once at load (on the
GPU, milliseconds); the engine file format stays as it is. The nibble 1024 + q comes out
of one LOP3 as an fp16 (the "magic number" trick); minus (1024 + zero) it is q - zero
exactly (a nibble at bits 4..7 gives 1024 + 16 q: times 1/16, minus 64 + zero, one HFMA2).
Each 64-wide chunk lies in one quantization group, so the scale multiplies the chunk's
fp32 partial sums, not every weight.

A block computes one 16-row tile of the output (or two, sharing each warp's x loads, where
pick_config finds that faster); its warps split K and meet in shared memory (no atomics, no
workspace, deterministic, CUDA-graph capturable). A warp steps over
pairs of chunks (1 KB of weights: the per-step costs, a wait, addresses, a scale, are paid
once per pair) and streams them through a ring of 4, 5 or 8 slots (BLOCK_SHAPES) in shared
memory with cp.async, so the weight loads in flight cost no registers; on SM 9.0+ the kernel is launched to start early
(programmatic dependent launch, kernels/pdl.py): it requests its first chunks while the
previous kernel finishes, and waits for that kernel before it reads x. The epilogue can also
apply SiLU(gate) * up (a gate|up projection, rows interleaved at load) and fold an RMSNorm
in on either side (Fold: scale by the norm's rsqrt; add into the residual stream and prepare
the next norm's input). The source is
header-free (PTX for the fp16 arithmetic), so NVRTC needs no CUDA include directory, and
no GPU: `w4a16_cuda.compile_cubin` can run on a build host for an engine's target SM.
"""

from __future__ import annotations

import functools
import hashlib

from edgellm.engine.kernels import cubin_prefix

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) { u32 d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) { u32 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ float half_to_float(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 float_to_half(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float exp_approx(float x) {  // e^x as Triton's tl.exp computes it: 2^(x log2 e)
    float y; asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f)); return y;
}
__device__ __forceinline__ u16 load_half(const u16* p) { u16 h; asm("ld.global.nc.u16 %0, [%1];" : "=h"(h) : "l"(p)); return h; }
__device__ __forceinline__ uint4 load_cached(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// d += A (16 x 16, row-major fragment a) * B (16 x 8, column-major fragment b0 b1), fp32 sums.
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) { u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d; }

// A fragment (q - zero, exact in fp16) of one packed word; za (row g) holds 1024 + zero,
// zb (row g + 8) -(64 + zero), both halves. A nibble ORed into the mantissa of fp16 1024
// gives 1024 + q at bits 0..3 and 1024 + 16 q at bits 4..7: minus 1024 + zero, or times
// 1/16 minus 64 + zero, both are q - zero exactly. One shift serves two fragments.
// The nibble masks come in registers (NibbleMasks): as literals, ptxas rematerializes them
// with one more instruction before nearly every use.
struct NibbleMasks { u32 low, high; };  // 0x000F000F, 0x00F000F0
__device__ __forceinline__ void unpack_a(u32 word, u32 za, u32 zb, NibbleMasks mask, u32 (&a)[4]) {
    const u32 magic = 0x64006400u, sixteenth = 0x2C002C00u;  // fp16 1024 and 1/16 in both halves
    const u32 high = word >> 8;
    a[0] = hsub2((word & mask.low) | magic, za);
    a[1] = hfma2((word & mask.high) | magic, sixteenth, zb);
    a[2] = hsub2((high & mask.low) | magic, za);
    a[3] = hfma2((high & mask.high) | magic, sixteenth, zb);
}

// The bulk kernel's A fragment without the zero point (groups of 128 or more): 1024 + q (rows g)
// and 1024 + 16 q (rows g + 8), exact in fp16, one LOP3 each. The MMA's sums then carry
// (1024 + zero) or (1024 + 16 zero) times the sum of x over the pair, which the consumer takes off
// once per step (w4a16_bulk): 4 instructions per packed word fewer than unpack_a.
__device__ __forceinline__ void unpack_a_biased(u32 word, NibbleMasks mask, u32 (&a)[4]) {
    const u32 magic = 0x64006400u;
    const u32 high = word >> 8;
    a[0] = (word & mask.low) | magic;
    a[1] = (word & mask.high) | magic;
    a[2] = (high & mask.low) | magic;
    a[3] = (high & mask.high) | magic;
}

// The epilogue terms of unpack_a_biased's sums for rows g and g + 8, from their scale/zero word:
// the scale of the sums (row g + 8's are 16 times larger) and the bias to take off per unit of x.
struct BiasedScale { float sa, sb, ka, kb; };
__device__ __forceinline__ BiasedScale unpack_biased_scale(uint2 v) {
    BiasedScale r;
    r.sa = half_to_float((u16)(v.x & 0xffffu));
    const float sb = half_to_float((u16)(v.y & 0xffffu));
    r.sb = sb * 0.0625f;
    r.ka = r.sa * half_to_float((u16)(v.x >> 16));  // scale (1024 + zero): za = 1024 + zero
    r.kb = -sb * half_to_float((u16)(v.y >> 16));   // (scale / 16) (1024 + 16 zero) = scale (64 + zero): zb = -(64 + zero)
    return r;
}

// Scales (fp32) and zero terms (fp16, both halves: see unpack_a) of rows g and g + 8.
struct ScaleZero { float sa, sb; u32 za, zb; };
__device__ __forceinline__ ScaleZero unpack_sz(uint2 v) {
    ScaleZero r;
    r.sa = half_to_float((u16)(v.x & 0xffffu));
    r.sb = half_to_float((u16)(v.y & 0xffffu));
    r.za = __byte_perm(v.x, 0, 0x3232);
    r.zb = __byte_perm(v.y, 0, 0x3232);
    return r;
}

// Shared-memory address of a generic pointer into shared memory (for cp.async).
__device__ __forceinline__ u32 smem_address(const void* p) {
    u32 a; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p)); return a;
}
// Asynchronous copies global -> shared: they need no registers while in flight, so a warp
// keeps many chunks of weights on the way (the kernel is bound by memory latency otherwise).
// Weights are read once (.cg: past L1); the scale pairs are shared by the lanes of a row (.ca).
// dst: a shared-memory address (smem_address), kept as 32 bits: converting a generic pointer at
// every copy cost ~10 instructions per pair requested.
__device__ __forceinline__ void copy_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void copy_async8(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(dst), "l"(src) : "memory");
}
// x is written by the previous kernel and read by every block: bring a chunk's line of it
// into L1 ahead of use, so the loads at the arithmetic hit L1 instead of waiting on L2.
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" :: "l"(p)); }
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(PENDING) : "memory"); }

// Programmatic dependent launch (SM 9.0+; no-ops before): wait until the previous kernel's
// results are visible; then let the next kernel in the stream start (after the wait, so
// that at most one kernel runs ahead: a chain of early starts would hold SMs idle).
__device__ __forceinline__ void let_next_kernel_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// RMSNorm folded into the projections around it (decode; see Fold in the Python below). Null
// pointers turn each part off.
//   in_sumsq, eps:  x is the norm's input times the norm's weight; in_sumsq[m] its input's sum
//                   of squares: out = (x W^T) * rsqrt(in_sumsq[m] / K + eps) (+ bias).
//   add_to_out:     out is the residual stream: out += the result (fp16 before and after the add).
//   out_sumsq:      += the sum over n of out[m, n]^2 (the new residual; one atomic per tile and row).
//                   Both sums are fp64 and read as fp32: a row's tile sums (fp32) add exactly in fp64
//                   where they span less than 2^21 in magnitude, and beyond that round ~20 bits
//                   below what the fp32 read keeps, so the order in which the tiles' atomics land
//                   changes what the next norm uses only where the sum lies that close to an fp32
//                   rounding boundary (~1 in 10^6): decode repeats from run to run (with fp32 sums the
//                   order rounded their last bits, and a near tie between two tokens went either way).
//   next_weight, scaled, stride_scaled: scaled[m, n] = out[m, n] * next_weight[n] (the next norm's x).
struct Fold {
    const double* in_sumsq; float eps; int add_to_out; double* out_sumsq;
    const u16* next_weight; u16* scaled; long long stride_scaled;
};

// The epilogue of one 16-row tile, by warp 0 after the cross-warp sum: acc[mb][r] (C fragment) is
// output row 16 tile + g + 8 (r / 2), x row 8 mb + 2 t + r % 2. Rows past N are not stored.
template <int MB>
__device__ __forceinline__ void store_tile(
    float (&acc)[MB][4], int tile, int M, const u16* __restrict__ bias, u16* __restrict__ out, long long stride_om,
    int N, int K, int gate_up, const Fold& fold, int g, int t)
{
    if (fold.in_sumsq != 0) {
        // x is RMSNorm's input times its weight (see Fold): the norm's 1 / rms scales the sums.
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int m = 8 * mb + 2 * t + e;
                const float inv_rms = m < M ? rsqrtf((float)fold.in_sumsq[m] / (float)K + fold.eps) : 0.f;
                acc[mb][e] *= inv_rms;
                acc[mb][2 + e] *= inv_rms;
            }
    }
    if (gate_up) {
        // Rows interleaved at load (interleave_gate_up): row g of the tile is the gate of feature
        // 8 tile + g, row g + 8 its up. The lane holds both for x rows 2 t, 2 t + 1 and writes
        // SiLU(gate) * up as fused.silu_mul computes it: from the fp16 gate and up, one rounding.
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int feature = tile * 8 + g, m = 8 * mb + 2 * t + e;
                if (2 * feature < N && m < M) {
                    float gate = acc[mb][e], up = acc[mb][2 + e];
                    if (bias != 0) {
                        gate += half_to_float(load_half(bias + tile * 16 + g));
                        up += half_to_float(load_half(bias + tile * 16 + 8 + g));
                    }
                    gate = half_to_float(float_to_half(gate));
                    up = half_to_float(float_to_half(up));
                    out[m * stride_om + feature] = float_to_half(gate / (1.f + exp_approx(-gate)) * up);
                }
            }
        return;
    }
    // All loads first (one round trip), then the arithmetic and the stores.
    float bias_v[2] = {0.f, 0.f}, next_weight[2] = {0.f, 0.f}, residual[MB][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = tile * 16 + g + 8 * h;
        if (row < N && bias != 0) bias_v[h] = half_to_float(load_half(bias + row));
        if (row < N && fold.next_weight != 0) next_weight[h] = half_to_float(load_half(fold.next_weight + row));
    }
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = tile * 16 + g + 8 * (r >> 1), m = 8 * mb + 2 * t + (r & 1);
            residual[mb][r] = fold.add_to_out && row < N && m < M ? half_to_float(out[m * stride_om + row]) : 0.f;
        }
    float squares[MB][2];  // (fold.out_sumsq) this lane's share of x row 8 mb + 2 t + e's sum of squares
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = tile * 16 + g + 8 * (r >> 1), m = 8 * mb + 2 * t + (r & 1);
            if (r < 2) squares[mb][r] = 0.f;
            if (row < N && m < M) {
                u16 result = float_to_half(acc[mb][r] + bias_v[r >> 1]);
                if (fold.add_to_out)  // the residual stream: rounded to fp16 before and after the add
                    result = float_to_half(half_to_float(result) + residual[mb][r]);
                out[m * stride_om + row] = result;
                const float f = half_to_float(result);
                squares[mb][r & 1] += f * f;
                if (fold.next_weight != 0) fold.scaled[m * fold.stride_scaled + row] = float_to_half(f * next_weight[r >> 1]);
            }
        }
    if (fold.out_sumsq != 0 && tile * 16 < N) {  // sum the tile's 16 rows (lanes t, t + 4, .., t + 28), one atomic per x row
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float s = squares[mb][e];
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                s += __shfl_xor_sync(0xffffffffu, s, 8);
                s += __shfl_xor_sync(0xffffffffu, s, 16);
                const int m = 8 * mb + 2 * t + e;
                if (g == 0 && m < M) atomicAdd(fold.out_sumsq + m, (double)s);
            }
    }
}

// out[m, n] = sum_k x[m, k] * (q[n, k] - zero[n, k / G]) * scale[n, k / G] (+ bias[n]) for
// M <= 8 * MB rows of x. Block: the 16-row output tiles TILES * blockIdx.x .. + TILES - 1; its
// warps take equal runs of the K / 128 chunk pairs (one step of the main loop: 1 KB of weights
// per warp and tile, so the fixed cost of a step, addresses, copies, waits and scaling, is paid
// once per 1 KB). TILES = 2: the block's tiles share each warp's x loads (x is read once per
// block, for all of its tiles: at M = 4 one tile's block read as many bytes of x as of weights).
// G = 1 << gshift, a power of two >= 64 dividing K. SPLIT_GROUP (G = 64): the two chunks of a
// pair have scales of their own; otherwise one group holds the pair.
// Within a chunk, MMA step j's fragment column kk stands for k = 16 t' + 4 j + 2 h + e
// (kk = 2 t' + 8 h + e), so lane 4 g + t finds all its B fragments of the chunk in the 16
// consecutive x values 64 c + 16 t .. + 15: two 16-byte loads (the weights are laid out to match).
// Each warp streams its pairs through a private ring of STAGES slots in shared memory (a lane
// copies its own 32 bytes of weights and 8 (SPLIT_GROUP: 16) of scale/zero per pair and tile, and
// reads back only those: no barrier), STAGES - 1 pairs ahead of the arithmetic; x lines are
// prefetched into L1 as far ahead. The first pairs are requested before waiting for the
// previous kernel: weights never depend on it.
template <int MB, int STAGES, bool SPLIT_GROUP, int TILES>
__device__ __forceinline__ void w4a16_mma(
    const u16* __restrict__ x, long long stride_xm, int M, const uint4* __restrict__ qw,
    const uint2* __restrict__ sz, const u16* __restrict__ bias,
    u16* __restrict__ out, long long stride_om, int N, int K, int gshift, int gate_up, const Fold& fold,
    unsigned char* smem)
{
    constexpr int SZ = SPLIT_GROUP ? 2 : 1;  // scale/zero words per lane, pair and tile
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int first_tile = blockIdx.x * TILES, last_tile = (N - 1) >> 4;
    const int pairs = K >> 7;
    const int warp_shift = __ffs(warps) - 1;  // warps is a power of two: a shift, not a ~40-instruction division
    const int p_begin = (pairs * warp) >> warp_shift, n_pairs = ((pairs * (warp + 1)) >> warp_shift) - p_begin;
    // As 32-bit offsets (a weight of up to 2^31 16-byte words, 32 GB: MmaWeights checks): cheap to keep,
    // and to recompute where the compiler prefers that to holding a register. (Against 64-bit pointers
    // on an H200: 8B batch 4 2.371 against 2.421 ms per step, the 1B 0.611 against 0.601 at batch 1.)
    int w_at[TILES];   // tile T's pair p_begin + i, chunk h at qw[w_at[T] + 64 i + 32 h]
    int sz_at[TILES];  // tile T's group q at sz[sz_at[T] + 8 q]
#pragma unroll
    for (int T = 0; T < TILES; ++T) {
        // (TILES = 2) a tile past N (odd tile count) reads the last one, stores nothing
        const int tile = TILES == 1 ? first_tile : min(first_tile + T, last_tile);
        w_at[T] = (tile * 2 * pairs + 2 * p_begin) * 32 + lane;
        sz_at[T] = tile * (K >> gshift) * 8 + g;
    }
    const int pair_to_group = gshift - 7;                                           // (one group per pair) pair p lies in group p >> this
    // Slot s, tile T, chunk h at ring_w[64 (TILES s + T) + 32 h]; its scale/zero at ring_sz[32 (SZ (TILES s + T) + h)].
    uint4* ring_w = reinterpret_cast<uint4*>(smem) + warp * STAGES * TILES * 64 + lane;
    uint2* ring_sz = reinterpret_cast<uint2*>(smem + warps * STAGES * TILES * 1024) + warp * STAGES * TILES * 32 * SZ + lane;
    const u32 ring_w_at = smem_address(ring_w), ring_sz_at = smem_address(ring_sz);  // the same, for cp.async
    float* red = reinterpret_cast<float*>(smem + warps * STAGES * TILES * (1024 + 256 * SZ));
    auto request = [&](int i, int slot) {  // pair p_begin + i of every tile into its slot, i % STAGES
#pragma unroll
        for (int T = 0; T < TILES; ++T) {
            const int at = TILES * slot + T;
            const uint4* w = qw + (w_at[T] + 64 * i);
            copy_async16(ring_w_at + 16 * 64 * at, w);
            copy_async16(ring_w_at + 16 * (64 * at + 32), w + 32);
            if (SPLIT_GROUP) {
                const uint2* q = sz + (sz_at[T] + 16 * (p_begin + i));
                copy_async8(ring_sz_at + 8 * 64 * at, q);
                copy_async8(ring_sz_at + 8 * (64 * at + 32), q + 8);
            } else {
                copy_async8(ring_sz_at + 8 * 32 * at, sz + (sz_at[T] + 8 * ((p_begin + i) >> pair_to_group)));
            }
        }
    };
    const u32 opaque_zero = (u32)(K >> 31);  // K > 0: the masks are their literals, unknown to the compiler
    const NibbleMasks mask{0x000F000Fu + opaque_zero, 0x00F000F0u + opaque_zero};
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        if (i < n_pairs) request(i, i);
        copy_async_commit();  // one group per pair, empty ones included: the wait counts groups
    }
    wait_for_previous_kernel();  // x and out belong to the kernels around this one
    let_next_kernel_start();
    if (warp == 0) {  // the epilogue's inputs into L1 now, so that its loads do not wait on L2 at the end
#pragma unroll
        for (int T = 0; T < TILES; ++T) {
            const int tile = first_tile + T;
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
                const int m = 8 * mb + 2 * t + (g & 1);
                if (g < 2 && m < M) {
                    if (T == 0 && fold.in_sumsq != 0) prefetch_l1(fold.in_sumsq + m);
                    if (fold.add_to_out && tile <= last_tile) prefetch_l1(out + m * stride_om + tile * 16);
                }
            }
            if (tile <= last_tile) {
                if (lane == 8 && bias != 0) prefetch_l1(bias + tile * 16);
                if (lane == 9 && fold.next_weight != 0) prefetch_l1(fold.next_weight + tile * 16);
            }
        }
    }

    // x[g + 8 mb][128 p_begin + 16 t ..] as 16-byte vectors: pair i, chunk h at xr[mb] + 16 i + 8 h.
    // Rows past M read row M - 1 (their sums are never stored): no predicates in the loop.
    const uint4* xr[MB];
    const u16* x_line[MB];  // lanes 4 g and 4 g + 1 bring chunk t's 128-byte line of row g into L1
    bool x_prefetcher[MB];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
        const int m = g + 8 * mb;
        const u16* row = x + (long long)min(m, M - 1) * stride_xm + 128 * p_begin;
        xr[mb] = reinterpret_cast<const uint4*>(row + 16 * t);
        x_line[mb] = row + 64 * (t & 1);
        x_prefetcher[mb] = t < 2 && m < M;
    }
    auto prefetch_x = [&](int i) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
            if (x_prefetcher[mb]) prefetch_l1(x_line[mb] + 128 * i);
    };
    for (int i = 0; i < STAGES - 1 && i < n_pairs; ++i) prefetch_x(i);
    float acc[TILES][MB][4];
#pragma unroll
    for (int T = 0; T < TILES; ++T)
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[T][mb][r] = 0.f;

    // Unrolled by the ring's length, so that every slot offset is a constant.
    for (int i0 = 0; i0 < n_pairs; i0 += STAGES) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        const int i = i0 + s;  // pair p_begin + i, in slot s
        if (i >= n_pairs) break;
        if (i + STAGES - 1 < n_pairs) {
            request(i + STAGES - 1, (s + STAGES - 1) % STAGES);  // into the slot read one pair ago
            prefetch_x(i + STAGES - 1);
        }
        copy_async_commit();
        uint4 xv[MB][4];  // chunk h, half e at xv[mb][2 h + e]
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
            for (int v = 0; v < 4; ++v) xv[mb][v] = load_cached(xr[mb] + 16 * i + 8 * (v >> 1) + (v & 1));
        copy_async_wait<STAGES - 1>();  // pair i has landed
#pragma unroll
        for (int T = 0; T < TILES; ++T) {
            const int at = TILES * s + T;
            const uint4 w[2] = {ring_w[64 * at], ring_w[64 * at + 32]};
            const ScaleZero q0 = unpack_sz(ring_sz[32 * SZ * at]);
            const ScaleZero q[2] = {q0, SPLIT_GROUP ? unpack_sz(ring_sz[32 * SZ * at + 32]) : q0};
            float part[2][MB][4];  // [chunk]: two independent MMA chains of four
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                    for (int r = 0; r < 4; ++r) part[h][mb][r] = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    u32 a[4];
                    unpack_a(word_of(w[h], j), q[h].za, q[h].zb, mask, a);
#pragma unroll
                    for (int mb = 0; mb < MB; ++mb) {
                        const uint4& v = xv[mb][2 * h + (j >> 1)];
                        mma_16816(part[h][mb], a, (j & 1) ? v.z : v.x, (j & 1) ? v.w : v.y);
                    }
                }
#pragma unroll
            for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                for (int r = 0; r < 4; ++r) {  // C fragment values 0, 1: row g; 2, 3: row g + 8
                    const float s0 = r < 2 ? q[0].sa : q[0].sb, s1 = r < 2 ? q[1].sa : q[1].sb;
                    acc[T][mb][r] += SPLIT_GROUP ? s0 * part[0][mb][r] + s1 * part[1][mb][r]
                                                 : s0 * (part[0][mb][r] + part[1][mb][r]);
                }
        }
    }
    }
    if (warps > 1) {  // warp 0 sums the other warps' partial tiles
        if (warp > 0) {
#pragma unroll
            for (int T = 0; T < TILES; ++T)
#pragma unroll
                for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        red[((warp - 1) * TILES * 4 * MB + (T * MB + mb) * 4 + r) * 32 + lane] = acc[T][mb][r];
        }
        __syncthreads();
        if (warp > 0) return;
        for (int w = 1; w < warps; ++w)
#pragma unroll
            for (int T = 0; T < TILES; ++T)
#pragma unroll
                for (int mb = 0; mb < MB; ++mb)
#pragma unroll
                    for (int r = 0; r < 4; ++r) acc[T][mb][r] += red[((w - 1) * TILES * 4 * MB + (T * MB + mb) * 4 + r) * 32 + lane];
    }
#pragma unroll
    for (int T = 0; T < TILES; ++T)
        store_tile<MB>(acc[T], first_tile + T, M, bias, out, stride_om, N, K, gate_up, fold, g, t);
}

#define MMA_ENTRY(NAME, MB, STAGES, SPLIT_GROUP, TILES, THREADS, MIN_BLOCKS)                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) NAME(                               \
        const u16* x, long long stride_xm, int M, const uint4* qw, const uint2* sz,                       \
        const u16* bias, u16* out, long long stride_om, int N, int K, int gshift, int gate_up,            \
        const double* in_sumsq, float eps, int add_to_out, double* out_sumsq, const u16* next_weight,     \
        u16* scaled, long long stride_scaled) {                                                           \
        extern __shared__ __align__(16) unsigned char smem[];                                             \
        const Fold fold{in_sumsq, eps, add_to_out, out_sumsq, next_weight, scaled, stride_scaled};        \
        w4a16_mma<MB, STAGES, SPLIT_GROUP, TILES>(x, stride_xm, M, qw, sz, bias, out, stride_om, N, K,    \
                                                  gshift, gate_up, fold, smem);                           \
    }
// The entries (w4a16_mma_mb<MB>_s<STAGES>[_t512][_g64][_x2]) are listed by compile_cubin: see ENTRIES.

// ---- Bulk-streamed blocks (SM 9.0+): the weights arrive by the copy engine ----------------------
// The ring kernel above moves the weights with cp.async, 16 bytes per lane, each warp its own ring
// of 1 KB pairs; a block lives for one tile, so every block pays a ring fill (a DRAM round trip)
// and a drain, and with 4 pairs per warp (8B gate|up) it hardly streams between the two. Here a
// block is persistent and streams without a pause: one producer thread issues bulk copies
// (cp.async.bulk, completing on an mbarrier) of whole stages, each 8 KB of weights (TB tiles x KS
// pairs), their scale/zero words and the stage's columns of x, up to `stages` stages ahead, across
// the block's units (a unit: TB tiles, all of K) without a gap; BULK_WARPS consumer warps each
// take one pair of every stage (warp = tb * KS + ks: tile tb, pair ks), from shared memory only,
// with the ring kernel's arithmetic for G = 64 and otherwise without the zero point in the
// dequantization (unpack_a_biased: it is taken off once per step). At a unit's end the KS warps
// of a tile meet in shared memory and the first stores the tile (store_tile: the same
// epilogues). In flight per block: stages x 8 KB of weights, no registers, one instruction per copy.
constexpr int BULK_WARPS = 8;
constexpr int BULK_SZ = 8 * 1024;   // a stage: weights [0, 8 KB), scale/zero [8 KB, 9 KB), x rows from 9 KB
constexpr int BULK_X = 9 * 1024;
constexpr int BULK_RING = 256 + 2 * BULK_WARPS * 512;  // barriers (full, empty: up to 16 stages), cross-warp sums x 2

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_bytes(u32 bar, u32 bytes) {  // the producer's arrival: `bytes` to land
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {  // until the phase of this parity has completed
    u32 done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {  // bytes: a multiple of 16
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}

__device__ __forceinline__ void lds128(uint4& v, u32 addr) {
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
}
__device__ __forceinline__ void lds64(uint2& v, u32 addr) {
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
}

// Bytes of one stage for M rows of x and K split KS ways (w4a16_cuda.bulk_stage_bytes says the same):
// x row m at BULK_X + m (256 KS + 64) (the 64 shift the rows' banks: 8 rows' fragments in 4 wavefronts).
__device__ __forceinline__ int bulk_stage_bytes(int M, int ks_shift) { return (BULK_X + M * ((256 << ks_shift) + 64) + 127) & ~127; }

template <bool SPLIT_GROUP>
__device__ __forceinline__ void w4a16_bulk(
    const u16* __restrict__ x, long long stride_xm, int M, const uint4* __restrict__ qw,
    const uint2* __restrict__ sz, const u16* __restrict__ bias,
    u16* __restrict__ out, long long stride_om, int N, int K, int gshift, int gate_up, const Fold& fold,
    int ks_shift, int stages, unsigned char* smem)
{
#if __CUDA_ARCH__ >= 900
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int KS = 1 << ks_shift, TB = BULK_WARPS >> ks_shift;
    const int pairs = K >> 7, steps = pairs >> ks_shift;  // a unit's stages
    const int last_tile = (N - 1) >> 4, units = (last_tile + TB) / TB;
    const int stage_bytes = bulk_stage_bytes(M, ks_shift);
    const int groups = K >> gshift;
    const int stage_groups = max(1, (KS << 7) >> gshift);  // groups a stage's KS pairs lie in
    const int x_row_bytes = (256 << ks_shift) + 64;
    if ((int)blockIdx.x >= units) return;  // (a grid larger than the units) no unit: no copy may be left in flight
    const u32 base = smem_address(smem);
    const u32 full = base, empty = base + 128, ring = base + BULK_RING;
    float* red = reinterpret_cast<float*>(smem + 256);
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, BULK_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp == BULK_WARPS) {  // the producer: lane 0 issues every copy
        if (lane != 0) return;
        const int my_units = (units - 1 - (int)blockIdx.x) / (int)gridDim.x + 1;
        const int total = my_units * steps, ahead = min(stages, total);
        const u32 stage_weight_bytes = (u32)TB << (ks_shift + 10), stage_sz_bytes = 64u * stage_groups * TB;
        const u32 x_bytes = 256u << ks_shift;
        // Stage `it` of this block (unit blockIdx.x + (it / steps) gridDim.x, step it % steps) into slot s.
        auto issue = [&](int it, int s, bool weights, bool xs) {
            const int unit = (int)blockIdx.x + (it / steps) * (int)gridDim.x, step = it % steps;
            const u32 stage = ring + s * stage_bytes, bar = full + 8 * s;
            const int pair0 = step << ks_shift, group0 = (pair0 << 7) >> gshift;
            if (weights) {
                mbar_expect_bytes(bar, stage_weight_bytes + stage_sz_bytes + M * x_bytes);
                for (int tb = 0; tb < TB; ++tb) {
                    const int tile = min(unit * TB + tb, last_tile);  // a unit past N's last tile re-reads it, stores nothing
                    bulk_copy(stage + (tb << (ks_shift + 10)), qw + ((long long)tile * pairs + pair0) * 64, 1024u << ks_shift, bar);
                    bulk_copy(stage + BULK_SZ + tb * 64 * stage_groups, sz + ((long long)tile * groups + group0) * 8,
                              64u * stage_groups, bar);
                }
            }
            if (xs)
                for (int m = 0; m < M; ++m)
                    bulk_copy(stage + BULK_X + m * x_row_bytes, x + m * stride_xm + (pair0 << 7), x_bytes, bar);
        };
        // The weights never depend on the previous kernel: the first stages' are requested before waiting for it.
        for (int it = 0; it < ahead; ++it) issue(it, it, true, false);
        wait_for_previous_kernel();
        let_next_kernel_start();
        for (int it = 0; it < ahead; ++it) issue(it, it, false, true);
        for (int it = ahead; it < total; ++it) {  // round it / stages of slot it % stages: once its consumers released the last
            mbar_wait(empty + 8 * (it % stages), ((it / stages) & 1) ^ 1);
            issue(it, it % stages, true, true);
        }
        return;
    }

    wait_for_previous_kernel();  // out and the folded norms' inputs belong to the kernels around this one
    let_next_kernel_start();
    const int ks = warp & (KS - 1), tb = warp >> ks_shift;
    const int g = lane >> 2, t = lane & 3;
    const u32 opaque_zero = (u32)(K >> 31);
    const NibbleMasks mask{0x000F000Fu + opaque_zero, 0x00F000F0u + opaque_zero};
    const u32 ones = 0x3C003C00u + opaque_zero;  // fp16 1.0 in both halves
    // This lane's bytes in a stage: its 16 of each chunk of the warp's pair, the scale/zero of row g
    // (group q of the stage at + 64 q), its 32 of each chunk's x in row min(g, M - 1) (rows past M repeat
    // the last: their sums are never stored).
    // The pair's group within the stage: a stage's KS pairs start on a multiple of KS * 128, so they
    // cover whole groups (G <= KS * 128: pair ks lies in group ks * 128 / G of them) or lie in one.
    // The three addresses are carried from step to step (a stage further each, back to slot 0 at the
    // ring's end): derived afresh from the kernel's arguments, ptxas re-created them at every step
    // (sm_90 SASS: a consumer's step took 153 instructions that way, 135 carried; 118 since the zero
    // point left the dequantization), and the consumers bounded this kernel at more than one row.
    const u32 ring_start = smem_address(smem) + BULK_RING, ring_bytes = (u32)(stages * stage_bytes);
    u32 w_addr = ring_start + warp * 1024 + 16 * lane;
    u32 sz_addr = ring_start + BULK_SZ + tb * 64 * stage_groups + 8 * g + 64 * ((ks << 7) >> gshift);
    u32 x_addr = ring_start + BULK_X + min(g, M - 1) * x_row_bytes + 256 * ks + 32 * t;
    u32 full_bar = full, empty_bar = empty;
    int slot = 0;
    u32 phase = 0;
    int parity = 0;  // of the cross-warp sums' buffer
    for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
        float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
        for (int step = 0; step < steps; ++step) {
            mbar_wait(full_bar, phase);
            uint4 w[2], xv[4];  // x: chunk h, half e at xv[2 h + e]
            uint2 sz0, sz1;
            lds128(w[0], w_addr);
            lds128(w[1], w_addr + 512);
            lds64(sz0, sz_addr);
            if (SPLIT_GROUP) lds64(sz1, sz_addr + 64); else sz1 = sz0;
            lds128(xv[0], x_addr);
            lds128(xv[1], x_addr + 16);
            lds128(xv[2], x_addr + 128);
            lds128(xv[3], x_addr + 144);
            __syncwarp();
            if (lane == 0) mbar_arrive(empty_bar);  // the slot is read: the producer may refill it
            w_addr += stage_bytes;
            sz_addr += stage_bytes;
            x_addr += stage_bytes;
            full_bar += 8;
            empty_bar += 8;
            if (++slot == stages) {
                slot = 0;
                phase ^= 1;
                w_addr -= ring_bytes;
                sz_addr -= ring_bytes;
                x_addr -= ring_bytes;
                full_bar = full;
                empty_bar = empty;
            }
            if constexpr (SPLIT_GROUP) {  // two groups per pair: the ring kernel's arithmetic
                const ScaleZero q[2] = {unpack_sz(sz0), unpack_sz(sz1)};
                float part[2][4];  // [chunk]: two independent MMA chains
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int r = 0; r < 4; ++r) part[h][r] = 0.f;
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        u32 a[4];
                        unpack_a(word_of(w[h], j), q[h].za, q[h].zb, mask, a);
                        const uint4& v = xv[2 * h + (j >> 1)];
                        mma_16816(part[h], a, (j & 1) ? v.z : v.x, (j & 1) ? v.w : v.y);
                    }
#pragma unroll
                for (int r = 0; r < 4; ++r) {  // C fragment values 0, 1: row g; 2, 3: row g + 8
                    const float s0 = r < 2 ? q[0].sa : q[0].sb, s1 = r < 2 ? q[1].sa : q[1].sb;
                    acc[0][r] += s0 * part[0][r] + s1 * part[1][r];
                }
            } else {  // one group per pair: the zero point taken off once per step (unpack_a_biased)
                const BiasedScale q = unpack_biased_scale(sz0);
                float part[4] = {0.f, 0.f, 0.f, 0.f};  // biased sums, both chunks in one chain
                float xsum[4] = {0.f, 0.f, 0.f, 0.f};  // the pair's sums of x of columns 2t, 2t + 1 (twice)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        u32 a[4];
                        unpack_a_biased(word_of(w[h], j), mask, a);
                        const uint4& v = xv[2 * h + (j >> 1)];
                        const u32 b0 = (j & 1) ? v.z : v.x, b1 = (j & 1) ? v.w : v.y;
                        mma_16816(part, a, b0, b1);
                        const u32 all_ones[4] = {ones, ones, ones, ones};  // sums of x, exact in fp32
                        mma_16816(xsum, all_ones, b0, b1);
                    }
#pragma unroll
                for (int r = 0; r < 4; ++r) {  // row g (r < 2): sa P - sa (1024 + zero) S; row g + 8 likewise
                    const float scale = r < 2 ? q.sa : q.sb, bias = r < 2 ? q.ka : q.kb;
                    acc[0][r] = fmaf(-bias, xsum[r], fmaf(scale, part[r], acc[0][r]));
                }
            }
        }
        if (KS > 1) {  // the tile's first warp sums its KS warps' partial tiles
            float* sums = red + parity * BULK_WARPS * 128;
            if (ks > 0)
#pragma unroll
                for (int r = 0; r < 4; ++r) sums[(warp * 4 + r) * 32 + lane] = acc[0][r];
            asm volatile("bar.sync 1, %0;" :: "r"(BULK_WARPS * 32) : "memory");  // the consumers only
            if (ks == 0)
                for (int other = 1; other < KS; ++other)
#pragma unroll
                    for (int r = 0; r < 4; ++r) acc[0][r] += sums[((warp + other) * 4 + r) * 32 + lane];
            parity ^= 1;  // two buffers: the next unit's writes cannot meet this unit's reads
        }
        const int tile = unit * TB + tb;
        if (ks == 0 && tile <= last_tile) store_tile<1>(acc, tile, M, bias, out, stride_om, N, K, gate_up, fold, g, t);
    }
#endif
}

// 3 blocks of 9 warps per SM (pick_bulk_config's choice for large weights) need <= 72 registers:
// 80 (the allocation unit is 8) would leave room for two.
#define BULK_ENTRY(NAME, SPLIT_GROUP)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * (BULK_WARPS + 1), 3) NAME(                          \
        const u16* x, long long stride_xm, int M, const uint4* qw, const uint2* sz,                       \
        const u16* bias, u16* out, long long stride_om, int N, int K, int gshift, int gate_up,            \
        const double* in_sumsq, float eps, int add_to_out, double* out_sumsq, const u16* next_weight,     \
        u16* scaled, long long stride_scaled, int ks_shift, int stages) {                                 \
        extern __shared__ __align__(128) unsigned char smem[];                                            \
        const Fold fold{in_sumsq, eps, add_to_out, out_sumsq, next_weight, scaled, stride_scaled};        \
        w4a16_bulk<SPLIT_GROUP>(x, stride_xm, M, qw, sz, bias, out, stride_om, N, K, gshift, gate_up,     \
                                fold, ks_shift, stages, smem);                                            \
    }
BULK_ENTRY(w4a16_bulk, false)
BULK_ENTRY(w4a16_bulk_g64, true)



// int4-rowpacked-v1 [N, K / 8] (weight 8 w + i at bits 4 i of word w) -> the mma layout, as
// to_mma_layout defines it (the GPU tests hold this kernel to it): one thread per output word
// (tile, chunk, lane, MMA step j). Slot s of the word is fragment row r = g + 8 (s & 1), column
// kk = 2 t + (s >> 2) + 8 ((s >> 1) & 1) (_slot_index), which holds k = 64 c + the chunk order
// of (j, kk) (_chunk_order). Rows past N are zero. At engine load: it replaces a dozen torch ops
// per weight, which cost ~0.3 s of a 1B start.
extern "C" __global__ void __launch_bounds__(256) w4a16_mma_repack(const u32* rowpacked, u32* out, int N, int K)
{
    const int chunks = K >> 6;
    const long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long long)((N + 15) >> 4) * chunks * 128) return;
    const int j = (int)(id & 3), lane = (int)((id >> 2) & 31);
    const long long tc = id >> 7;  // tile * chunks + chunk
    const int tile = (int)(tc / chunks), c = (int)(tc % chunks);
    const int g = lane >> 2, t = lane & 3;
    u32 word = 0;
#pragma unroll
    for (int s = 0; s < 8; ++s) {
        const int row = 16 * tile + g + 8 * (s & 1);
        const int kk = 2 * t + (s >> 2) + 8 * ((s >> 1) & 1);
        const int k = 64 * c + 16 * ((kk & 7) >> 1) + 4 * j + 2 * (kk >> 3) + (kk & 1);
        if (row < N) word |= ((rowpacked[(long long)row * (K >> 3) + (k >> 3)] >> (4 * (k & 7))) & 0xFu) << (4 * s);
    }
    out[id] = word;
}

// pack_scales at engine load, one thread per output word (the GPU tests hold this kernel to
// pack_scales): word (tile T, group q, g, h) = the fp16 scale of row 16 T + g + 8 h, group q, in
// its low half and the zero term (1024 + zero for h = 0, -(64 + zero) for h = 1) in its high
// half; rows past N are zero. It replaces ~10 torch ops per weight (a 1B load placed its weights
// in 0.20 s with them, 0.10 s with this).
extern "C" __global__ void __launch_bounds__(256) w4a16_mma_pack_scales(const u16* scales, const u16* zeros, u32* out,
                                                                        int N, int groups)
{
    const long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long long)((N + 15) >> 4) * groups * 16) return;
    const int h = (int)(id & 1), g = (int)((id >> 1) & 7);
    const long long tq = id >> 4;  // tile * groups + group
    const int tile = (int)(tq / groups), q = (int)(tq % groups);
    const int row = 16 * tile + g + 8 * h;
    u32 word = 0;
    if (row < N) {
        const long long at = (long long)row * groups + q;
        const float zero = half_to_float(zeros[at]);
        word = (u32)scales[at] | ((u32)float_to_half(h ? -(zero + 64.0f) : zero + 1024.0f) << 16);
    }
    out[id] = word;
}

// The fp16 weight [N, K] from the mma layout, (q - zero) * scale rounded once (prefill
// through cuBLAS). One thread per (tile, chunk, lane): it holds k = 64 c + 16 t .. + 15 of
// rows g and g + 8, written as 32 contiguous bytes each.
extern "C" __global__ void __launch_bounds__(128) w4a16_mma_dequant(
    const uint4* qw, const uint2* sz, u16* out, int N, int K, int gshift)
{
    const int chunks = K >> 6;
    const long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = (int)(id & 31);
    const long long tc = id >> 5;  // tile * chunks + chunk
    const int tile = (int)(tc / chunks), c = (int)(tc % chunks);
    if (tile * 16 >= N) return;
    const int g = lane >> 2, t = lane & 3;
    const int ng = K >> gshift;
    const uint2 packed_sz = sz[((long long)tile * ng + ((c << 6) >> gshift)) * 8 + g];
    const ScaleZero q = unpack_sz(packed_sz);
    const u32 s2a = __byte_perm(packed_sz.x, 0, 0x1010), s2b = __byte_perm(packed_sz.y, 0, 0x1010);
    const uint4 v = qw[tc * 32 + lane];
    u32 row_a[8], row_b[8];  // u32 2 j + h holds k = 16 t + 4 j + 2 h (+ 1)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 a[4];
        unpack_a(word_of(v, j), q.za, q.zb, NibbleMasks{0x000F000Fu, 0x00F000F0u}, a);
        row_a[2 * j] = hmul2(a[0], s2a);
        row_b[2 * j] = hmul2(a[1], s2b);
        row_a[2 * j + 1] = hmul2(a[2], s2a);
        row_b[2 * j + 1] = hmul2(a[3], s2b);
    }
    const int rows[2] = {tile * 16 + g, tile * 16 + g + 8};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (rows[h] < N) {
            const u32* r = h ? row_b : row_a;
            uint4* dst = reinterpret_cast<uint4*>(out + (long long)rows[h] * K + 64 * c + 16 * t);
            dst[0] = make_uint4(r[0], r[1], r[2], r[3]);
            dst[1] = make_uint4(r[4], r[5], r[6], r[7]);
        }
    }
}
"""

BATCH_BLOCKS = (1, 2)  # MB: kernels for up to 8 and 16 rows of x
# (threads per block, ring slots per warp) the kernels are built for: up to 8 warps per block
# (256 threads) with rings of 4, 5 or 8 slots (pairs of chunks in flight + 1), 16 warps with 4 or 5.
BLOCK_SHAPES = ((256, 4), (256, 5), (256, 8), (512, 4), (512, 5))
# Blocks of two tiles (up to 8 rows of x: MB 1): each slot holds both tiles' pair, so the rings are
# twice as large per slot; 3 slots give 3 blocks of 8 warps per SM, 4 slots 2.
TWO_TILE_SHAPES = ((256, 3), (256, 4), (512, 3))


def block_threads(warps: int) -> int:
    """Threads per block of the entry that runs `warps` warps: 256 up to 8 warps, else 512."""
    return 256 if warps <= 8 else 512


def entry_name(mb: int, stages: int, split_group: bool, threads: int = 256, tiles: int = 1) -> str:
    """The kernel entry for up to 8 * mb rows, a ring of `stages` slots, blocks of up to
    `threads` threads, G = 64 (split_group) or more, and `tiles` 16-row tiles per block."""
    return (f"w4a16_mma_mb{mb}_s{stages}" + ("_t512" if threads == 512 else "") + ("_g64" if split_group else "")
            + ("_x2" if tiles == 2 else ""))


ENTRIES = ([(mb, stages, split, threads, 1) for mb in BATCH_BLOCKS for threads, stages in BLOCK_SHAPES
            for split in (False, True)]
           + [(1, stages, split, threads, 2) for threads, stages in TWO_TILE_SHAPES for split in (False, True)])


def min_blocks_per_sm(mb: int, stages: int, threads: int = 256, tiles: int = 1, split_group: bool = False) -> int:
    """The register budget the compiler is held to. Up to 8 rows fit 64 registers without
    spilling: 4 blocks of 8 warps (or 2 of 16) per SM, where 80 registers would allow 3. The
    deep ring is for shapes of at most two blocks per SM. Two-tile blocks: as many as their
    rings let share an SM of SM 9.0 (228 KB): 3 of 3 slots at G = 128 (69 KB each), but 2 at
    G = 64, whose 81 KB blocks (a second scale/zero word per pair) cannot run 3 to an SM, and
    whose code spilled under 3 blocks' 80 registers on SM 8.7 / 8.9."""
    if tiles == 2:
        return 1 if threads == 512 else 3 if stages == 3 and not split_group else 2
    if threads == 512:
        return 2 if mb == 1 else 1
    if stages == 8:
        return 2
    return 4 if mb == 1 else 1


def entries_source() -> str:
    """The kernel entries (MMA_ENTRY lines) appended to SOURCE, one per ENTRIES item."""
    return "".join(f"MMA_ENTRY({entry_name(mb, stages, split, threads, tiles)}, {mb}, {stages}, {str(split).lower()}, "
                   f"{tiles}, {threads}, {min_blocks_per_sm(mb, stages, threads, tiles, split)})\n"
                   for mb, stages, split, threads, tiles in ENTRIES)


@functools.lru_cache(maxsize=32)
def cubin_name(sm: int, source: str = SOURCE) -> str:
    """The file name of the kernels compiled for SM `sm` (e.g. 90) from `source` (this runtime's,
    unless a benchmark swaps it): a cubin built from other source (another runtime version) has
    another name and is not used. Remembered per source text: an engine's load asks once per INT4 layer."""
    key = hashlib.sha256((source + entries_source()).encode() + f"sm_{sm}".encode()).hexdigest()[:16]
    return f"{cubin_prefix(sm)}{key}.cubin"

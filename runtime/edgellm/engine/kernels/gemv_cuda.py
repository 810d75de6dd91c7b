"""W4A16 GEMV for M = 1..2 rows of x in CUDA C++, compiled with NVRTC — UNDER EVALUATION.

Not used by engines yet: `w4a16.pick_config` never picks it; `bench/kernels.py --sweep`
times it beside the Triton gemv (config kind "cuda") and tests/test_kernels_gpu.py checks
it against the dequantized reference. It replaces the Triton gemv only once a GPU run shows
it faster (written in a session with no device time left to measure it).

Why a second gemv: the Triton gemv reaches ~63% of the copy bandwidth on the large decode
shapes and ncu calls it latency-bound (warps wait on global loads; Triton pipelines no
loads that do not feed a dot, so each warp has at most two K tiles in flight). Here each
lane issues ROWS x UNROLL 16-byte weight loads (streaming, L1 bypassed) before any
arithmetic, rows of a warp share the x loads, and nothing but the output leaves the
registers: no split-K, no workspace, no atomics, deterministic.

Layout and numerics are those of the Triton gemv (`w4a16._gemv_asm`): int4-rowpacked-v1,
each weight dequantized in fp16 as ((1024 + q) - (1024 + zero)) * scale, 8 products summed in
fp16, sums accumulated in fp32. The source is header-free (PTX for the fp16 arithmetic), so
NVRTC needs no CUDA include directory; NVRTC needs no GPU either, so the builder could
compile cubins for an engine's target SM ahead of time (`compile_cubin`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from pathlib import Path

import torch

from edgellm.engine.kernels import sm_count

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) { u32 d; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ u32 hadd2(u32 a, u32 b) { u32 d; asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) { u32 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ float half_to_float(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 float_to_half(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float sum_halves(u32 a) { return half_to_float((u16)(a & 0xffffu)) + half_to_float((u16)(a >> 16)); }
__device__ __forceinline__ u16 load_half(const u16* p) { u16 h; asm("ld.global.nc.u16 %0, [%1];" : "=h"(h) : "l"(p)); return h; }
// Weights are read once: stream them past L1 (x, scales and zeros stay cached there).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ uint4 load_cached(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 word_of(const uint4& v, int t) { return t == 0 ? v.x : t == 1 ? v.y : t == 2 ? v.z : v.w; }

// One warp computes ROWS consecutive outputs for M rows of x over all of K. Lane l takes
// the 16-byte pieces (32 weights) l, l + 32, ... of each row; UNROLL pieces per row are
// loaded before any of them is used.
template <int M, int ROWS, int UNROLL>
__device__ __forceinline__ void gemv(
    const u16* __restrict__ x, long long stride_xm, const uint4* __restrict__ qw,
    const u16* __restrict__ scales, const u16* __restrict__ zeros, const u16* __restrict__ bias,
    u16* __restrict__ out, long long stride_om, int N, int K, int G)
{
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * ROWS;
    if (row0 >= N) return;  // the whole warp: row0 is the same for its lanes
    const int kq = K >> 5;  // 16-byte pieces per row
    const int ng = K / G;
    const u32 magic = 0x64006400u;  // fp16 1024 in both halves: 1024 + q for a nibble q
    const uint4* wrow[ROWS];
    long long srow[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = min(row0 + r, N - 1);  // rows past N compute a copy of the last; never stored
        wrow[r] = qw + (long long)row * kq;
        srow[r] = (long long)row * ng;
    }
    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

    for (int c0 = lane; c0 < kq; c0 += 32 * UNROLL) {
        uint4 w[UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = c0 + 32 * u;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) w[u][r] = c < kq ? load_stream(wrow[r] + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = c0 + 32 * u;
            if (c < kq) {
                const int k0 = c << 5;
                const int g = k0 / G;  // G is a multiple of 32: the piece lies in one group
                u32 s2[ROWS], z2[ROWS];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const u32 s = load_half(scales + srow[r] + g), z = load_half(zeros + srow[r] + g);
                    s2[r] = s | (s << 16);
                    z2[r] = hadd2(z | (z << 16), magic);  // 1024 + zero, exact for integer zeros
                }
#pragma unroll
                for (int t = 0; t < 4; ++t) {  // word t of the piece: weights k0 + 8t .. k0 + 8t + 7
                    u32 xp[M][4];
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        const uint4 xv = load_cached(reinterpret_cast<const uint4*>(x + m * stride_xm + k0 + 8 * t));
                        // x pairs in the order of the dequantized pairs: (x[j], x[j + 4])
                        xp[m][0] = __byte_perm(xv.x, xv.z, 0x5410);
                        xp[m][1] = __byte_perm(xv.x, xv.z, 0x7632);
                        xp[m][2] = __byte_perm(xv.y, xv.w, 0x5410);
                        xp[m][3] = __byte_perm(xv.y, xv.w, 0x7632);
                    }
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        const u32 word = word_of(w[u][r], t);
                        u32 d[4];
#pragma unroll
                        for (int j = 0; j < 4; ++j)  // weights j and j + 4 of the word, dequantized
                            d[j] = hmul2(hsub2(((word >> (4 * j)) & 0x000F000Fu) | magic, z2[r]), s2[r]);
#pragma unroll
                        for (int m = 0; m < M; ++m) {
                            u32 p = hmul2(d[0], xp[m][0]);
                            p = hfma2(d[1], xp[m][1], p);
                            p = hfma2(d[2], xp[m][2], p);
                            p = hfma2(d[3], xp[m][3], p);
                            acc[r][m] += sum_halves(p);
                        }
                    }
                }
            }
        }
    }
    float mine = 0.f;  // lane r * M + m stores output (row0 + r, m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[r][m];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == r * M + m) mine = v;
        }
    if (lane < ROWS * M) {
        const int r = lane / M, m = lane % M, row = row0 + r;
        if (row < N) {
            if (bias != 0) mine += half_to_float(load_half(bias + row));
            out[m * stride_om + row] = float_to_half(mine);
        }
    }
}

#define ENTRY(M, ROWS, UNROLL)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) w4a16_gemv_m##M##_r##ROWS##_u##UNROLL(             \
        const u16* x, long long stride_xm, const uint4* qw, const u16* scales, const u16* zeros,         \
        const u16* bias, u16* out, long long stride_om, int N, int K, int G) {                           \
        gemv<M, ROWS, UNROLL>(x, stride_xm, qw, scales, zeros, bias, out, stride_om, N, K, G);           \
    }
ENTRY(1, 1, 4) ENTRY(1, 1, 8) ENTRY(1, 2, 4) ENTRY(1, 4, 2)
ENTRY(2, 1, 4) ENTRY(2, 2, 2) ENTRY(2, 4, 2)
"""

VARIANTS = {1: ((1, 4), (1, 8), (2, 4), (4, 2)), 2: ((1, 4), (2, 2), (4, 2))}  # (rows per warp, unroll)
WARPS_PER_BLOCK = 4


def _bindings():
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        from cuda import cuda as driver, nvrtc  # cuda-python < 12.6
    return driver, nvrtc


@functools.cache
def available() -> tuple[bool, str]:
    """(True, "") when cuda-python, NVRTC and a CUDA GPU are all here, else (False, why)."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    try:
        _, nvrtc = _bindings()
        _ok(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except Exception as e:  # noqa: BLE001 - any failure to reach NVRTC means: not here
        return False, f"NVRTC is not usable: {type(e).__name__}: {e}"
    return True, ""


def _ok(result, what: str):
    """cuda-python returns (error, *values): raise on an error, else the values."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else values


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELLM_KERNEL_CACHE") or Path.home() / ".cache" / "edgellm" / "kernels")


def compile_cubin(sm: int) -> bytes:
    """The kernels as a cubin for SM `sm` (e.g. 90), compiled once and cached on disk.
    Needs NVRTC, not a GPU."""
    key = hashlib.sha256(SOURCE.encode() + f"sm_{sm}".encode()).hexdigest()[:16]
    path = cache_dir() / f"w4a16-gemv-sm{sm}-{key}.cubin"
    if path.is_file():
        return path.read_bytes()
    _, nvrtc = _bindings()
    prog = _ok(nvrtc.nvrtcCreateProgram(SOURCE.encode(), b"w4a16_gemv.cu", 0, [], []), "nvrtcCreateProgram")
    options = [f"--gpu-architecture=sm_{sm}".encode(), b"--std=c++17"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    if int(err) != 0:
        size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC could not compile the W4A16 gemv for sm_{sm}:\n{log.decode(errors='replace')}")
    size = _ok(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
    _ok((err, None), "nvrtcGetCUBIN")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(cubin)
    os.replace(tmp, path)
    return cubin


@functools.cache
def _functions(device_index: int) -> dict[tuple[int, int, int], object]:
    driver, _ = _bindings()
    major, minor = torch.cuda.get_device_capability(device_index)
    # torch runs on the device's primary context; make it current here if this thread has none yet.
    if not int(_ok(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")):
        context = _ok(driver.cuDevicePrimaryCtxRetain(_ok(driver.cuDeviceGet(device_index), "cuDeviceGet")),
                      "cuDevicePrimaryCtxRetain")
        _ok(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    module = _ok(driver.cuModuleLoadData(compile_cubin(10 * major + minor)), "cuModuleLoadData")
    return {
        (m, rows, unroll): _ok(driver.cuModuleGetFunction(module, f"w4a16_gemv_m{m}_r{rows}_u{unroll}".encode()),
                               "cuModuleGetFunction")
        for m, variants in VARIANTS.items() for rows, unroll in variants
    }


def pick_variant(m: int, n: int, k: int, num_sms: int) -> tuple[int, int]:
    """Most rows per warp that still leaves >= 16 warps per SM; longer unroll for long rows."""
    for rows, unroll in sorted(VARIANTS[m], reverse=True):
        if n // rows >= 16 * num_sms:
            if rows == 1 and (1, 8) in VARIANTS[m] and k < 8192:
                return 1, 4
            return rows, unroll
    return (1, 8) if m == 1 and k >= 8192 else (1, 4)


def w4a16_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    variant: tuple[int, int] | None = None,
) -> torch.Tensor:
    """x [M <= 2, K] fp16 @ dequant(qweight)^T (+ bias) -> [M, N] fp16 (see w4a16.w4a16_linear)."""
    m, k = x.shape
    n = qweight.shape[0]
    if m not in VARIANTS:
        raise ValueError(f"the CUDA gemv serves M = 1 or 2 rows, got {m}")
    if group_size % 32 or k % group_size or qweight.shape[1] * 8 != k:
        raise ValueError(f"the CUDA gemv needs K ({k}) a multiple of the group size ({group_size}), itself a multiple of 32")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()  # rows read as 16-byte vectors
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if out is None:
        out = torch.empty(m, n, dtype=torch.float16, device=x.device)
    rows, unroll = variant or pick_variant(m, n, k, sm_count(x.device))
    func = _functions(x.device.index if x.device.index is not None else torch.cuda.current_device())[(m, rows, unroll)]
    driver, _ = _bindings()
    blocks = -(-n // (rows * WARPS_PER_BLOCK))
    params = (
        (x.data_ptr(), x.stride(0), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
         bias.contiguous().data_ptr() if bias is not None else 0, out.data_ptr(), out.stride(0), n, k, group_size),
        (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int),
    )
    stream = driver.CUstream(torch.cuda.current_stream(x.device).cuda_stream)
    (err,) = driver.cuLaunchKernel(func, blocks, 1, 1, 32 * WARPS_PER_BLOCK, 1, 1, 0, stream, params, 0)
    _ok((err, None), "cuLaunchKernel")
    return out

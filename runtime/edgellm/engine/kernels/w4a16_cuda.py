"""W4A16 linear on tensor cores, for the GPU's own weight layout: the host side of the kernels in
w4a16_source.py (their design is described there). Compiles them with NVRTC (or takes the cubin an
engine ships, or the disk cache's), repacks weights into the kernel's layout at load, picks a
configuration per shape and launches it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
from pathlib import Path

import torch

from edgellm.engine.kernels import ENGINE_KERNELS_DIR, cuda_bindings, nvrtc_usable, pdl, sm_count, w4a16_source
from edgellm.engine.kernels.w4a16_source import (  # noqa: F401 (ENTRIES, min_blocks_per_sm: for the tests and benchmarks)
    BATCH_BLOCKS, BLOCK_SHAPES, ENTRIES, SOURCE, TWO_TILE_SHAPES, block_threads, entry_name, min_blocks_per_sm)

RING_STAGES = (4, 8)  # the shallow and the deep ring of pick_config
MAX_ROWS = 8 * BATCH_BLOCKS[-1]
SLICED_ROWS = 2 * MAX_ROWS  # up to this many rows run as slices; beyond, dequantize + cuBLAS


def available() -> tuple[bool, str]:
    """(True, "") when a CUDA GPU with tensor cores (SM >= 8.0) is here and the kernels for its SM
    are at hand: compiled for it at build time (shipped by an engine loaded in this process, see
    use_engine_kernels, or in the kernel cache), or compilable here with NVRTC; else (False, why).
    A device without NVRTC (an x86 box without the CUDA toolkit) runs the kernels an engine ships."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return False, "the W4A16 tensor-core kernel needs SM 8.0 or newer"
    if kernels_at_hand(10 * major + minor):
        return True, ""
    usable, why = nvrtc_usable()
    if usable:
        return True, ""
    return False, (f"{why}, and the engine ships no kernels compiled for SM {major}.{minor}: rebuild it with {major}.{minor} "
                   "among its --target-sm on a build host with NVRTC (it then ships them), or install NVRTC for this "
                   "CUDA version here (libnvrtc: the CUDA toolkit's cuda-nvrtc package, or pip's "
                   "nvidia-cuda-nvrtc-cu12) and restart")


def kernels_at_hand(sm: int) -> bool:
    """Whether this runtime's kernels for SM `sm` need no compiling: shipped by a loaded engine or in the cache."""
    name = cubin_name(sm)
    return name in _shipped or (cache_dir() / name).is_file()


def supports(k: int, group_size: int) -> bool:
    """Shapes the kernel takes: K a multiple of 128 (its steps are pairs of 64-wide chunks), group
    size a power of two >= 64 dividing K (a chunk lies in one group)."""
    return k % 128 == 0 and group_size >= 64 and group_size & (group_size - 1) == 0 and k % group_size == 0


def usable(k: int, group_size: int) -> bool:
    return supports(k, group_size) and available()[0]


def _ok(result, what: str):
    """cuda-python returns (error, *values): raise on an error, else the values."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else values


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELLM_KERNEL_CACHE") or Path.home() / ".cache" / "edgellm" / "kernels")


_shipped: dict[str, bytes] = {}  # cubin name -> bytes, from the engines loaded in this process


def _source() -> str:
    return SOURCE + w4a16_source.entries_source()


def cubin_name(sm: int) -> str:
    """The file name of the kernels compiled for SM `sm` from SOURCE (w4a16_source.cubin_name)."""
    return w4a16_source.cubin_name(sm, SOURCE)


def use_engine_kernels(engine_dir: Path, files, sm: int) -> list[str]:
    """Make the kernels for SM `sm` that an engine ships available to compile_cubin, so that a device
    loads them instead of compiling them at its first start: the one file this runtime uses,
    `kernels/<cubin_name(sm)>`, where the manifest lists it (checked with the other files when the
    engine is verified). Cubins built by another edgellm version (another source, another name) are
    not read, as `edgellm doctor` reports them. The names taken ([] or [that name])."""
    name = cubin_name(sm)
    if f"{ENGINE_KERNELS_DIR}/{name}" not in files:
        return []
    _shipped[name] = (Path(engine_dir) / ENGINE_KERNELS_DIR / name).read_bytes()
    return [name]


def compile_cubin(sm: int) -> bytes:
    """The kernels as a cubin for SM `sm` (e.g. 90): from the disk cache, else from an engine that
    ships them (use_engine_kernels), else compiled with NVRTC (no GPU needed); then cached on disk."""
    source, name = _source(), cubin_name(sm)
    path = cache_dir() / name
    if path.is_file():
        return path.read_bytes()
    cubin = _shipped.get(name) or _nvrtc_compile(source, sm)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache costs the next start a compile, nothing else
    return cubin


def _nvrtc_compile(source: str, sm: int) -> bytes:
    _, nvrtc = cuda_bindings()
    prog = _ok(nvrtc.nvrtcCreateProgram(source.encode(), b"w4a16_mma.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture=sm_{sm}".encode(), b"--std=c++17"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if int(err) != 0:
            size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile the W4A16 kernels for sm_{sm}:\n{log.decode(errors='replace')}")
        size = _ok(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _ok((err, None), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@functools.cache
def _functions(device_index: int) -> dict[str, object]:
    driver, _ = cuda_bindings()
    major, minor = torch.cuda.get_device_capability(device_index)
    # torch runs on the device's primary context; make it current here if this thread has none yet.
    if not int(_ok(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")):
        context = _ok(driver.cuDevicePrimaryCtxRetain(_ok(driver.cuDeviceGet(device_index), "cuDeviceGet")),
                      "cuDevicePrimaryCtxRetain")
        _ok(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    module = _ok(driver.cuModuleLoadData(compile_cubin(10 * major + minor)), "cuModuleLoadData")
    ring = [entry_name(*e) for e in ENTRIES] + list(BULK_ENTRIES)
    names = ring + ["w4a16_mma_dequant", "w4a16_mma_repack", "w4a16_mma_pack_scales"]
    functions = {name: _ok(driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction") for name in names}
    # The rings take more than the 48 KB of shared memory a block gets without asking.
    optin = max_shared_bytes(device_index)
    for name in ring:
        _ok((driver.cuFuncSetAttribute(functions[name], driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       optin)[0], None), "cuFuncSetAttribute")
    return functions


@functools.cache
def max_shared_bytes(device_index: int) -> int:
    """Shared memory one block may use on this GPU, asked for (bytes): 227 KB on SM 9.0, 163 KB
    on SM 8.0 and 8.7 (Jetson Orin), 99 KB on SM 8.6 and 8.9 (L40S)."""
    driver, _ = cuda_bindings()
    return int(_ok(driver.cuDeviceGetAttribute(
        driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device_index), "cuDeviceGetAttribute"))


@functools.cache
def shared_bytes_per_sm(device_index: int) -> int:
    """Shared memory of one SM (bytes; 228 KB on SM 9.0), which the blocks resident on it share."""
    driver, _ = cuda_bindings()
    return int(_ok(driver.cuDeviceGetAttribute(
        driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, device_index),
        "cuDeviceGetAttribute"))


def _launch(name: str, device: torch.device, grid: int, threads: int, shared: int, args: tuple, types: tuple,
            early_start: bool = False) -> None:
    """early_start: launch with programmatic stream serialization (the kernel waits for the
    previous one itself, after its independent prologue); SM 9.0+, see kernels/pdl.py."""
    driver, _ = cuda_bindings()
    func = _functions(device.index if device.index is not None else torch.cuda.current_device())[name]
    config = _launch_config(grid, threads, shared, torch.cuda.current_stream(device).cuda_stream, early_start)
    (err,) = driver.cuLaunchKernelEx(config, func, (args, types), 0)
    _ok((err, None), f"cuLaunchKernelEx({name})")


@functools.lru_cache(maxsize=1024)
def _launch_config(grid: int, threads: int, shared: int, stream: int, early_start: bool):
    """One launch configuration per shape and stream, built once (an engine has a few dozen)."""
    driver, _ = cuda_bindings()
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
    config.sharedMemBytes = shared
    config.hStream = driver.CUstream(stream)
    if early_start:
        attribute = driver.CUlaunchAttribute()
        attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attribute.value.programmaticStreamSerializationAllowed = 1
        config.attrs = [attribute]
        config.numAttrs = 1
    return config


# ---- the layout ---------------------------------------------------------------------------


def _chunk_order() -> torch.Tensor:
    """[step j, fragment column kk] -> k within the 64-wide chunk: 16 t + 4 j + 2 h + e for kk = 2 t + 8 h + e."""
    j = torch.arange(4).view(4, 1)
    kk = torch.arange(16).view(1, 16)
    return 16 * ((kk % 8) // 2) + 4 * j + 2 * (kk // 8) + kk % 2


def _slot_index() -> torch.Tensor:
    """[32 lanes, 8 nibble slots] -> position r * 16 + kk in the 16 x 16 fragment block (see the module doc)."""
    lane = torch.arange(32).view(32, 1)
    slot = torch.arange(8).view(1, 8)
    g, t = lane // 4, lane % 4
    # slot s sits at bits 4 s: s & 1 picks row g or g + 8, s & 2 columns + 8, s & 4 the second of a pair
    row = g + 8 * (slot & 1)
    col = 2 * t + (slot >> 2) + 8 * ((slot >> 1) & 1)
    return row * 16 + col


def to_mma_layout(qweight: torch.Tensor) -> torch.Tensor:
    """int4-rowpacked-v1 [N, K / 8] int32 (weight 8 w + i at bits 4 i of word w) -> the mma
    layout, a flat int32 tensor of ceil(N / 16) * K / 2 words (rows past N are zero)."""
    n, kw = qweight.shape
    k = kw * 8
    if k % 64:
        raise ValueError(f"the mma layout needs K a multiple of 64, got {k}")
    tiles, chunks = -(-n // 16), k // 64
    device = qweight.device
    shifts = 4 * torch.arange(8, device=device, dtype=torch.int32)
    order = _chunk_order().to(device).view(-1)
    slots = _slot_index().to(device).view(-1)
    out = torch.empty(tiles, chunks, 32, 4, dtype=torch.int32, device=device)
    step = max(1, 2**22 // k)  # tiles per slice: bounds the temporaries to ~100 MB
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        rows = qweight[16 * t0:16 * t1]
        q = ((rows.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8).view(-1, k)
        if q.shape[0] != 16 * (t1 - t0):
            q = torch.cat([q, q.new_zeros(16 * (t1 - t0) - q.shape[0], k)])
        # [T, r, c, (j, kk) in chunk order] -> [T, c, j, r * 16 + kk]
        q = q.view(t1 - t0, 16, chunks, 64)[..., order]
        blocks = q.view(t1 - t0, 16, chunks, 4, 16).permute(0, 2, 3, 1, 4).reshape(t1 - t0, chunks, 4, 256)
        nibbles = blocks[..., slots].view(t1 - t0, chunks, 4, 32, 8).to(torch.int32)
        words = (nibbles << shifts).sum(-1, dtype=torch.int32)  # disjoint bit fields: the sum is their OR
        out[t0:t1] = words.permute(0, 1, 3, 2)  # [T, c, lane, j]
    return out.view(-1)


def repack_on_gpu(qweight: torch.Tensor) -> torch.Tensor:
    """to_mma_layout of a CUDA tensor in one kernel (w4a16_mma_repack): the same words."""
    n, kw = qweight.shape
    k = kw * 8
    if k % 64:
        raise ValueError(f"the mma layout needs K a multiple of 64, got {k}")
    qweight = qweight.contiguous()
    words = -(-n // 16) * (k // 64) * 128
    out = torch.empty(words, dtype=torch.int32, device=qweight.device)
    _launch("w4a16_mma_repack", qweight.device, -(-words // 256), 256, 0, (qweight.data_ptr(), out.data_ptr(), n, k),
            (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int))
    return out


def from_mma_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of to_mma_layout: back to int4-rowpacked-v1 [N, K / 8] (tests, tools)."""
    tiles, chunks = -(-n // 16), k // 64
    shifts = 4 * torch.arange(8, device=packed.device, dtype=torch.int32)
    words = packed.view(tiles, chunks, 32, 4).permute(0, 1, 3, 2)  # [T, c, j, lane]
    nibbles = ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)
    blocks = torch.empty(tiles, chunks, 4, 256, dtype=torch.uint8, device=packed.device)
    blocks[..., _slot_index().to(packed.device).view(-1)] = nibbles.reshape(tiles, chunks, 4, 256)
    in_order = blocks.view(tiles, chunks, 4, 16, 16).permute(0, 3, 1, 2, 4).reshape(tiles * 16, chunks, 64)
    q = torch.empty_like(in_order)
    q[..., _chunk_order().to(packed.device).view(-1)] = in_order
    q = q.view(tiles * 16, k)[:n]
    return (q.reshape(n, k // 8, 8).to(torch.int32) << shifts).sum(-1, dtype=torch.int32)


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """[N, K / G] fp16 scales and zeros -> int32 [tiles, K / G, 8, 2]: element (T, q, g, h) holds
    the scale (low half) and the zero term (high half) of row 16 T + g + 8 h, group q: 1024 + zero
    for h = 0, -(64 + zero) for h = 1 (what unpack_a subtracts; exact in fp16 for zeros 0..15)."""
    n, ng = scales.shape
    tiles = -(-n // 16)
    second_half = (torch.arange(n, device=zeros.device) % 16 >= 8).unsqueeze(1)  # rows g + 8 of their tile
    zero_term = torch.where(second_half, -(zeros.float() + 64), zeros.float() + 1024).half()
    s = scales.view(torch.int16).to(torch.int32) & 0xFFFF
    z = zero_term.view(torch.int16).to(torch.int32) << 16
    both = s | z
    if tiles * 16 != n:
        both = torch.cat([both, both.new_zeros(tiles * 16 - n, ng)])
    return both.view(tiles, 2, 8, ng).permute(0, 3, 2, 1).contiguous()


def pack_scales_on_gpu(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """pack_scales of CUDA tensors in one kernel (w4a16_mma_pack_scales): the same words."""
    if scales.dtype != torch.float16:
        raise ValueError(f"the mma kernel's scales are fp16, got {scales.dtype}")
    n, ng = scales.shape
    scales, zeros = scales.contiguous(), zeros.to(torch.float16).contiguous()
    out = torch.empty(-(-n // 16), ng, 8, 2, dtype=torch.int32, device=scales.device)
    _launch("w4a16_mma_pack_scales", scales.device, -(-out.numel() // 256), 256, 0,
            (scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), n, ng),
            (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int))
    return out


@dataclasses.dataclass
class MmaWeights:
    """An INT4 weight [N, K] in the kernel's layout (to_mma_layout, pack_scales). gate_up: a
    fused gate|up projection ([gate; up] rows, N = 2 I) whose rows were interleaved
    (interleave_gate_up): the linear then returns SiLU(gate) * up, [M, I]."""

    qweight: torch.Tensor
    scale_zero: torch.Tensor
    n: int
    k: int
    group_size: int
    gate_up: bool = False

    @classmethod
    def from_rowpacked(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int, gate_up: bool = False) -> "MmaWeights":
        n, k = qweight.shape[0], qweight.shape[1] * 8
        if not supports(k, group_size) or tuple(scales.shape) != (n, k // group_size):
            raise ValueError(f"the mma kernel needs a power-of-two group size >= 64 dividing K={k} and scales "
                             f"[N, K // G]; got group size {group_size}, scales {tuple(scales.shape)}")
        if -(-n // 16) * 16 * k // 32 >= 2 ** 31:
            raise ValueError(f"the mma kernel addresses a weight's 16-byte words with 32-bit offsets: at most 2^31 "
                             f"of them (a 32 GB INT4 weight); [{n}, {k}] has more: split the projection")
        if gate_up:
            qweight, scales, zeros = (interleave_gate_up(t) for t in (qweight, scales, zeros))
        if qweight.is_cuda:
            return cls(repack_on_gpu(qweight), pack_scales_on_gpu(scales, zeros), n, k, group_size, gate_up)
        return cls(to_mma_layout(qweight), pack_scales(scales, zeros), n, k, group_size, gate_up)


def interleave_gate_up(rows: torch.Tensor) -> torch.Tensor:
    """[gate; up] rows (2 I of them, I a multiple of 8) -> per 16-row tile T: gate rows 8 T .. 8 T + 7,
    then up rows 8 T .. 8 T + 7. A lane of the kernel then holds a feature's gate and up together."""
    n = rows.shape[0]
    if n % 16:
        raise ValueError(f"gate|up interleaving needs 2 I rows with I a multiple of 8, got {n} rows")
    inter = n // 2
    tile = torch.arange(inter // 8, device=rows.device).view(-1, 1, 1)
    half = torch.arange(2, device=rows.device).view(1, 2, 1)
    j = torch.arange(8, device=rows.device).view(1, 1, 8)
    return rows[(half * inter + 8 * tile + j).reshape(-1)]


# ---- the linear -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MmaConfig:
    """How one call runs: `warps` per block (K split that many ways: 1, 2, 4, 8 or 16), a ring
    of `stages` slots per warp, `tiles` 16-row output tiles per block (a block shape of
    BLOCK_SHAPES, or of TWO_TILE_SHAPES for 2 tiles, which take up to 8 rows of x); early_start
    None: programmatic dependent launch where pdl.active says so (graph capture)."""

    warps: int = 8
    stages: int = 4
    early_start: bool | None = None
    tiles: int = 1

    def __post_init__(self):
        shapes = {1: BLOCK_SHAPES, 2: TWO_TILE_SHAPES}.get(self.tiles)
        if shapes is None:
            raise ValueError(f"blocks compute 1 or 2 tiles, not {self.tiles}")
        if self.warps not in (1, 2, 4, 8, 16) or (block_threads(self.warps), self.stages) not in shapes:
            raise ValueError(f"no W4A16 kernel for {self.warps} warps with a ring of {self.stages} and {self.tiles} "
                             f"tile(s) per block: one tile takes warps 1-8 with rings of 4, 5 or 8 slots and 16 warps "
                             f"with 4 or 5; two tiles take warps 1-8 with rings of 3 or 4 and 16 warps with 3")


def _preferred_config(n: int, k: int, num_sms: int, rows: int) -> MmaConfig:
    """Where the tiles fill the SMs with blocks (more than two per SM): 8 warps per tile (K
    split 8 ways: the most warps per SM for the fewest cross-warp sums), each with a ring of
    4 pairs (shared memory and L1 for 4 blocks per SM). Where they give at most two blocks per
    SM (o, down), occupancy is bound by the block count: 16 warps per tile where K has at least
    2 pairs per warp for them (8B o and down: 14.6 against 15.6 us at M = 1, 1B down 5.9
    against 7.2), with a ring of 5 where that holds the warp's whole share (it is then all
    requested before the wait for the previous kernel) and of 4 otherwise; else 8 warps with
    the deep ring. Measured in docs/dev/kernels-notes.md (sweep-mma).

    Blocks of two tiles (one read of x for both) won on an H200 (sweep-mma, two calls) where
    their grid is one wave of blocks that each stream at least 4 pairs per warp: from 4 rows
    with 8 warps where there are at most 4 tiles per SM (8B qkv, M = 4: 7.26 against 7.32 us,
    M = 8: 7.65 against 8.53) and with 16 warps and a ring of 3 where the two-tile blocks still
    cover ~all SMs and K has 4 pairs per warp (8B down, M = 4: 14.0 against 14.6, M = 8: 14.5
    against 16.2); at every M with 4 warps where 8 would get fewer than 4 pairs (1B gate_up,
    M = 1: 8.7 against 9.6, M = 4: 9.8 against 10.4). They lost at M = 2 (8B down 13.6 against
    13.1), where the grid takes several waves (8B gate_up, M = 4: 30.7 against 27.4) or leaves
    SMs idle (1B down). EDGELLM_MMA_TWO_TILES=0 turns them off, for measuring."""
    warps = 8
    while warps > 1 and k // 128 < 2 * warps:
        warps //= 2
    tiles = -(-n // 16)
    pairs = k // 128
    two_tiles = rows <= 8 and os.environ.get("EDGELLM_MMA_TWO_TILES", "1") != "0"
    if tiles > 2 * num_sms:
        if two_tiles and rows >= 4 and warps == 8 and pairs >= 4 * 8 and tiles <= 4 * num_sms:
            return MmaConfig(8, 4, tiles=2)
        if two_tiles and 4 * 4 <= pairs < 4 * 8:
            return MmaConfig(4, 4, tiles=2)
        return MmaConfig(warps, RING_STAGES[0])
    if pairs >= 2 * 16:
        if two_tiles and rows >= 4 and pairs >= 4 * 16 and 10 * -(-tiles // 2) >= 9 * num_sms:
            return MmaConfig(16, 3, tiles=2)
        return MmaConfig(16, 5 if pairs <= 4 * 16 else 4)
    return MmaConfig(warps, RING_STAGES[-1])


def pick_config(n: int, k: int, num_sms: int, rows: int = 1, shared_limit: int | None = None,
                split_group: bool = False) -> MmaConfig:
    """The configuration for an [rows, k] x [n, k]^T call on a GPU of `num_sms` SMs (the choice
    measured on the H100 and H200: _preferred_config), or, where that needs more shared memory
    per block than `shared_limit` bytes (an L40S allows 99 KB: 16 warps with a ring of 5 need
    110 KB), the first that fits of: a shallower ring, one tile per block, half the warps."""
    preferred = _preferred_config(n, k, num_sms, rows)
    if shared_limit is None:
        return preferred
    mb = batch_block(min(rows, MAX_ROWS))
    for config in _smaller_configs(preferred):
        if shared_bytes(config, mb, split_group) <= shared_limit:
            return config
    raise RuntimeError(f"no W4A16 kernel configuration fits in {shared_limit} bytes of shared memory per block "
                       f"(the smallest needs {shared_bytes(MmaConfig(1, RING_STAGES[0]), mb, split_group)})")


def _smaller_configs(config: MmaConfig):
    """config, then the ones pick_config falls back to, each needing less shared memory."""
    threads = block_threads(config.warps)
    shapes = TWO_TILE_SHAPES if config.tiles == 2 else BLOCK_SHAPES
    for stages in sorted((st for th, st in shapes if th == threads and st <= config.stages), reverse=True):
        yield MmaConfig(config.warps, stages, config.early_start, config.tiles)
    warps = config.warps
    while warps >= 1:
        yield MmaConfig(warps, RING_STAGES[0], config.early_start)
        warps //= 2


# ---- the bulk-streamed kernel (SM 9.0+, decode) -----------------------------------------------

BULK_ENTRIES = ("w4a16_bulk", "w4a16_bulk_g64")  # G >= 128, G = 64
BULK_WARPS = 8  # consumer warps per block (one more warp issues the copies)
BULK_RING = 256 + 2 * BULK_WARPS * 512  # shared memory before the ring: barriers, cross-warp sums
BULK_MAX_STAGES = 16


@dataclasses.dataclass(frozen=True)
class BulkConfig:
    """How a call of the bulk-streamed kernel runs (w4a16_source.py, "Bulk-streamed blocks"): K split
    `ks` ways inside a block (1, 2, 4 or 8; a unit of work is 8 / ks tiles over all of K), `stages`
    stages of 8 KB of weights in flight per block (2..16), `grid` persistent blocks taking the units
    in turn. early_start as MmaConfig's."""

    ks: int
    stages: int
    grid: int
    early_start: bool | None = None

    def __post_init__(self):
        if self.ks not in (1, 2, 4, 8) or not 2 <= self.stages <= BULK_MAX_STAGES or self.grid < 1:
            raise ValueError(f"no bulk W4A16 launch with K split {self.ks} ways, {self.stages} stages and {self.grid} "
                             f"blocks: the split is 1, 2, 4 or 8, the stages 2..{BULK_MAX_STAGES}")


def bulk_stage_bytes(rows: int, ks: int) -> int:
    """Shared memory of one stage (the kernel's bulk_stage_bytes): 8 KB of weights, 1 KB of
    scale/zero, then each row of x's 256 * ks bytes (+ 64, the banks' shift), in 128-byte units."""
    return -(-(9 * 1024 + rows * (256 * ks + 64)) // 128) * 128


def bulk_shared_bytes(config: BulkConfig, rows: int) -> int:
    return BULK_RING + config.stages * bulk_stage_bytes(rows, config.ks)


BULK_MIN_WEIGHT_BYTES = 24 << 20  # the bulk kernel runs for INT4 weights of at least this size (see bulk_supported)


def bulk_supported(device: torch.device, rows: int, n: int, k: int) -> bool:
    """Whether a call of up to 8 rows runs the bulk kernel: on SM 9.0+ (the copy engine's
    cp.async.bulk), for weights of at least BULK_MIN_WEIGHT_BYTES. Measured on an H100
    (docs/benchmarks.md, 2026-12-07): it beat the ring kernel on the 8B shape's gate|up (0.90x) and
    down (0.96x), and tied or lost on the smaller projections (8B o and q|k|v, the 1B's: the 1B
    decode step was 8% slower with it everywhere). EDGELLM_W4A16_BULK: `auto` (default, this rule),
    0 (never), 1 (every call it takes) or `down` (projections with K > N), for measuring."""
    mode = os.environ.get("EDGELLM_W4A16_BULK", "auto")
    if rows > 8 or mode == "0" or (mode == "down" and k <= n) or (mode == "auto" and n * k // 2 < BULK_MIN_WEIGHT_BYTES):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pick_bulk_config(n: int, k: int, num_sms: int, rows: int, sm_shared: int, blocks_per_sm: int | None = None,
                     max_stages: int | None = None, min_split: int | None = None) -> BulkConfig | None:
    """K split 8 ways (one 8 KB weight copy per stage, a unit per tile: fewer splits, more tiles per
    unit, measured slower: 8B gate|up 34.1 against 25.2 us with a split of 2) or, where K has fewer
    pairs, as many as divide them; units shared evenly among as few blocks as take them all; 3
    blocks per SM where there are units for them (8B gate|up: 24.1 against 25.2 us at 2), else 2
    with more stages each (8B down: 13.8 against 15.4 us at 3); as many stages as the block's share
    of shared memory holds (at most `max_stages`, 12). None where not even two stages fit.
    EDGELLM_BULK_BLOCKS_PER_SM, EDGELLM_BULK_STAGES and EDGELLM_BULK_MIN_SPLIT override the
    choices, for measuring."""
    blocks_per_sm = blocks_per_sm or int(os.environ.get("EDGELLM_BULK_BLOCKS_PER_SM", "0"))
    max_stages = max_stages or int(os.environ.get("EDGELLM_BULK_STAGES", "12"))
    min_split = min_split or int(os.environ.get("EDGELLM_BULK_MIN_SPLIT", "8"))
    tiles, pairs = -(-n // 16), k // 128
    splits = [ks for ks in (1, 2, 4, 8) if pairs % ks == 0 and ks >= min(min_split, pairs & -pairs)]
    if not blocks_per_sm:
        blocks_per_sm = 3 if -(-tiles * splits[0] // BULK_WARPS) >= 3 * num_sms else 2
    target = blocks_per_sm * num_sms
    ks = next((ks for ks in splits if -(-tiles * ks // BULK_WARPS) >= target), splits[-1])
    units = -(-tiles // (BULK_WARPS // ks))
    grid = -(-units // -(-units // target))
    budget = sm_shared // blocks_per_sm - 1024  # the driver keeps 1 KB per block
    stages = min(max_stages, BULK_MAX_STAGES, (budget - BULK_RING) // bulk_stage_bytes(rows, ks))
    return BulkConfig(ks, stages, grid) if stages >= 2 else None


def batch_block(rows: int) -> int:
    """MB of the kernel entry for up to 16 rows of x: 1 up to 8 rows, else 2."""
    return next(b for b in BATCH_BLOCKS if 8 * b >= rows)


def shared_bytes(config: MmaConfig, mb: int, split_group: bool) -> int:
    """Dynamic shared memory of one block: the warps' rings (weights, then scale/zero), then the cross-warp sums."""
    ring = config.warps * config.stages * config.tiles * (1024 + 256 * (2 if split_group else 1))
    return ring + (config.warps - 1) * config.tiles * 4 * mb * 32 * 4


@dataclasses.dataclass
class Fold:
    """RMSNorm folded into the projections on either side of it (decode, up to MAX_ROWS rows).

    RMSNorm(h) * weight @ W^T = (h * weight) @ W^T * rsqrt(mean(h^2) + eps): the projection
    after a norm takes `scaled` = h * weight (fp16) and each row's sum of squares of h, and
    scales its sums by the rsqrt (`in_sumsq`, `eps`). The projection before a norm adds its
    result into the residual stream h (`add_to_out`: `out` is h, updated in place), and
    writes what the next one needs: h * the next norm's weight (`next_weight` -> `scaled`)
    and h's sums of squares (`out_sumsq`, added to: it must start at zero). No norm kernel
    runs between the two. Rounding: h * weight is rounded to fp16 where the norm rounds
    h * rsqrt(..) * weight; both are one fp16 rounding of the same product up to a row factor."""

    in_sumsq: torch.Tensor | None = None  # [M] fp64 (see the kernel's Fold: run-to-run exact sums)
    eps: float = 0.0
    add_to_out: bool = False
    out_sumsq: torch.Tensor | None = None  # [M] fp64
    next_weight: torch.Tensor | None = None  # [N] fp16
    scaled: torch.Tensor | None = None  # [M, N] fp16

    def check(self, m: int, n: int, gate_up: bool) -> None:
        for name in ("in_sumsq", "out_sumsq"):
            t = getattr(self, name)
            if t is not None and (t.dtype != torch.float64 or t.numel() < m or not t.is_contiguous()):
                raise ValueError(f"Fold.{name} must be a contiguous fp64 tensor of >= {m} rows, got {t.dtype} "
                                 f"[{t.numel()}]")
        if (self.next_weight is None) != (self.scaled is None):
            raise ValueError("Fold.next_weight and Fold.scaled go together")
        if self.next_weight is not None and (self.next_weight.dtype != torch.float16 or self.next_weight.shape != (n,)
                                             or self.scaled.shape != (m, n) or self.scaled.stride(1) != 1):
            raise ValueError(f"Fold.next_weight must be fp16 [{n}] and Fold.scaled fp16 [{m}, {n}]")
        if gate_up and (self.add_to_out or self.out_sumsq is not None or self.next_weight is not None):
            raise ValueError("a gate|up projection's output (SiLU(gate) * up) feeds no norm")

    def args(self) -> tuple:
        def ptr(t):
            return 0 if t is None else t.data_ptr()

        return (ptr(self.in_sumsq), self.eps, int(self.add_to_out), ptr(self.out_sumsq), ptr(self.next_weight),
                ptr(self.scaled), 0 if self.scaled is None else self.scaled.stride(0))


_NO_FOLD = Fold()
_FOLD_TYPES = (ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
               ctypes.c_longlong)


def w4a16_mma_linear(x: torch.Tensor, w: MmaWeights, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, config: MmaConfig | None = None,
                     fold: Fold | None = None) -> torch.Tensor:
    """x [M, K] fp16 @ dequant(W)^T (+ bias) -> [M, N] fp16 (w.gate_up: SiLU(gate) * up, [M, N / 2];
    bias interleaved as the rows). Up to 16 rows per launch, up to SLICED_ROWS as slices of 16;
    more rows dequantize to fp16 once and call cuBLAS. fold: a norm folded in (see Fold; up to
    MAX_ROWS rows, `out` given when it adds into it)."""
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"x has {k} in-features, the weight has {w.k}")
    if fold is not None:
        if m > MAX_ROWS:
            raise ValueError(f"a folded norm runs in one launch: up to {MAX_ROWS} rows, got {m}")
        if fold.add_to_out and out is None:
            raise ValueError("Fold.add_to_out adds into `out`: pass it")
        fold.check(m, w.n, w.gate_up)
    if out is None:
        out = torch.empty(m, w.n // 2 if w.gate_up else w.n, dtype=torch.float16, device=x.device)
    if m == 0:
        return out
    if m > SLICED_ROWS:
        dense = dequantize_mma(w).t()
        if not w.gate_up:
            return torch.matmul(x, dense, out=out) if bias is None else torch.addmm(bias, x, dense, out=out)
        from edgellm.engine.kernels import fused

        gate_up = torch.matmul(x, dense) if bias is None else torch.addmm(bias, x, dense)
        return fused.silu_mul(gate_up, interleaved=True, out=out)
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()  # x read as 16-byte vectors
    if bias is not None:
        bias = bias.contiguous()
    gshift = w.group_size.bit_length() - 1
    split_group = w.group_size == 64
    device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if isinstance(config, BulkConfig) or (config is None and bulk_supported(x.device, m, w.n, k)):
        cfg = config or pick_bulk_config(w.n, k, sm_count(x.device), m, shared_bytes_per_sm(device_index))
        if cfg is not None:
            _launch_bulk(x, w, bias, out, cfg, fold or _NO_FOLD, gshift)
            return out
    for m0 in range(0, m, MAX_ROWS):
        rows = min(MAX_ROWS, m - m0)
        mb = batch_block(rows)
        limit = max_shared_bytes(device_index)
        cfg = config or pick_config(w.n, k, sm_count(x.device), rows, limit, split_group)
        if cfg.tiles == 2 and mb > 1:
            raise ValueError(f"two-tile blocks take up to 8 rows of x per launch, got {rows}")
        shared = shared_bytes(cfg, mb, split_group)
        if shared > limit:
            raise ValueError(f"{cfg} needs {shared} bytes of shared memory per block for "
                             f"{rows} rows; this GPU allows {limit}: use a shallower ring or fewer warps (pick_config "
                             f"chooses one that fits)")
        early_start = pdl.active(x.device) if cfg.early_start is None else cfg.early_start
        xs, outs = x[m0:m0 + rows], out[m0:m0 + rows]
        _launch(entry_name(mb, cfg.stages, split_group, block_threads(cfg.warps), cfg.tiles), x.device,
                -(-w.n // (16 * cfg.tiles)), 32 * cfg.warps, shared,
                (xs.data_ptr(), xs.stride(0), rows, w.qweight.data_ptr(), w.scale_zero.data_ptr(),
                 0 if bias is None else bias.data_ptr(), outs.data_ptr(), outs.stride(0), w.n, k, gshift,
                 int(w.gate_up)) + (fold or _NO_FOLD).args(),
                (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                 ctypes.c_int) + _FOLD_TYPES,
                early_start)
    return out


def _launch_bulk(x: torch.Tensor, w: MmaWeights, bias: torch.Tensor | None, out: torch.Tensor, cfg: BulkConfig,
                 fold: Fold, gshift: int) -> None:
    m, k = x.shape
    if m > 8 or (k // 128) % cfg.ks:
        raise ValueError(f"the bulk kernel takes up to 8 rows and a K split dividing K / 128; got {m} rows, K {k}, "
                         f"{cfg}")
    shared = bulk_shared_bytes(cfg, m)
    limit = max_shared_bytes(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if shared > limit:
        raise ValueError(f"{cfg} needs {shared} bytes of shared memory per block for {m} rows; this GPU allows "
                         f"{limit}: use fewer stages (pick_bulk_config chooses a number that fits)")
    early_start = pdl.active(x.device) if cfg.early_start is None else cfg.early_start
    _launch(BULK_ENTRIES[w.group_size == 64], x.device, cfg.grid, 32 * (BULK_WARPS + 1), shared,
            (x.data_ptr(), x.stride(0), m, w.qweight.data_ptr(), w.scale_zero.data_ptr(),
             0 if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), w.n, k, gshift,
             int(w.gate_up)) + fold.args() + (cfg.ks.bit_length() - 1, cfg.stages),
            (ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int,
             ctypes.c_int) + _FOLD_TYPES + (ctypes.c_int, ctypes.c_int),
            early_start)


def dequantize_mma(w: MmaWeights) -> torch.Tensor:
    """The fp16 weight [N, K], each (q - zero) * scale rounded once."""
    dense = torch.empty(w.n, w.k, dtype=torch.float16, device=w.qweight.device)
    threads = -(-w.n // 16) * (w.k // 64) * 32
    _launch("w4a16_mma_dequant", w.qweight.device, -(-threads // 128), 128, 0,
            (w.qweight.data_ptr(), w.scale_zero.data_ptr(), dense.data_ptr(), w.n, w.k, w.group_size.bit_length() - 1),
            (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int))
    return dense

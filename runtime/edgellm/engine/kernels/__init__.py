"""Triton GPU kernels for decode: W4A16 linear and decode attention.

CI and CPU-only hosts have no Triton: importing this package (and its modules) never
fails there; `available()` says whether the kernels can run.
"""

from __future__ import annotations

import functools
import threading


ENGINE_KERNELS_DIR = "kernels"  # where an engine ships its compiled kernels (builder.write_engine_kernels)


def cubin_prefix(sm: int) -> str:
    """How the file name of the W4A16 cubin for SM `sm` (e.g. 90) starts; the rest is a hash of the
    kernel source and ".cubin" (w4a16_source.cubin_name, which the doctor also calls)."""
    return f"w4a16-mma-sm{sm}-"


def cuda_bindings():
    """cuda-python's (driver, nvrtc) modules, in either package layout. Torch-free (the doctor uses it)."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        from cuda import cuda as driver, nvrtc  # cuda-python < 12.6
    return driver, nvrtc


@functools.cache
def nvrtc_usable() -> tuple[bool, str]:
    """(True, "NVRTC X.Y") when cuda-python can reach NVRTC on this host (no GPU needed), else
    (False, why). The tensor-core W4A16 kernels are compiled with it (at build time or at a
    device's first start)."""
    try:
        _, nvrtc = cuda_bindings()
        err, major, minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            raise RuntimeError(f"nvrtcVersion failed: {err}")
    except Exception as e:  # noqa: BLE001 - any failure to reach NVRTC means: not here
        first_line = str(e).splitlines()[0] if str(e) else ""
        return False, f"NVRTC is not usable: {type(e).__name__}: {first_line}"
    return True, f"NVRTC {major}.{minor}"


@functools.cache
def available() -> bool:
    """True when Triton imports and a CUDA GPU is visible."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device, which the kernels size their grids by
    (4 for the CPU, where Triton's interpreter runs them in tests)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def start_hashing_compiler() -> threading.Thread | None:
    """Before it looks up its first compiled kernel, Triton hashes its own sources and its
    ~100 MB library (`triton_key`, cached for the process): ~0.4 s of an engine's start-up.
    Started on a thread while the engine's weights are read, the two overlap (both spend
    most of their time in hashing and file reads, which run without the GIL)."""
    if not available():
        return None
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return None
    thread = threading.Thread(target=triton_key, name="triton-key", daemon=True)
    thread.start()
    return thread

"""Who this device is, from the CUDA driver through cuda-python: GPU name, SM, driver version, memory.

No torch here on purpose: the updater decides whether a bundle fits this device before any
model code is imported. A host without an NVIDIA driver or without a visible GPU reports
sm="cpu" (and its system RAM as memory), and accepts only engines built for "cpu".
"""

from __future__ import annotations

import dataclasses
import os

from edgellm.engine.manifest import CPU_TARGET
from edgellm.errors import EdgeLLMError


class DeviceQueryError(EdgeLLMError):
    """The CUDA driver sees a GPU but would not describe it."""


@dataclasses.dataclass(frozen=True)
class DeviceIdentity:
    gpu_name: str | None  # None on a CPU-only host
    sm: str  # "8.7", "8.9", "9.0", ... or "cpu"
    driver_version: str | None  # CUDA driver API version, e.g. "12.4"; None without a driver
    total_memory_bytes: int  # GPU memory (Jetson: the shared DRAM); system RAM on a CPU-only host
    free_memory_bytes: int
    detail: str = ""  # why a host counts as CPU-only, for `edgellm doctor`

    @property
    def is_cpu(self) -> bool:
        return self.sm == CPU_TARGET

    def describe(self) -> str:
        gib = 1 << 30
        mem = f"{self.free_memory_bytes / gib:.1f} of {self.total_memory_bytes / gib:.1f} GiB free"
        if self.is_cpu:
            return f"CPU only ({self.detail or 'no GPU'}), RAM {mem}"
        return f"{self.gpu_name}, SM {self.sm}, CUDA driver {self.driver_version}, memory {mem}"


def _driver_module():
    """cuda-python >= 12.6 has cuda.bindings.driver; older releases only cuda.cuda."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # type: ignore[no-redef]
    return driver


def _system_memory() -> tuple[int, int]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = total
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return total, free


def cpu_identity(detail: str) -> DeviceIdentity:
    total, free = _system_memory()
    return DeviceIdentity(None, CPU_TARGET, None, total, free, detail)


def detect(device_index: int = 0) -> DeviceIdentity:
    """Ask the CUDA driver about GPU `device_index` (after CUDA_VISIBLE_DEVICES)."""
    try:
        driver = _driver_module()
    except ImportError:
        return cpu_identity("cuda-python is not installed")
    try:
        (err,) = driver.cuInit(0)
    except Exception as e:  # noqa: BLE001 - cuda-python raises its own loader errors when libcuda is absent
        return cpu_identity(f"no NVIDIA driver ({type(e).__name__})")
    ok = driver.CUresult.CUDA_SUCCESS
    if err != ok:
        return cpu_identity(f"the CUDA driver did not initialise ({_name(err)})")

    def call(fn, *args):
        result = fn(*args)
        err, values = result[0], result[1:]
        if err != ok:
            raise DeviceQueryError(f"{fn.__name__} failed with {_name(err)}; check the NVIDIA driver (nvidia-smi)")
        return values[0] if len(values) == 1 else values

    count = call(driver.cuDeviceGetCount)
    if count == 0:
        return cpu_identity("the NVIDIA driver sees no GPU")
    if not 0 <= device_index < count:
        raise DeviceQueryError(f"GPU {device_index} asked for, but the driver sees {count} GPU(s)")
    dev = call(driver.cuDeviceGet, device_index)
    name = call(driver.cuDeviceGetName, 256, dev)
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    attr = driver.CUdevice_attribute
    major = call(driver.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = call(driver.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    version = call(driver.cuDriverGetVersion)
    # Free memory needs a context; the primary one is what torch uses too, so retaining it
    # here creates nothing new inside the daemon.
    ctx = call(driver.cuDevicePrimaryCtxRetain, dev)
    try:
        call(driver.cuCtxPushCurrent, ctx)
        try:
            free, total = call(driver.cuMemGetInfo)
        finally:
            call(driver.cuCtxPopCurrent)
    finally:
        driver.cuDevicePrimaryCtxRelease(dev)
    return DeviceIdentity(
        gpu_name=name,
        sm=f"{int(major)}.{int(minor)}",
        driver_version=f"{int(version) // 1000}.{int(version) % 1000 // 10}",
        total_memory_bytes=int(total),
        free_memory_bytes=int(free),
    )


def _name(err) -> str:
    return getattr(err, "name", str(err))

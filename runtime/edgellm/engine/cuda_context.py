"""Create the GPU's CUDA context on a thread at process start, while Python imports torch.

Creating a CUDA context costs seconds on some hosts (the driver sets the GPU up for each
new process unless nvidia-persistenced keeps it initialised), and torch does it only when
it first touches the GPU, after its own multi-second import. The driver keeps one
*primary* context per device and torch uses exactly that one, so a context retained here
through the driver API is the one torch finds ready: the two waits overlap instead of
adding up. Torch-free on purpose (it must run before torch is imported); failures are
left for torch to report with its own, clearer errors.
"""

from __future__ import annotations

import threading


def start_creating_context(device: str = "cuda") -> threading.Thread | None:
    """Begin creating the primary context of `device` ("cuda", "cuda:N" or "auto") in the
    background; returns the thread, or None when there is nothing to do here."""
    if not (device == "auto" or device.startswith("cuda")):
        return None
    index = int(device.partition(":")[2] or 0)
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError:
            return None

    def create() -> None:
        ok = driver.CUresult.CUDA_SUCCESS
        try:
            (err,) = driver.cuInit(0)
            if err != ok:
                return
            err, dev = driver.cuDeviceGet(index)
            if err == ok:
                # Retained for the life of the process: torch uses this same context.
                driver.cuDevicePrimaryCtxRetain(dev)
        except Exception:  # noqa: BLE001 - no driver library or no GPU: torch says so when the engine loads
            return

    thread = threading.Thread(target=create, name="cuda-context", daemon=True)
    thread.start()
    return thread

"""Programmatic dependent launch (PDL) for the decode kernels, SM 9.0 and newer.

Inside a CUDA graph an 8B decode step is ~330 kernels back to back; without PDL each one
starts only after the previous one has fully finished, so every boundary leaves the GPU
idle for the launch and the first memory round trip. With PDL a kernel may start as soon
as every block of the previous one has signalled: it does the work that does not depend
on the previous kernel (the W4A16 kernel requests its first weight chunks), then waits in
`griddepcontrol.wait` until the previous kernel's results are visible. Every kernel so
launched must wait before it touches anything the kernels before it read or write; the
ones here wait at their very start, the W4A16 kernel after its weight requests. Each
signals the next kernel only after its own wait: signalling earlier lets a whole chain of
kernels start, each holding SMs while it waits for the one before.

Only launches inside `early_starts()` start early: the runner wraps its decode-graph
warm-up and capture in it, where kernels run back to back with no host in between. Eager
launches (prefill) are separated by the host's launch time anyway, and early start there
was not shown to help (docs/dev/kernels-notes.md has the TTFT runs).

EDGELLM_PDL=0 turns it off (for measuring it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts
    triton = None


@functools.cache
def enabled(device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("EDGELLM_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


_scope = threading.local()


@contextlib.contextmanager
def early_starts():
    """Kernels launched by this thread inside the block start early where PDL is enabled."""
    outer = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = outer


def active(device) -> bool:
    """Whether a launch now should start early: inside early_starts(), PDL enabled."""
    return getattr(_scope, "on", False) and enabled(device)


def triton_options(device) -> dict:
    """Keyword arguments for launching a Triton kernel that calls `start` with its PDL flag."""
    return {"PDL": True, "launch_pdl": True} if active(device) else {"PDL": False}


if triton is not None:

    @triton.jit
    def start(PDL: tl.constexpr):
        """First statement of a PDL-aware Triton kernel: wait for the previous kernel, then let
        the next one start."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

"""Triton GPU kernels for decode: W4A16 linear and decode attention.

CI and CPU-only hosts have no Triton: importing this package (and its modules) never
fails there; `available()` says whether the kernels can run.
"""

from __future__ import annotations

import functools


@functools.cache
def available() -> bool:
    """True when Triton imports and a CUDA GPU is visible."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()

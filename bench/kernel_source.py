"""Swap the W4A16 kernels' CUDA source for a variant's, for side-by-side measurements
(bench/ab_decode.py W4A16_SOURCE=current,PATH; bench/kernels.py --w4a16-source PATH), or the
decode attention for a copy of engine/kernels/decode_attention.py (ATTENTION_SOURCE=current,PATH).

A variant is a copy of runtime/edgellm/engine/kernels/w4a16_source.py (or of w4a16_cuda.py from
before the source moved out of it) whose SOURCE has the same entries and arguments; its kernels
are compiled with NVRTC on first use (and cached under their own name, the source's hash). Where
it defines shared_bytes (a variant whose blocks lay out shared memory otherwise), that replaces
the runtime's while it is in use.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys

from edgellm.engine.kernels import fused, w4a16_cuda

RUNTIME_ATTENTION = fused.decode_attention_rope
RUNTIME_SOURCE = w4a16_cuda.SOURCE  # the runtime's own ("current")
RUNTIME_SHARED_BYTES = w4a16_cuda.shared_bytes


def _load(path: str, prefix: str):
    spec = importlib.util.spec_from_file_location(f"{prefix}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def use_attention_source(value: str) -> None:
    """Make the decode attention of `value` (a copy of decode_attention.py, or "current") the one
    the model calls from the next load on (it calls fused.decode_attention_rope)."""
    fused.decode_attention_rope = (RUNTIME_ATTENTION if value == "current"
                                   else _load(value, "attention_variant").decode_attention_rope)


def use_kernel_source(value: str) -> None:
    """Make the W4A16 kernels of `value` (a copy of w4a16_source.py, or "current") the ones loaded next."""
    if value == "current":
        source, shared_bytes = RUNTIME_SOURCE, RUNTIME_SHARED_BYTES
    else:
        module = _load(value, "w4a16_variant")
        source = module.SOURCE
        shared_bytes = _called_as_runtime(module.shared_bytes) if hasattr(module, "shared_bytes") else RUNTIME_SHARED_BYTES
    w4a16_cuda.SOURCE = source
    w4a16_cuda.shared_bytes = shared_bytes  # a variant's shared-memory layout goes with its source
    w4a16_cuda._functions.cache_clear()  # the next launch loads the module compiled from `source`


def _called_as_runtime(shared_bytes):
    """A variant's shared_bytes, callable with the runtime's arguments: one that takes fewer gets
    the first ones (e.g. a copy of the runtime beside a patched runtime whose shared_bytes also
    takes the rows of x: docs/dev/experiments/w4a16-x-ring.patch)."""
    takes = len(inspect.signature(shared_bytes).parameters)
    return lambda *args: shared_bytes(*args[:takes])

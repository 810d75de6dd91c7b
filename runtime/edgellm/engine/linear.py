"""The two kinds of projection an engine holds: dense (FP16) and INT4 weight-only (W4A16).

The model never knows which one it calls. On CUDA the INT4 layer runs the Triton W4A16
kernel on the packed weights; on the CPU (the reference path) it multiplies by the
dequantized weights, computed once at load.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.engine.quant import QuantizedWeight


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16, device=device) if bias else None)
        self._dense: torch.Tensor | None = None
        self._use_kernel = False

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.group_size)

    def prepare(self, compute_dtype: torch.dtype) -> None:
        """Called once after the weights are in place, on their final device."""
        from edgellm.engine import kernels

        self._use_kernel = self.qweight.is_cuda and kernels.available()
        if not self._use_kernel:
            self._dense = self.quantized().dequantize(torch.float32).to(compute_dtype)
        if self.bias is not None:
            self.bias = self.bias.to(compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel:
            from edgellm.engine.kernels.w4a16 import w4a16_linear

            shape = x.shape
            out = w4a16_linear(x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.group_size, self.bias)
            return out.view(*shape[:-1], self.out_features)
        return nn.functional.linear(x, self._dense, self.bias)


def dense_linear(in_features: int, out_features: int, bias: bool, device=None) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=device)

"""The two kinds of projection an engine holds: dense (FP16) and INT4 weight-only (W4A16).

The model never knows which one it calls. The INT4 layer picks its path once, at load:

* CUDA GPU with NVRTC (SM >= 8.0, group size a power of two >= 64): the weights are
  rearranged into the tensor-core kernel's own layout (kernels/w4a16_cuda.py) and every
  call runs that kernel; the fused gate|up projection (gate_up) then also applies
  SiLU(gate) * up in the kernel (`fuses_silu`, `silu_gate_up`), saving a launch per layer,
  and decode steps fold the RMSNorms into the projections (`folded`, w4a16_cuda.Fold);
* other CUDA GPUs: the Triton kernels on the engine's row-packed weights (kernels/w4a16.py);
* CPU (the reference path): a matmul with the dequantized weights, computed once.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.engine.quant import QuantizedWeight


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, device=None,
                 gate_up: bool = False):
        """gate_up: the rows are [gate; up] of a feed-forward whose output is SiLU(gate) * up."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.gate_up = gate_up
        self.fuses_silu = False  # set by prepare(): silu_gate_up() is the way to call this layer
        self.fold_rows = 0  # set by prepare(): up to this many rows, folded() takes an RMSNorm in (path "mma")
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float16, device=device) if bias else None)
        self._dense: torch.Tensor | None = None
        self.path = "dense"  # "mma" | "triton" | "dense": set by prepare()

    @property
    def mma_weights(self):
        """The tensor-core kernel's view of this layer's buffers (path "mma")."""
        from edgellm.engine.kernels.w4a16_cuda import MmaWeights

        return MmaWeights(self.mma_qweight, self.mma_scale_zero, self.out_features, self.in_features, self.group_size,
                          self.fuses_silu)

    def quantized(self) -> QuantizedWeight:
        """The engine's row-packed weights (before prepare() rearranges them for the GPU)."""
        if self.path == "mma":
            raise RuntimeError("the weights are in the GPU kernel's layout now; read them from the engine file")
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.group_size)

    def prepare(self, compute_dtype: torch.dtype) -> None:
        """Called once after the weights are in place, on their final device."""
        from edgellm.engine import kernels
        from edgellm.engine.kernels import w4a16_cuda

        if self.qweight.is_cuda and w4a16_cuda.usable(self.in_features, self.group_size):
            # (prefill's long M applies the SiLU with fused.silu_mul, which needs Triton)
            self.fuses_silu = self.gate_up and self.out_features % 16 == 0 and kernels.available()
            mma = w4a16_cuda.MmaWeights.from_rowpacked(self.qweight, self.scales, self.zeros, self.group_size,
                                                       gate_up=self.fuses_silu)
            self.qweight = self.scales = self.zeros = None  # the GPU keeps one copy: the kernel's
            self.register_buffer("mma_qweight", mma.qweight)
            self.register_buffer("mma_scale_zero", mma.scale_zero)
            if self.fuses_silu and self.bias is not None:
                self.bias = w4a16_cuda.interleave_gate_up(self.bias)
            self.path = "mma"
            self.fold_rows = w4a16_cuda.MAX_ROWS
        elif self.qweight.is_cuda and kernels.available():
            self.path = "triton"
        else:
            self._dense = self.quantized().dequantize(torch.float32).to(compute_dtype)
            self.path = "dense"
        if self.bias is not None:
            self.bias = self.bias.to(compute_dtype)

    def silu_gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up [..., out_features / 2] straight from the kernel (fuses_silu layers)."""
        from edgellm.engine.kernels.w4a16_cuda import w4a16_mma_linear

        shape = x.shape
        out = w4a16_mma_linear(x.reshape(-1, shape[-1]), self.mma_weights, self.bias)
        return out.view(*shape[:-1], self.out_features // 2)

    def folded(self, x: torch.Tensor, fold, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] with an RMSNorm folded in on either side (w4a16_cuda.Fold; M <= fold_rows):
        the kernel's output [M, N] (fuses_silu layers: SiLU(gate) * up)."""
        from edgellm.engine.kernels.w4a16_cuda import w4a16_mma_linear

        return w4a16_mma_linear(x, self.mma_weights, self.bias, out=out, fold=fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuses_silu:
            raise RuntimeError("this gate|up layer's rows are interleaved for its fused SiLU: call silu_gate_up()")
        if self.path == "dense":
            return nn.functional.linear(x, self._dense, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.path == "mma":
            from edgellm.engine.kernels.w4a16_cuda import w4a16_mma_linear

            out = w4a16_mma_linear(x2, self.mma_weights, self.bias)
        else:
            from edgellm.engine.kernels.w4a16 import w4a16_linear

            out = w4a16_linear(x2, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        return out.view(*shape[:-1], self.out_features)


def dense_linear(in_features: int, out_features: int, bias: bool, device=None) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=device)

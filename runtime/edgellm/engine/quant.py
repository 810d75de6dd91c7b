"""Group-wise asymmetric INT4 weights: quantize, pack, unpack, dequantize.

The packed layout is the engine format's `int4-g{G}-v1` (see engines/README.md):

    weight W: [N out, K in], quantized per row in groups of G consecutive in-features
    q       : integers 0..15, W ~= (q - zero) * scale
    qweight : int32 [N, K // 8]; word j of row n holds q[n, 8j + i] in bits 4i..4i+3
    scales  : fp16 [N, K // G]
    zeros   : fp16 [N, K // G]   (integer-valued zero points 0..15)

Rows stay contiguous along K so a GEMV reads each row's packed words, scales and zeros
as straight lines; the GPU kernels in engine/kernels read exactly this layout.
"""

from __future__ import annotations

import dataclasses

import torch

from edgellm.errors import ConfigError

WEIGHT_LAYOUT = "int4-rowpacked-v1"
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclasses.dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # int32 [N, K // 8]
    scales: torch.Tensor  # fp16 [N, K // G]
    zeros: torch.Tensor  # fp16 [N, K // G]
    group_size: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_int4(self.qweight).to(dtype)
        n, k = q.shape
        g = self.group_size
        w = (q.view(n, k // g, g) - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]
        return w.view(n, k)

    @staticmethod
    def concat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Stack several linears that share an input along the output dimension (q|k|v, gate|up)."""
        g = parts[0].group_size
        assert all(p.group_size == g for p in parts)
        return QuantizedWeight(
            qweight=torch.cat([p.qweight for p in parts]),
            scales=torch.cat([p.scales for p in parts]),
            zeros=torch.cat([p.zeros for p in parts]),
            group_size=g,
        )


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    if group_size <= 0 or group_size % 8 or in_features % group_size:
        raise ConfigError(
            f"--group-size {group_size} must be a positive multiple of 8 that divides the in-features "
            f"of every linear layer; {name} has {in_features} in-features. Try 128, 64 or 32."
        )


def group_min_max(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    return wg.amin(dim=-1), wg.amax(dim=-1)


def _quantize_groups(w: torch.Tensor, group_size: int, clip: torch.Tensor | None):
    """Integer codes q [N, K/G, G], fp16-representable scale and zero [N, K/G] (float32)."""
    n, k = w.shape
    check_group_size(k, group_size)
    wg = w.float().reshape(n, k // group_size, group_size)
    w_min, w_max = wg.amin(dim=-1), wg.amax(dim=-1)
    if clip is not None:
        w_min, w_max = w_min * clip, w_max * clip
    # Keep zero representable, as most INT4 toolchains do, so an all-zero group stays zero.
    w_min = w_min.clamp(max=0.0)
    w_max = w_max.clamp(min=0.0)
    scale = ((w_max - w_min) / 15.0).clamp(min=1e-8)
    scale = scale.half().float()  # the kernels see fp16 scales: round with those
    zero = torch.round(-w_min / scale).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 15)
    return q, scale, zero


def quantize(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest asymmetric INT4 of w [N, K] per group.

    clip, if given, is a per-group ratio in (0, 1] [N, K // G] that shrinks the group's
    range before rounding (AWQ's clipping search chooses it; plain RTN uses 1).
    """
    n, k = w.shape
    q, scale, zero = _quantize_groups(w, group_size, clip)
    return QuantizedWeight(
        qweight=pack_int4(q.to(torch.uint8).reshape(n, k)),
        scales=scale.half(),
        zeros=zero.half(),
        group_size=group_size,
    )


def fake_quantize(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """What the engine will actually multiply by, in w's dtype (no packing round trip)."""
    q, scale, zero = _quantize_groups(w, group_size, clip)
    return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape).to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    assert k % 8 == 0, "in-features must be a multiple of 8 to pack INT4"
    q32 = q.to(torch.int32).reshape(n, k // 8, 8)
    packed = torch.zeros(n, k // 8, dtype=torch.int32, device=q.device)
    for i in range(8):
        packed |= q32[..., i] << (4 * i)
    return packed


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, kw = packed.shape
    shifts = _SHIFTS.to(packed.device)
    q = (packed[..., None] >> shifts) & 0xF
    return q.reshape(n, kw * 8).to(torch.uint8)

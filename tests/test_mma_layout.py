"""The tensor-core kernel's weight layout (engine/kernels/w4a16_cuda.py), checked on the CPU.

The kernel decodes each lane's words with fixed shifts and masks into the A fragment of
mma.m16n8k16; these tests decode the layout the same way and place the values where the
PTX ISA's fragment table says that lane's registers sit in the 16 x 16 block, so a wrong
nibble, lane, step, chunk or tile fails here, without a GPU.
"""

import pytest
import torch

from edgellm.engine.kernels import w4a16_cuda
from edgellm.engine.quant import unpack_int4

# PTX ISA, mma.m16n8k16 .f16 A fragment: register i of lane 4g + t holds two fp16 values at
# (row, column) of the 16 x 16 block; the first in the low half.
A_FRAGMENT = {
    0: (("g", "2*t"), ("g", "2*t+1")),
    1: (("g+8", "2*t"), ("g+8", "2*t+1")),
    2: (("g", "2*t+8"), ("g", "2*t+9")),
    3: (("g+8", "2*t+8"), ("g+8", "2*t+9")),
}


def _k_in_chunk(j: int, kk: int) -> int:
    """The K order inside a 64-wide chunk: fragment column kk = 2 t + 8 h + e of MMA step j
    stands for k = 16 t + 4 j + 2 h + e, so that lane t's B fragments are 16 consecutive x values."""
    t, h, e = (kk % 8) // 2, kk // 8, kk % 2
    return 16 * t + 4 * j + 2 * h + e


def _where(expr: str, g: int, t: int) -> int:
    return eval(expr, {"g": g, "t": t, "__builtins__": {}})  # noqa: S307 - the fixed table above


def _random_rowpacked(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("n,k", [(16, 64), (40, 128), (33, 256)])
def test_every_lane_register_holds_its_fragment_weights(n, k):
    qweight = _random_rowpacked(n, k, seed=n + k)
    q = unpack_int4(qweight)  # [N, K] nibble values
    packed = w4a16_cuda.to_mma_layout(qweight)
    tiles, chunks = -(-n // 16), k // 64
    assert packed.shape == (tiles * chunks * 32 * 4,)
    decoded = torch.full((tiles * 16, k), -1, dtype=torch.int64)
    words = packed.view(tiles, chunks, 32, 4).to(torch.int64) & 0xFFFFFFFF
    for tile in range(tiles):
        for c in range(chunks):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j in range(4):
                    word = int(words[tile, c, lane, j])
                    for reg, (low, high) in A_FRAGMENT.items():
                        bits = (word >> (4 * reg)) & 0x000F000F  # what the kernel's unpack_a takes
                        for (row, col), value in ((low, bits & 0xF), (high, bits >> 16)):
                            r, kk = _where(row, g, t), _where(col, g, t)
                            decoded[16 * tile + r, 64 * c + _k_in_chunk(j, kk)] = value
    assert (decoded >= 0).all(), "some weight of the block is in no lane's fragment"
    assert torch.equal(decoded[:n], q.to(torch.int64))
    assert (decoded[n:] == 0).all(), "rows past N are zero"


@pytest.mark.parametrize("n,k", [(40, 128), (4096, 4096 // 4)])
def test_layout_round_trips(n, k):
    qweight = _random_rowpacked(n, k, seed=7)
    packed = w4a16_cuda.to_mma_layout(qweight)
    assert torch.equal(w4a16_cuda.from_mma_layout(packed, n, k), qweight)


def test_scales_and_zeros_pack_by_tile_group_and_fragment_row():
    gen = torch.Generator().manual_seed(3)
    n, ng = 40, 3
    scales = (torch.rand(n, ng, generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (n, ng), generator=gen).half()
    packed = w4a16_cuda.pack_scales(scales, zeros)
    assert packed.shape == (3, ng, 8, 2)
    for row in range(n):
        for q in range(ng):
            word = int(packed[row // 16, q, row % 8, (row % 16) // 8]) & 0xFFFFFFFF
            low = torch.tensor([word & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.float16)
            high = torch.tensor([word >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16)
            zero_term = zeros[row, q].item() + 1024 if row % 16 < 8 else -(zeros[row, q].item() + 64)
            assert low.item() == scales[row, q].item() and high.item() == zero_term


def test_the_kernels_dequantization_arithmetic_is_exact_in_fp16():
    """unpack_a: rows g take (1024 + q) - (1024 + z); rows g + 8 take (1024 + 16 q) * 1/16 + -(64 + z)
    in one fp16 FMA. Every step is exact in fp16, so both give q - z for all nibbles and zeros."""
    q = torch.arange(16, dtype=torch.float64).view(16, 1)
    z = torch.arange(16, dtype=torch.float64).view(1, 16)
    half = lambda t: t.half().double()  # noqa: E731 - rounding to fp16, as the kernel's registers hold it
    first = half(half(1024 + q) - half(1024 + z))
    second = half(half(1024 + 16 * q) * half(torch.tensor(1 / 16)) + half(-(64 + z)))  # fma: one rounding
    assert torch.equal(half(1024 + q), 1024 + q) and torch.equal(half(1024 + 16 * q), 1024 + 16 * q)
    assert torch.equal(first, q - z) and torch.equal(second, q - z)


def test_shapes_the_kernel_does_not_take_are_refused_or_routed_elsewhere():
    with pytest.raises(ValueError, match="multiple of 64"):
        w4a16_cuda.to_mma_layout(torch.zeros(16, 4, dtype=torch.int32))  # K = 32
    assert not w4a16_cuda.supports(4096, 32)  # a 64-wide chunk would span two groups
    assert not w4a16_cuda.supports(1536, 96)  # not a power of two
    assert not w4a16_cuda.supports(192, 64)  # the kernel steps over pairs of 64-wide chunks
    assert w4a16_cuda.supports(4096, 128) and w4a16_cuda.supports(256, 256)


def test_gate_up_interleaving_puts_a_features_gate_and_up_in_one_tile():
    inter = 24  # 3 tiles of 8 features
    rows = torch.arange(2 * inter)  # row r of [gate; up]: gate r for r < I, up r - I after
    out = w4a16_cuda.interleave_gate_up(rows)
    for tile in range(inter // 8):
        for j in range(8):
            assert out[16 * tile + j] == 8 * tile + j  # the kernel's fragment row g: gate of feature 8 T + g
            assert out[16 * tile + 8 + j] == inter + 8 * tile + j  # row g + 8: the same feature's up
    assert sorted(out.tolist()) == rows.tolist()
    with pytest.raises(ValueError, match="multiple of 8"):
        w4a16_cuda.interleave_gate_up(torch.arange(20))


def test_a_weight_past_the_kernels_32_bit_offsets_is_refused_with_a_clear_error():
    n, k, g = 1 << 20, 1 << 17, 128  # 2^37 weights: 2^32 16-byte words (meta tensors: no memory)
    qweight = torch.empty(n, k // 8, dtype=torch.int32, device="meta")
    scales = torch.empty(n, k // g, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        w4a16_cuda.MmaWeights.from_rowpacked(qweight, scales, scales, g)

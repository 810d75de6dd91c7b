"""Greedy sampling's argmax over the vocabulary, in Triton.

torch.argmax reduces a [1, 128256] row with a handful of blocks: ~27 us on an H100, more
than two whole transformer layers of the 1B model. Here the row is split over many
programs (each finds the first maximum of its block), then one small program per row picks
the first block holding the overall maximum: the same index torch.argmax returns for
finite logits (ties go to the lowest index).
"""

from __future__ import annotations

import torch

from edgellm.engine.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts: the module imports, the kernel does not exist
    triton = None
    tl = None

BLOCK = 4096


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the first maximum of each row of a 2-D float tensor -> int64 [rows] (`out`, if
    given: a contiguous int64 [rows] tensor on the same device)."""
    if triton is None:
        raise RuntimeError("argmax_rows needs Triton; use torch.argmax on this host")
    if logits.dim() != 2:
        raise ValueError(f"expected [rows, vocab] logits, got {tuple(logits.shape)}")
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    rows, vocab = logits.shape
    blocks = triton.cdiv(vocab, BLOCK)
    part_val = torch.empty(rows, blocks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows, blocks, dtype=torch.int64, device=logits.device)
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    elif out.shape != (rows,) or out.dtype != torch.int64 or not out.is_contiguous() or out.device != logits.device:
        raise ValueError(f"out must be a contiguous int64 [{rows}] tensor on {logits.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if rows:
        _block_argmax_kernel[(rows, blocks)](logits, part_val, part_idx, vocab, logits.stride(0), blocks,
                                             BLOCK=BLOCK, num_warps=8, **pdl.triton_options(logits.device))
        pick_first_block(part_val, part_idx, out)
    return out


def pick_first_block(part_val: torch.Tensor, part_idx: torch.Tensor, out: torch.Tensor) -> None:
    """out[r] = part_idx[r, j] for the first j holding row r's largest part_val: the second step of
    an argmax whose blocks (in order along the row) each gave their first maximum and its index.
    part_val float32 and part_idx int64, both contiguous [rows, blocks]; out int64 [rows]."""
    rows, blocks = part_val.shape
    _pick_kernel[(rows,)](part_val, part_idx, out, blocks, BLOCKS=triton.next_power_of_2(blocks), num_warps=1,
                          **pdl.triton_options(part_val.device))


if triton is not None:

    @triton.jit
    def _block_argmax_kernel(x_ptr, val_ptr, idx_ptr, V, stride_row, n_blocks, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl.start(PDL)
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        best, where = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(val_ptr + row * n_blocks + blk, best)
        tl.store(idx_ptr + row * n_blocks + blk, (blk * BLOCK + where).to(tl.int64))

    @triton.jit
    def _pick_kernel(val_ptr, idx_ptr, out_ptr, n_blocks, BLOCKS: tl.constexpr, PDL: tl.constexpr):
        pdl.start(PDL)
        row = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, BLOCKS)
        vals = tl.load(val_ptr + row * n_blocks + r, mask=r < n_blocks, other=float("-inf"))
        _, first = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr + row, tl.load(idx_ptr + row * n_blocks + first))

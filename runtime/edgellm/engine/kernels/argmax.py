"""Greedy sampling's argmax over the vocabulary, in Triton.

torch.argmax reduces a [1, 128256] row with a handful of blocks: ~27 us on an H100, more
than two whole transformer layers of the 1B model. Here the row is split over many
programs (each finds the first maximum of its block), then one small program per row picks
the first block holding the overall maximum: the same index torch.argmax returns for
finite logits (ties go to the lowest index).

The picking kernel can also write the tokens straight into pinned host memory (ArgmaxOut), so
that a decode step's greedy tokens reach the host without a copy of their own on the stream: on
an H100 a device-to-host copy and its event after each step took ~9 us of a 1B step's 0.64 ms.
"""

from __future__ import annotations

import dataclasses

import torch

from edgellm.engine.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only hosts: the module imports, the kernel does not exist
    triton = None
    tl = None

BLOCK = 4096


MAX_HOST_ROWS = 16  # rows one picking program takes (ArgmaxOut.host is written by one program)


@dataclasses.dataclass(frozen=True)
class ArgmaxOut:
    """Where an argmax's indices go: `tokens` (int64 [rows], on the GPU) and, where `host` is
    given, also pinned host memory: host[writes % 2, :rows], then `writes` (int64 [1], on the
    GPU) goes up by one. Two host rows in turn, so that a CUDA graph's fixed addresses serve
    steps that overlap: the host reads step N's tokens while step N + 1 runs, and must read them
    before step N + 2 ends. The host keeps its own count of the writes to know which row is
    whose (Engine.decode). Where `positions` (int64 [rows], on the GPU) is given, each is
    advanced by one as its row's token is written: a decode graph's positions, ready for the
    next step without a copy from the host."""

    tokens: torch.Tensor
    host: torch.Tensor | None = None
    writes: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    @staticmethod
    def of(out: torch.Tensor | ArgmaxOut, rows: int, device: torch.device) -> ArgmaxOut:
        """`out` (an int64 [rows] tensor, or an ArgmaxOut) as a checked ArgmaxOut: what the argmax
        kernels take, refused before any of them is launched."""
        out = out if isinstance(out, ArgmaxOut) else ArgmaxOut(out)
        out.check(rows, device)
        return out

    def check(self, rows: int, device: torch.device) -> None:
        t = self.tokens
        if t.shape != (rows,) or t.dtype != torch.int64 or not t.is_contiguous() or t.device != device:
            raise ValueError(f"out must be a contiguous int64 [{rows}] tensor on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
        q = self.positions
        if q is not None and (q.shape != (rows,) or q.dtype != torch.int64 or not q.is_contiguous() or q.device != device):
            raise ValueError(f"positions must be a contiguous int64 [{rows}] tensor on {device}, "
                             f"got {q.dtype} {tuple(q.shape)} on {q.device}")
        if self.host is None:
            return
        h, w = self.host, self.writes
        if (h.device.type != "cpu" or not h.is_pinned() or h.dtype != torch.int64 or h.dim() != 2 or h.shape[0] != 2
                or h.shape[1] < rows or h.stride(1) != 1 or rows > MAX_HOST_ROWS):
            raise ValueError(f"host must be a pinned int64 [2, >= {rows}] CPU tensor (and rows at most {MAX_HOST_ROWS}), "
                             f"got {h.dtype} {tuple(h.shape)} on {h.device}")
        if w is None or w.shape != (1,) or w.dtype != torch.int64 or w.device != device:
            raise ValueError(f"writes must be an int64 [1] tensor on {device} where host is given")


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | ArgmaxOut | None = None) -> torch.Tensor:
    """Index of the first maximum of each row of a 2-D float tensor -> int64 [rows] (`out`, if
    given: a contiguous int64 [rows] tensor on the same device, or an ArgmaxOut)."""
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
    out = ArgmaxOut.of(out, rows, logits.device)
    if rows:
        _block_argmax_kernel[(rows, blocks)](logits, part_val, part_idx, vocab, logits.stride(0), blocks,
                                             BLOCK=BLOCK, num_warps=8, **pdl.triton_options(logits.device))
        pick_first_block(part_val, part_idx, out)
    return out.tokens


def pick_first_block(part_val: torch.Tensor, part_idx: torch.Tensor, out: ArgmaxOut) -> None:
    """out.tokens[r] = part_idx[r, j] for the first j holding row r's largest part_val: the second
    step of an argmax whose blocks (in order along the row) each gave their first maximum and its
    index (and, where given, out.host written and out.positions advanced: ArgmaxOut). part_val
    float32 and part_idx int64, both contiguous [rows, blocks]; `out` as ArgmaxOut.of gives it,
    checked by the caller before its first kernel."""
    rows, blocks = part_val.shape
    per_program = min(MAX_HOST_ROWS, triton.next_power_of_2(rows))
    host, advance = out.host is not None, out.positions is not None
    _pick_kernel[(triton.cdiv(rows, per_program),)](
        part_val, part_idx, out.tokens, out.host if host else out.tokens, out.writes if host else out.tokens,
        out.positions if advance else out.tokens, rows, blocks, out.host.stride(0) if host else 0, ROWS=per_program,
        BLOCKS=triton.next_power_of_2(blocks), HOST=host, ADVANCE=advance, num_warps=4,
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
    def _pick_kernel(val_ptr, idx_ptr, out_ptr, host_ptr, writes_ptr, pos_ptr, rows, n_blocks, host_stride,
                     ROWS: tl.constexpr, BLOCKS: tl.constexpr, HOST: tl.constexpr, ADVANCE: tl.constexpr,
                     PDL: tl.constexpr):
        pdl.start(PDL)
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCKS)
        r_mask = r < rows
        vals = tl.load(val_ptr + r[:, None] * n_blocks + c[None, :], mask=r_mask[:, None] & (c < n_blocks)[None, :],
                       other=float("-inf"))
        _, first = tl.max(vals, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tokens = tl.load(idx_ptr + r * n_blocks + first, mask=r_mask)
        tl.store(out_ptr + r, tokens, mask=r_mask)
        if ADVANCE:
            tl.store(pos_ptr + r, tl.load(pos_ptr + r, mask=r_mask) + 1, mask=r_mask)
        if HOST:  # one program holds every row (pick_first_block): it alone reads and bumps the count
            n = tl.load(writes_ptr)
            tl.store(host_ptr + (n % 2) * host_stride + r, tokens, mask=r_mask)
            tl.store(writes_ptr, n + 1)

"""Dropout on the low-rank input, drawn inside the kernels from a device seed (no stored mask).

The mask is the one every plan uses (``fastlora.kernels.philox``): entry (n, k) takes lane
k % 4 of the Philox4x32-10 block at counter (k // 4, n, 0, 0) under the 64-bit seed, and is
kept when ``word >> 1 >= threshold`` (threshold = round(p * 2^31)). One Philox evaluation
serves four columns, and the counters are 32-bit words with no products (no overflow). The
seed is loaded from a 1-element int64 device tensor, so a call never reads it on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..philox import keep_threshold, seed_tensor
from .launch_config import TOKEN_ARGS, cdiv, launch_context


@triton.jit
def keep_scale(seed, rows, col_start, threshold, scale, BLOCK_COLS: tl.constexpr):
    """fp32 tile (len(rows), BLOCK_COLS) of columns col_start + [0, BLOCK_COLS): ``scale`` where kept, 0 where dropped.

    rows: int block of row indices; col_start: a multiple of 4 (tiles start at multiples of their
    power-of-two width >= 4); seed: int64 scalar loaded from the seed tensor.
    """
    groups = (col_start // 4 + tl.arange(0, BLOCK_COLS // 4)).to(tl.uint32)
    c0 = groups[None, :] + tl.zeros_like(rows).to(tl.uint32)[:, None]
    c1 = rows.to(tl.uint32)[:, None] + tl.zeros_like(groups)[None, :]
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # column 4g + lane <- word[lane][g]
    draw = (words >> 1).to(tl.int32, bitcast=True)
    return tl.where(draw >= threshold, scale, 0.0)


@triton.jit(do_not_specialize=TOKEN_ARGS)
def _keep_kernel(out_ptr, rows_ptr, seed_ptr, M, n_cols, threshold, scale,
                 BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Grid (cdiv(M, BLOCK_ROWS), cdiv(n_cols, BLOCK_COLS)): out[i, j] = mask(rows[i], j).

    Pointers: out (M, n_cols) fp32, fp16 or bf16, rows (M,) int64, seed (1,) int64; int64
    output offsets.
    """
    offs_i = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_start = tl.program_id(1) * BLOCK_COLS
    offs_j = col_start + tl.arange(0, BLOCK_COLS)
    rows = tl.load(rows_ptr + offs_i, mask=offs_i < M, other=0)
    keep = keep_scale(tl.load(seed_ptr), rows, col_start, threshold, scale, BLOCK_COLS)
    ok = (offs_i[:, None] < M) & (offs_j[None, :] < n_cols)
    tl.store(out_ptr + offs_i[:, None].to(tl.int64) * n_cols + offs_j[None, :], keep, mask=ok)


def dropout_mask(n: int, d_in: int, p: float, seed, device, dtype=torch.float32, rows=None) -> torch.Tensor:
    """The mask (n, d_in) drawn by the kernels: 1/(1-p) where kept, 0 where dropped; one launch,
    written in ``dtype`` (fp32, fp16, bf16; another dtype is written in fp32 and cast).

    The torch plan's mask where the kernels run (``masks.dropout_mask``); ``seed`` an int or a (1,)
    int64 tensor; ``rows`` (n,) int64: the row indices to draw (default 0..n-1), e.g. rows beyond
    2^31 to test the counters.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must lie in [0, 1), got {p}")
    seed = seed if isinstance(seed, torch.Tensor) else seed_tensor(seed, device)
    rows = torch.arange(n, device=device) if rows is None else rows.to(device=device, dtype=torch.int64)
    stored = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    keep = torch.empty(n, d_in, device=device, dtype=stored)
    if keep.numel():
        block_rows, block_cols = 16, 64
        grid = (cdiv(n, block_rows), cdiv(d_in, block_cols))
        with launch_context(keep.device):
            _keep_kernel[grid](keep, rows, seed, n, d_in, keep_threshold(p), 1.0 / (1.0 - p),
                               BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return keep if stored == dtype else keep.to(dtype)

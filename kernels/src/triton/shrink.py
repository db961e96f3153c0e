"""Shrink: t = dropout(x) A^T (N, r), fp32, with the dropout mask drawn in-kernel.

A is a factor (r, d_in) or rows of the frozen weight gathered by index (CURLoRA's
R = W[I]). The reduction over d_in may be split across programs for small N; the
partial sums are added by torch's reduction (deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..philox import keep_threshold
from ..spec import in_dtype
from . import metadata, products
from .dropout import keep_scale
from .launch_config import TOKEN_ARGS, cdiv, dot_precision, launch_context, pad_rank, skinny_blocks, split_reduction
from .partials import partial_buffer, sum_partials
from .tiles import load_factor


@triton.jit(launch_metadata=metadata.shrink, do_not_specialize=TOKEN_ARGS)
def _shrink_kernel(x_ptr, a_ptr, a_idx_ptr, part_ptr, seed_ptr, M, K, R, k_per_split, threshold, scale,
                   stride_xm, stride_xk, stride_ar, stride_ak,
                   A_GATHER: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial t for one row block and one slice of the reduction.

    Grid: (cdiv(M, BLOCK_M), splits); program (i, s) reduces x[rows i, k in slice s] A^T over
    the K range [s * k_per_split, (s + 1) * k_per_split) and writes part[s, rows, :R].
    Pointers: x (M, K), a (R, K) or the frozen W whose rows a_idx (R,) selects, part (splits,
    M, R) fp32 (or the output dtype with one split), seed (1,) int64. Rows wrap at the edge
    (masked stores); offsets are int64 (M * K can pass 2^31).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = (offs_m % M).to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=offs_k[None, :] < k_end, other=0.0)
        if DROPOUT:
            keep = keep_scale(seed, rows, k0, threshold, scale, BLOCK_K)
            xt = (xt.to(tl.float32) * keep).to(xt.dtype)
        at = load_factor(a_ptr, a_idx_ptr, offs_r[None, :], offs_k[:, None], R, k_end,
                         stride_ar, stride_ak, A_GATHER).to(xt.dtype)  # a factor of any float dtype
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    out = part_ptr + pid_s.to(tl.int64) * M * R + rows[:, None] * R + offs_r[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


def shrink(x: torch.Tensor, a: torch.Tensor, a_index: Optional[torch.Tensor], p: float = 0.0,
           seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """t = dropout_p(x) F^T in fp32, shape (N, r); F = a (r, d_in), or a[a_index] when given.

    x (N, d_in) any strides; F of any float dtype (read as it is and cast to x's dtype in registers);
    the dropout mask is drawn from ``seed`` ((1,) int64 on x's device). Without dropout and with F
    given, by torch's GEMM where ``products.UNMASKED`` says so.
    """
    if p == 0.0 and a_index is None and products.by_gemm(products.UNMASKED):
        return torch.mm(x, in_dtype(a.t(), x.dtype)).float()
    m, k = x.shape
    r = a_index.shape[0] if a_index is not None else a.shape[0]
    r_pad = pad_rank(r)
    precision = dot_precision(x.dtype)
    cfg = skinny_blocks(r_pad, precision, dropout=p > 0.0)
    m_blocks = cdiv(m, cfg["BLOCK_M"])
    n_split, k_per_split = split_reduction(k, cfg["BLOCK_K"], m_blocks, x.device)
    part = partial_buffer(n_split, (m, r), torch.float32, x.device)
    with launch_context(x.device):
        _shrink_kernel[(m_blocks, n_split)](
            x, a, a_index if a_index is not None else a, part, seed if p > 0.0 else part, m, k, r, k_per_split,
            keep_threshold(p), 1.0 / (1.0 - p), x.stride(0), x.stride(1), a.stride(0), a.stride(1),
            A_GATHER=a_index is not None, DROPOUT=p > 0.0, R_PAD=r_pad, PRECISION=precision,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return sum_partials(part, n_split, torch.float32)

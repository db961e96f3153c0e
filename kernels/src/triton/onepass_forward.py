"""One-pass forward: the base GEMM computes the shrink in its own K loop and the expansion in its epilogue.

    y = x W^T + bias + c * g * ((xd A^T) M^T ⊙ m) B^T,   t = xd A^T (N, r) fp32 kept for the backward

x is read once: the x tiles of a K loop feed both x W^T and xd A^T (xd = the x tile times the
dropout mask, for the shrink only). The kernel is persistent along the columns: each program
walks a run of output tiles of one row block and forms that row block's t in the K loop of
its first tile only, keeping v = s g (t M^T) ⊙ m in registers for the expansions of the
others. With G programs per row block (``column_groups``) the shrink adds G R_PAD / N to the
GEMM's MMA work instead of R_PAD / BLOCK_N for a side product in every tile (1.6% instead of
6.25% at r = 16, N = 4096, 256-wide tiles, G = 4).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..philox import keep_threshold
from . import metadata
from .launch_config import TOKEN_ARGS, cdiv, dot_precision, launch_context, next_power_of_2, pad_rank
from .onepass_tiles import (
    add_expand,
    column_groups,
    gemm_with_side,
    persistent_configs,
    program_run,
    prune_onepass_configs,
    times_middle,
    times_weights,
)


@triton.jit
def _expand_and_store(acc, v, b_ptr, b_idx_ptr, bias_ptr, out_ptr, rows, offs_m, offs_n, M, N, R,
                      stride_br, stride_bn, stride_bias, stride_om, stride_on, HAS_BIAS: tl.constexpr,
                      B_GATHER: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[offs_m, offs_n] = acc + v B^T[:, cols] (+ bias[cols]) for the (BLOCK_M, BLOCK_N) fp32 tile acc
    and the scaled v (BLOCK_M, R_PAD) in B's dtype; cols = offs_n wrapped, the store masked to (M, N);
    bias[j] at bias_ptr + j * stride_bias (0 for an expanded bias)."""
    cols = (offs_n % N).to(tl.int64)
    acc = add_expand(acc, v, b_ptr, b_idx_ptr, 0, rows, cols, 0, N, R, stride_br, stride_bn, 0, 1.0, B_GATHER,
                     False, R_PAD, PRECISION, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=persistent_configs(), key=["M_BUCKET", "N", "K", "R_PAD", "DROPOUT"],
                 prune_configs_by={"early_config_prune": prune_onepass_configs})
@triton.jit(launch_metadata=metadata.onepass_forward, do_not_specialize=TOKEN_ARGS)
def _onepass_forward_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, a_idx_ptr, mid_ptr, rw_ptr, b_ptr, b_idx_ptr,
                            gate_ptr, seed_ptr, out_ptr, t_ptr, M, N, K, R, M_BUCKET, v_scale, threshold, scale,
                            stride_xm, stride_xk, stride_wk, stride_wn, stride_ar, stride_ak,
                            stride_mid0, stride_mid1, stride_rw, stride_br, stride_bn, stride_bias, stride_om,
                            stride_on,
                            HAS_BIAS: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
                            HAS_MIDDLE: tl.constexpr, HAS_RW: tl.constexpr, GATE_PTR: tl.constexpr,
                            DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A run of (BLOCK_M, BLOCK_N) tiles along one row block of y (M, N) per program, and t of its rows.

    Grid: (cdiv(M, BLOCK_M) * G,): G programs per row block (``column_groups``). With C =
    cdiv(N, BLOCK_N) column tiles and run = cdiv(C, G), program p owns row block p // G and its
    column tiles [g run, min((g + 1) run, C)) for g = p % G (the host keeps every run non-empty).
    The K loop of the first tile forms acc = x W^T and t = xd A^T (BLOCK_M, R_PAD); then
    v = v_scale * gate * (t M^T) ⊙ m stays in registers in B's dtype, and the K loops of the
    other tiles form acc alone. Each epilogue adds v B^T[:, cols] and the bias. The program with
    g = 0 stores t (fp32) for its rows: one writer per row. The loop over the other tiles is not
    software-pipelined (num_stages=1: prefetching its epilogue operands costs shared memory and
    registers; the K loops inside it are).
    Pointers: x (M, K), w = W^T (K, N), bias (N,) of stride stride_bias, a = A (R, K) or W with a_idx (R,) its rows,
    mid = M (R, R), rw = m (R,), b = B^T (R, N) or W^T with b_idx (R,) its rows, gate (),
    seed (1,) int64, out (M, N), t (M, R) fp32 contiguous; each optional one used only under
    its constexpr flag. Rows and columns wrap at the edges (valid loads, masked stores); offsets
    are int64 (M * stride can pass 2^31).
    """
    pid_m, group, first, run, num_n = program_run(M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    rows = (offs_m % M).to(tl.int64)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    offs_n = first * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, t = gemm_with_side(x_ptr, w_ptr, a_ptr, a_idx_ptr, rows, (offs_n % N).to(tl.int64), K, R,
                            stride_xm, stride_xk, stride_wk, stride_wn, stride_ar, stride_ak,
                            seed, threshold, scale, offs_m < M, 0, 0, 0, True, A_GATHER, DROPOUT,
                            False, False, R_PAD, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if group == 0:
        tl.store(t_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], t,
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    if HAS_MIDDLE:
        t = times_middle(t, mid_ptr, R, stride_mid1, stride_mid0, R_PAD, PRECISION)
    if HAS_RW:
        t = times_weights(t, rw_ptr, R, stride_rw, R_PAD)
    t = t * v_scale
    if GATE_PTR:
        t = t * tl.load(gate_ptr).to(tl.float32)
    v = t.to(b_ptr.dtype.element_ty)
    _expand_and_store(acc, v, b_ptr, b_idx_ptr, bias_ptr, out_ptr, rows, offs_m, offs_n, M, N, R,
                      stride_br, stride_bn, stride_bias, stride_om, stride_on, HAS_BIAS, B_GATHER, R_PAD, PRECISION,
                      BLOCK_N)
    for pid_n in tl.range(first + 1, tl.minimum(first + run, num_n), num_stages=1):
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, _ = gemm_with_side(x_ptr, w_ptr, a_ptr, a_idx_ptr, rows, (offs_n % N).to(tl.int64), K, R,
                                stride_xm, stride_xk, stride_wk, stride_wn, stride_ar, stride_ak,
                                0, 0, 1.0, offs_m < M, 0, 0, 0, False, False, False,
                                False, False, R_PAD, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        _expand_and_store(acc, v, b_ptr, b_idx_ptr, bias_ptr, out_ptr, rows, offs_m, offs_n, M, N, R,
                          stride_br, stride_bn, stride_bias, stride_om, stride_on, HAS_BIAS, B_GATHER, R_PAD, PRECISION,
                          BLOCK_N)


def onepass_forward(x: torch.Tensor, w_kn: torch.Tensor, bias: Optional[torch.Tensor], a: torch.Tensor,
                    a_index: Optional[torch.Tensor], b: torch.Tensor, b_index: Optional[torch.Tensor],
                    middle: Optional[torch.Tensor], rank_weights: Optional[torch.Tensor], *, v_scale: float,
                    gate: Optional[torch.Tensor], p: float, seed: Optional[torch.Tensor],
                    groups: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, N) in x's dtype, t (M, r) fp32) of the operation above, in one launch.

    x (M, K) and w_kn = W^T (K, N) any strides; bias (N,) any stride (an expanded one too) or None;
    a (r, K), or a[a_index] for a_index (r,); b = B^T (r, N), or b[b_index]; middle (r, r),
    rank_weights (r,) or None; gate a 0-dim device tensor or None; p > 0: dropout of x in the
    shrink, mask drawn from ``seed``.
    groups: programs per row block wanted (``column_groups`` adjusts it to the tiles); None: its default.
    """
    m, k = x.shape
    n = w_kn.shape[1]
    r = a_index.shape[0] if a_index is not None else a.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    t = torch.empty(m, r, device=x.device, dtype=torch.float32)
    dropout = p > 0.0

    def grid(meta):
        row_blocks = cdiv(m, meta["BLOCK_M"])
        return (row_blocks * column_groups(row_blocks, cdiv(n, meta["BLOCK_N"]), x.device, groups),)

    def given(tensor):
        return tensor if tensor is not None else out

    with launch_context(x.device):
        _onepass_forward_kernel[grid](
            x, w_kn, given(bias), a, given(a_index), given(middle), given(rank_weights), b, given(b_index),
            given(gate), seed if dropout else out, out, t, m, n, k, r, next_power_of_2(m), float(v_scale),
            keep_threshold(p), 1.0 / (1.0 - p), x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1),
            a.stride(0), a.stride(1), *(middle.stride() if middle is not None else (0, 0)),
            rank_weights.stride(0) if rank_weights is not None else 0, b.stride(0), b.stride(1),
            bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, A_GATHER=a_index is not None, B_GATHER=b_index is not None,
            HAS_MIDDLE=middle is not None, HAS_RW=rank_weights is not None, GATE_PTR=gate is not None,
            DROPOUT=dropout, R_PAD=pad_rank(r), PRECISION=dot_precision(x.dtype))
    return out, t

"""One-pass input gradient: dx = dy W with dP, dB and dbias from the same dy tiles, dt A in the epilogue.

    dx = dy W + drop(c * g * dt A),   dt = ((dy B) ⊙ m) M,   dP = dy B (N, r) fp32 kept
    dB = c * g * dy^T v (d_out, r),   dbias = sum_n dy (d_out,)

dy is read once for all of them. The kernel is persistent along the columns of dx, as the
forward is: each program walks a run of column tiles of one row block and forms dP in the K loop
of its first tile only, keeping dt for the others, so dy B adds G R_PAD / d_in to the GEMM's MMA
work instead of R_PAD / BLOCK_N (1.6% instead of 6.25% at r = 16, d_in = 4096, 256-wide tiles,
G = 4). dB and dbias are reduced over the rows in per-row-block partials (one fp32 slice per row
block, added by torch's reduction in ``sum_partials``): deterministic, unlike fp32 atomics. Those
partials cost 8 r / (BLOCK_M e) bytes per byte of dy (e = dy's element size);
``db_partials_are_cheaper`` says when that beats reading dy again.
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
    BACKWARD_BLOCK_M,
    add_expand,
    backward_configs,
    column_groups,
    gemm_with_side,
    program_run,
    prune_onepass_configs,
    times_middle,
    times_weights,
)
from .partials import partial_buffer, sum_partials


@triton.jit
def _expand_and_store(acc, dt, col_start, a_ptr, a_idx_ptr, seed, out_ptr, rows, offs_m, row_ok, N, R,
                      threshold, scale, stride_ar, stride_an, stride_om, stride_on, A_GATHER: tl.constexpr,
                      DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[offs_m, cols] = acc + drop(dt A[:, cols]) for the (BLOCK_M, BLOCK_N) fp32 tile acc and the scaled
    dt (BLOCK_M, R_PAD) in A's dtype; cols = col_start + [0, BLOCK_N) wrapped, the store masked to row_ok and N."""
    offs_n = col_start + tl.arange(0, BLOCK_N)
    acc = add_expand(acc, dt, a_ptr, a_idx_ptr, seed, rows, (offs_n % N).to(tl.int64), col_start, N, R,
                     stride_ar, stride_an, threshold, scale, A_GATHER, DROPOUT, R_PAD, PRECISION, BLOCK_N)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.autotune(configs=backward_configs(), key=["M_BUCKET", "N", "K", "R_PAD", "DROPOUT", "COMPUTE_DB"],
                 prune_configs_by={"early_config_prune": prune_onepass_configs})
@triton.jit(launch_metadata=metadata.onepass_input_grad, do_not_specialize=TOKEN_ARGS)
def _onepass_input_grad_kernel(dy_ptr, w_ptr, f_ptr, f_idx_ptr, mid_ptr, rw_ptr, a_ptr, a_idx_ptr, v_ptr,
                               gate_ptr, seed_ptr, out_ptr, dp_ptr, db_part_ptr, dbias_part_ptr,
                               M, N, K, R, M_BUCKET, v_scale, threshold, scale,
                               stride_dym, stride_dyk, stride_wk, stride_wn, stride_fr, stride_fk,
                               stride_mid0, stride_mid1, stride_rw, stride_ar, stride_an, stride_vm, stride_vr,
                               stride_om, stride_on,
                               F_GATHER: tl.constexpr, A_GATHER: tl.constexpr, HAS_MIDDLE: tl.constexpr,
                               HAS_RW: tl.constexpr, GATE_PTR: tl.constexpr, DROPOUT: tl.constexpr,
                               COMPUTE_DB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, R_PAD: tl.constexpr,
                               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    """A run of (BLOCK_M, BLOCK_N) tiles along one row block of dx (M, N) per program, reducing over K = d_out.

    Grid: (cdiv(M, BLOCK_M) * G,): G programs per row block (``column_groups``). With C =
    cdiv(N, BLOCK_N) column tiles and run = cdiv(C, G), program p owns row block p // G and its
    column tiles [g run, min((g + 1) run, C)) for g = p % G (the host keeps every run non-empty).
    The K loop of the first tile forms acc = dy W and dP = dy B (BLOCK_M, R_PAD); then
    dt = v_scale * gate * ((dP ⊙ m) M) stays in registers in A's dtype, and the K loops of the
    other tiles form acc alone. Each epilogue adds drop(dt A[:, cols]).
    The program with g = 0 (whose run starts at column tile 0, so it exists for every row
    block) also stores dP (fp32) for its rows and, inside its first K loop, writes its row
    block's slice pid_m of the partials: db_part[pid_m, k, :R] = v_scale * gate * dy[rows, k]^T
    v[rows] (COMPUTE_DB) and dbias_part[pid_m, k] = sum over rows of dy[rows, k] (COMPUTE_DBIAS).
    Every program of a row block reads the same dy tiles; giving the partials one fixed writer
    per (row block, k) needs no atomics, sums deterministically, and lets the other programs
    run the K loop without them. The loop over the other tiles is not software-pipelined
    (num_stages=1, as in the forward; the K loops inside it are).
    Pointers: dy (M, K), w = W (K, N), f = B^T (R, K) or W^T with f_idx (R,) its rows,
    mid = M (R, R), rw = m (R,), a = A (R, N) or W with a_idx (R,) its rows, v (M, R) fp32,
    gate (), seed (1,) int64, out (M, N), dp (M, R) fp32, db_part (cdiv(M, BLOCK_M), K, R) and
    dbias_part (cdiv(M, BLOCK_M), K) contiguous (fp32, or the output dtype with one row block).
    Rows and columns wrap at the edges (stores and column sums are masked to the valid rows);
    offsets are int64 (M * stride can pass 2^31).
    """
    pid_m, group, first, run, num_n = program_run(M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    rows = (offs_m % M).to(tl.int64)
    row_ok = offs_m < M
    cols = ((first * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    if group == 0:
        v = 0
        if COMPUTE_DB:
            v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                        mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0) * v_scale
            if GATE_PTR:
                v = v * tl.load(gate_ptr).to(tl.float32)
            v = v.to(dy_ptr.dtype.element_ty)
        acc, dp = gemm_with_side(dy_ptr, w_ptr, f_ptr, f_idx_ptr, rows, cols, K, R,
                                 stride_dym, stride_dyk, stride_wk, stride_wn, stride_fr, stride_fk,
                                 0, 0, 1.0, row_ok, v, db_part_ptr + pid_m.to(tl.int64) * K * R,
                                 dbias_part_ptr + pid_m.to(tl.int64) * K, True, F_GATHER, False, COMPUTE_DB,
                                 COMPUTE_DBIAS, R_PAD, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        tl.store(dp_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], dp,
                 mask=row_ok[:, None] & (offs_r[None, :] < R))
    else:
        acc, dp = gemm_with_side(dy_ptr, w_ptr, f_ptr, f_idx_ptr, rows, cols, K, R,
                                 stride_dym, stride_dyk, stride_wk, stride_wn, stride_fr, stride_fk,
                                 0, 0, 1.0, row_ok, 0, 0, 0, True, F_GATHER, False, False, False,
                                 R_PAD, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    dt = dp
    if HAS_RW:
        dt = times_weights(dt, rw_ptr, R, stride_rw, R_PAD)
    if HAS_MIDDLE:
        dt = times_middle(dt, mid_ptr, R, stride_mid0, stride_mid1, R_PAD, PRECISION)
    dt = dt * v_scale
    if GATE_PTR:
        dt = dt * tl.load(gate_ptr).to(tl.float32)
    dt = dt.to(a_ptr.dtype.element_ty)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    _expand_and_store(acc, dt, first * BLOCK_N, a_ptr, a_idx_ptr, seed, out_ptr, rows, offs_m, row_ok, N, R,
                      threshold, scale, stride_ar, stride_an, stride_om, stride_on, A_GATHER, DROPOUT, R_PAD,
                      PRECISION, BLOCK_N)
    for pid_n in tl.range(first + 1, tl.minimum(first + run, num_n), num_stages=1):
        cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        acc, _ = gemm_with_side(dy_ptr, w_ptr, f_ptr, f_idx_ptr, rows, cols, K, R,
                                stride_dym, stride_dyk, stride_wk, stride_wn, stride_fr, stride_fk,
                                0, 0, 1.0, row_ok, 0, 0, 0, False, False, False, False, False,
                                R_PAD, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        _expand_and_store(acc, dt, pid_n * BLOCK_N, a_ptr, a_idx_ptr, seed, out_ptr, rows, offs_m, row_ok, N, R,
                          threshold, scale, stride_ar, stride_an, stride_om, stride_on, A_GATHER, DROPOUT, R_PAD,
                          PRECISION, BLOCK_N)


def db_partials_are_cheaper(dy: torch.Tensor, r: int) -> bool:
    """Whether dB should come from the kernel's row-block partials (written and read once, fp32)
    rather than from a second read of dy: 2 * cdiv(N, BLOCK_M) * d_out * r * 4 <= N * d_out * e."""
    n, d_out = dy.shape
    return 2 * cdiv(n, BACKWARD_BLOCK_M) * d_out * r * 4 <= dy.numel() * dy.element_size()


def onepass_input_grad(dy: torch.Tensor, w: torch.Tensor, f: torch.Tensor, f_index: Optional[torch.Tensor],
                       a: torch.Tensor, a_index: Optional[torch.Tensor], middle: Optional[torch.Tensor],
                       rank_weights: Optional[torch.Tensor], v: Optional[torch.Tensor], need_bias: bool, *,
                       v_scale: float, gate: Optional[torch.Tensor], p: float, seed: Optional[torch.Tensor],
                       db_dtype: torch.dtype, dbias_dtype: torch.dtype, groups: Optional[int] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx (M, N) in dy's dtype, dP (M, r) fp32, dB (K, r) in db_dtype or None, dbias (K,) in dbias_dtype or None).

    dy (M, K) and w = W (K, N) any strides; f = B^T (r, K), or f[f_index] (B = W[:, J]: pass
    W.t() and J); a (r, N), or a[a_index]; middle (r, r), rank_weights (r,) or None; v (M, r)
    fp32: dB is computed when given; gate a 0-dim device tensor or None; p > 0: the low-rank
    term of dx is multiplied by the dropout mask of x drawn from ``seed``.
    groups: programs per row block wanted (``column_groups`` adjusts it to the tiles); None: its default.
    """
    m, k = dy.shape
    n = w.shape[1]
    r = f_index.shape[0] if f_index is not None else f.shape[0]
    device = dy.device
    out = torch.empty(m, n, device=device, dtype=dy.dtype)
    dp = torch.empty(m, r, device=device, dtype=torch.float32)
    row_blocks = cdiv(m, BACKWARD_BLOCK_M)
    db_part = partial_buffer(row_blocks, (k, r), db_dtype, device) if v is not None else None
    dbias_part = partial_buffer(row_blocks, (k,), dbias_dtype, device) if need_bias else None
    dropout = p > 0.0

    def grid(meta):
        return (row_blocks * column_groups(row_blocks, cdiv(n, meta["BLOCK_N"]), device, groups),)

    def given(tensor):
        return tensor if tensor is not None else dp

    with launch_context(device):
        _onepass_input_grad_kernel[grid](
            dy, w, f, given(f_index), given(middle), given(rank_weights), a, given(a_index), given(v), given(gate),
            seed if dropout else dp, out, dp, given(db_part), given(dbias_part),
            m, n, k, r, next_power_of_2(m), float(v_scale), keep_threshold(p), 1.0 / (1.0 - p),
            dy.stride(0), dy.stride(1), w.stride(0), w.stride(1), f.stride(0), f.stride(1),
            *(middle.stride() if middle is not None else (0, 0)),
            rank_weights.stride(0) if rank_weights is not None else 0, a.stride(0), a.stride(1),
            *(v.stride() if v is not None else (0, 0)), out.stride(0), out.stride(1),
            F_GATHER=f_index is not None, A_GATHER=a_index is not None, HAS_MIDDLE=middle is not None,
            HAS_RW=rank_weights is not None, GATE_PTR=gate is not None, DROPOUT=dropout,
            COMPUTE_DB=v is not None, COMPUTE_DBIAS=need_bias, R_PAD=pad_rank(r), PRECISION=dot_precision(dy.dtype))
    db = sum_partials(db_part, row_blocks, db_dtype) if db_part is not None else None
    dbias = sum_partials(dbias_part, row_blocks, dbias_dtype) if dbias_part is not None else None
    return out, dp, db, dbias

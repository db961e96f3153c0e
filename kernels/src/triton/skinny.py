"""Skinny reductions of the backward pass, fp32 accumulation, deterministic (no atomics).

- ``dy_pass``: dP = dy B (N, r), and optionally dB = dy^T V (d_out, r) and
  dbias = sum_n dy (d_out,). dB and dbias come from a pass over column blocks of dy; dP
  either comes from the same pass (one read of dy, one (N, r) partial per column block)
  or from the shrink kernel (a second read of dy, partials bounded by a few splits),
  whichever moves fewer bytes (``one_pass_is_cheaper``).
  When dy is read twice anyway (plain factors, no dbias), ``products.DY_TWICE`` says who reads it: the
  shrink and the column pass, or two of torch's GEMMs, dy F^T and dy^T V.
- ``down_grad``: dA = dt^T xd (r, d_in) with xd = dropout(x) regenerated from the seed; without
  dropout, by torch's GEMM where ``products.UNMASKED`` says so.

Grids split the reduction axis; each program writes its own slice of a partial-sum buffer
that torch's reduction adds afterwards (deterministic).
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
from .shrink import shrink
from .tiles import load_factor


@triton.jit(launch_metadata=metadata.dy_columns, do_not_specialize=TOKEN_ARGS)
def _dy_columns_kernel(dy_ptr, b_ptr, b_idx_ptr, v_ptr, gate_ptr, dp_part_ptr, db_part_ptr, dbias_part_ptr,
                       M, D, R, rows_per_split, v_scale,
                       stride_dym, stride_dyd, stride_br, stride_bd, stride_vm, stride_vr,
                       B_GATHER: tl.constexpr, COMPUTE_DP: tl.constexpr, COMPUTE_DB: tl.constexpr,
                       COMPUTE_DBIAS: tl.constexpr, GATE_PTR: tl.constexpr, R_PAD: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One column block of dy (M, D) over one slice of its rows.

    Grid: (splits, cdiv(D, BLOCK_K)); program (s, j) walks rows [s * rows_per_split, ...) of
    columns block j. With COMPUTE_DP it writes dP's partial for its columns, dp_part[j, rows,
    :R] = dy[rows, cols_j] F[:, cols_j]^T (one fp32 (M, R) slice per column block); with
    COMPUTE_DB, db_part[s, cols_j, :R] = v_scale * gate * dy[rows_s, cols_j]^T v[rows_s]; with
    COMPUTE_DBIAS, dbias_part[s, cols_j] = the column sums. Pointers: b (R, D) or the frozen
    W^T whose rows b_idx (R,) selects, v (M, R) fp32, gate (). Offsets are int64.
    """
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    d_ok = offs_d < D
    r_ok = offs_r < R
    if COMPUTE_DP:
        b = load_factor(b_ptr, b_idx_ptr, offs_r[None, :], offs_d[:, None], R, D, stride_br, stride_bd,
                        B_GATHER).to(dy_ptr.dtype.element_ty)  # a factor of any float dtype
    acc_db = tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32)
    acc_dbias = tl.zeros((BLOCK_K,), dtype=tl.float32)
    dp_part_ptr += pid_d.to(tl.int64) * M * R
    row0 = pid_s * rows_per_split
    for i in range(0, rows_per_split, BLOCK_M):
        offs_m = row0 + i + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        dyt = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_d[None, :] * stride_dyd,
                      mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if COMPUTE_DP:
            dp = tl.dot(dyt, b, input_precision=PRECISION)
            tl.store(dp_part_ptr + rows[:, None] * R + offs_r[None, :], dp, mask=m_ok[:, None] & r_ok[None, :])
        if COMPUTE_DB:
            v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            acc_db = tl.dot(tl.trans(dyt), v.to(dyt.dtype), acc_db, input_precision=PRECISION)
        if COMPUTE_DBIAS:
            acc_dbias += tl.sum(dyt.to(tl.float32), axis=0)
    if COMPUTE_DB:
        acc_db = acc_db * v_scale
        if GATE_PTR:
            acc_db = acc_db * tl.load(gate_ptr).to(tl.float32)
        out = db_part_ptr + pid_s.to(tl.int64) * D * R + offs_d[:, None] * R + offs_r[None, :]
        tl.store(out, acc_db, mask=d_ok[:, None] & r_ok[None, :])
    if COMPUTE_DBIAS:
        tl.store(dbias_part_ptr + pid_s.to(tl.int64) * D + offs_d, acc_dbias, mask=d_ok)


def column_blocks(d: int, r: int, dtype: torch.dtype) -> int:
    """Column blocks of the dy pass over d columns of dtype at rank r."""
    return cdiv(d, skinny_blocks(pad_rank(r), dot_precision(dtype))["BLOCK_K"])


def one_pass_is_cheaper(dy: torch.Tensor, r: int, d_blocks: int) -> bool:
    """Whether dP should come from the column pass over ``d_blocks`` column blocks (``column_blocks``):
    its partials, one (N, r) fp32 slice per column block, written and read once, cost fewer bytes than
    a second read of dy."""
    partial_bytes = d_blocks * dy.shape[0] * r * 4
    return 2 * partial_bytes <= dy.numel() * dy.element_size()


def dy_pass(dy: torch.Tensor, b: torch.Tensor, b_index: Optional[torch.Tensor], v: Optional[torch.Tensor],
            need_bias: bool, *, v_scale: float = 1.0, gate: Optional[torch.Tensor] = None,
            db_dtype: torch.dtype = torch.float32, dbias_dtype: torch.dtype = torch.float32,
            ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dP fp32, dB in db_dtype, dbias in dbias_dtype) of dy (N, d_out).

    The up factor is given transposed, F = b (r, d_out) (pass B.t()) or b[b_index] (rows of
    W^T, i.e. columns of W, read by index), in any float dtype (cast to dy's in registers).
    dP = dy F^T (N, r); dB = v_scale * gate * dy^T v (d_out, r) when v (N, r) is given, else
    None (gate: a 0-dim device tensor or None); dbias = dy.sum(0) when ``need_bias``, else None.
    """
    m, d = dy.shape
    r = b_index.shape[0] if b_index is not None else b.shape[0]
    r_pad = pad_rank(r)
    precision = dot_precision(dy.dtype)
    cfg = skinny_blocks(r_pad, precision)
    d_blocks = cdiv(d, cfg["BLOCK_K"])
    columns_needed = v is not None or need_bias
    dp_in_columns = columns_needed and one_pass_is_cheaper(dy, r, d_blocks)
    twice_by_gemms = products.by_gemm(products.DY_TWICE) and v is not None
    if twice_by_gemms and not (dp_in_columns or need_bias or b_index is not None):
        return _two_gemms(dy, b, v, v_scale, gate, db_dtype)
    dp = None if dp_in_columns else shrink(dy, b, b_index)
    if not columns_needed:
        return dp, None, None
    n_split, rows_per_split = split_reduction(m, cfg["BLOCK_M"], d_blocks, dy.device)
    dp_part = partial_buffer(d_blocks, (m, r), torch.float32, dy.device) if dp_in_columns else None
    db_part = partial_buffer(n_split, (d, r), db_dtype, dy.device) if v is not None else None
    dbias_part = partial_buffer(n_split, (d,), dbias_dtype, dy.device) if need_bias else None
    dummy = next(t for t in (dp_part, db_part, dbias_part) if t is not None)
    with launch_context(dy.device):
        _dy_columns_kernel[(n_split, d_blocks)](
            dy, b, b_index if b_index is not None else b, v if v is not None else dummy,
            gate if gate is not None else dummy,
            *(t if t is not None else dummy for t in (dp_part, db_part, dbias_part)), m, d, r, rows_per_split,
            float(v_scale), dy.stride(0), dy.stride(1), b.stride(0), b.stride(1),
            v.stride(0) if v is not None else 0, v.stride(1) if v is not None else 0,
            B_GATHER=b_index is not None, COMPUTE_DP=dp_in_columns, COMPUTE_DB=v is not None,
            COMPUTE_DBIAS=need_bias, GATE_PTR=gate is not None, R_PAD=r_pad, PRECISION=precision,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    if dp_in_columns:
        dp = sum_partials(dp_part, d_blocks, torch.float32)
    db = sum_partials(db_part, n_split, db_dtype) if v is not None else None
    dbias = sum_partials(dbias_part, n_split, dbias_dtype) if need_bias else None
    return dp, db, dbias


def _two_gemms(dy: torch.Tensor, f: torch.Tensor, v: torch.Tensor, v_scale: float, gate: Optional[torch.Tensor],
               db_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, None]:
    """``dy_pass`` by two of torch's GEMMs in dy's dtype (see ``products``): (dP = dy F^T in fp32,
    dB = v_scale * gate * dy^T v in db_dtype, None)."""
    dp = torch.mm(dy, in_dtype(f.t(), dy.dtype)).float()
    return dp, _scaled(torch.mm(dy.t(), in_dtype(v, dy.dtype)), v_scale, gate, db_dtype), None


def _scaled(product: torch.Tensor, scale: float, gate: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """scale * gate * product, multiplied in fp32, in ``dtype`` (gate: a 0-dim device tensor or None)."""
    out = product.float().mul_(scale)
    return in_dtype(out if gate is None else out.mul_(gate.float()), dtype)


@triton.jit(launch_metadata=metadata.down_grad, do_not_specialize=TOKEN_ARGS)
def _down_grad_kernel(dt_ptr, x_ptr, part_ptr, seed_ptr, gate_ptr, M, K, R, rows_per_split, dt_scale, threshold, scale,
                      stride_dtm, stride_dtr, stride_xm, stride_xk,
                      DROPOUT: tl.constexpr, GATE_PTR: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One column block of dA (R, K) over one slice of the rows.

    Grid: (splits, cdiv(K, BLOCK_K)); program (s, j) writes part[s, :R, cols_j] =
    dt_scale * gate * dt[rows_s]^T dropout(x)[rows_s, cols_j], the mask regenerated from the
    seed. Pointers: dt (M, R) fp32, x (M, K), part (splits, R, K) fp32 (or the output dtype
    with one split), seed (1,) int64, gate (). Offsets are int64 (M * K can pass 2^31).
    """
    pid_s = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k_ok = offs_k < K
    r_ok = offs_r < R
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    row0 = pid_s * rows_per_split
    for i in range(0, rows_per_split, BLOCK_M):
        offs_m = row0 + i + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            keep = keep_scale(seed, rows, pid_k * BLOCK_K, threshold, scale, BLOCK_K)
            xt = (xt.to(tl.float32) * keep).to(xt.dtype)
        dtt = tl.load(dt_ptr + rows[:, None] * stride_dtm + offs_r[None, :] * stride_dtr,
                      mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dtt.to(xt.dtype)), xt, acc, input_precision=PRECISION)
    acc = acc * dt_scale
    if GATE_PTR:
        acc = acc * tl.load(gate_ptr).to(tl.float32)
    out = part_ptr + pid_s.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & k_ok[None, :])


def down_grad(dt: torch.Tensor, x: torch.Tensor, p: float = 0.0, seed: Optional[torch.Tensor] = None, *,
              dt_scale: float = 1.0, gate: Optional[torch.Tensor] = None,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dA = dt_scale * gate * dt^T dropout_p(x), shape (r, d_in) in ``out_dtype``; dt (N, r) fp32,
    x (N, d_in) any strides; the mask is drawn from ``seed`` ((1,) int64 on x's device); gate:
    a 0-dim device tensor or None."""
    if p == 0.0 and products.by_gemm(products.UNMASKED):
        return _scaled(torch.mm(in_dtype(dt, x.dtype).t(), x), dt_scale, gate, out_dtype)
    m, k = x.shape
    r = dt.shape[1]
    r_pad = pad_rank(r)
    precision = dot_precision(x.dtype)
    cfg = skinny_blocks(r_pad, precision)
    k_blocks = cdiv(k, cfg["BLOCK_K"])
    n_split, rows_per_split = split_reduction(m, cfg["BLOCK_M"], k_blocks, x.device)
    part = partial_buffer(n_split, (r, k), out_dtype, x.device)
    with launch_context(x.device):
        _down_grad_kernel[(n_split, k_blocks)](
            dt, x, part, seed if p > 0.0 else part, gate if gate is not None else part, m, k, r, rows_per_split,
            float(dt_scale), keep_threshold(p), 1.0 / (1.0 - p),
            dt.stride(0), dt.stride(1), x.stride(0), x.stride(1),
            DROPOUT=p > 0.0, GATE_PTR=gate is not None, R_PAD=r_pad, PRECISION=precision,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return sum_partials(part, n_split, out_dtype)

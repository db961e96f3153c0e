"""Tiles of the one-pass kernels: launch configurations and the jit helpers both kernels share.

Each one-pass kernel is a base GEMM whose K loop also multiplies the operand tile it already
holds by a rank factor (``gemm_with_side``), and whose epilogue pushes that (BLOCK_M, R_PAD)
side product through the r-sized chain (``times_middle``, ``times_weights``) and adds its
expansion to the output tile (``add_expand``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch_config
from .dropout import keep_scale
from .tiles import load_factor

#: Row tile of the input-gradient kernel: fixed, because its dB / dbias partials hold one slice
#: per row block and are allocated before the launch (the autotuner only varies the other tiles).
BACKWARD_BLOCK_M = 16 if launch_config.INTERPRETED else 128
#: Most column tiles one program of the persistent kernels (forward, input gradient) walks by default:
#: the side product then adds at least R_PAD / (COLUMN_RUN BLOCK_N) of the GEMM's MMA work, and
#: G >= C / COLUMN_RUN programs per row block keep the row blocks of a wave (SMs / G, each program
#: reading its x or dy tiles again for every column tile it walks) near the grouped GEMM's L2 working
#: set (a judgement, not tuned).
COLUMN_RUN = 4


def persistent_configs() -> list[triton.Config]:
    """The GEMM tiles of the persistent one-pass kernels: ``gemm_configs`` without GROUP_M (their programs
    own runs of column tiles in row-major order, not swizzled single tiles) and without the 128x128 tiles
    on 4 warps: compiled for sm_90 (Triton 3.6, the first GPU run's compile section) on aligned shapes,
    the 5-stage one spilled in every one-pass specialization (up to 200 B forward, 296 B input gradient)
    and the 32-deep one in 6 of 7 input-gradient ones, while 128x128 on 8 warps never spilled in the
    forward."""
    return [triton.Config({k: v for k, v in c.kwargs.items() if k != "GROUP_M"}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in launch_config.gemm_configs()
            if not _spills_in_onepass(c)]


def _spills_in_onepass(config: triton.Config) -> bool:
    return config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] >= 128 * 128 and config.num_warps == 4


def backward_configs(block_m: int = BACKWARD_BLOCK_M) -> list[triton.Config]:
    """The ``persistent_configs`` tiles whose BLOCK_M is ``block_m``."""
    return [c for c in persistent_configs() if c.kwargs["BLOCK_M"] == block_m]


def prune_onepass_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than twice the token bucket, tiles whose pipeline (stages x (BLOCK_M +
    BLOCK_N + R_PAD) x BLOCK_K operands) exceeds the device's shared memory, and tiles whose
    fp32 accumulators (the output tile, the side product and, in the backward, the scaled v;
    a second output tile for the input gradient's dropout-masked dt A) pass
    ``launch_config.ACCUMULATOR_REGISTERS`` per thread. Always keeps the smallest tile."""
    r_pad = kwargs.get("R_PAD", 16)
    m_bucket = named_args.get("M_BUCKET", 1 << 30)
    x = named_args["x_ptr"] if "x_ptr" in named_args else named_args["dy_ptr"]
    element = x.element_size()
    limit = launch_config.shared_memory_limit(x.device.index or 0) if x.is_cuda else None
    side_tiles = 2 if kwargs.get("COMPUTE_DB", False) else 1
    output_tiles = 2 if kwargs.get("DROPOUT", False) and "dy_ptr" in named_args else 1
    kept = []
    for config in configs:
        bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
        staged = config.num_stages * (bm + bn + r_pad) * bk * element
        fits = launch_config.within_register_budget(config, output_tiles * bm * bn + side_tiles * bm * r_pad)
        if bm > max(2 * m_bucket, 32) or (limit is not None and staged > limit) or not fits:
            continue
        kept.append(config)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def column_groups(row_blocks: int, column_tiles: int, device: torch.device, wanted: Optional[int] = None) -> int:
    """Programs per row block of the persistent one-pass kernels: ``wanted``, by default enough to give every
    SM a program (row_blocks * groups >= SMs, a CPU counting as one) and no run longer than
    ``COLUMN_RUN`` tiles; capped at ``column_tiles`` (one tile each), then lowered to
    cdiv(column_tiles, run) for run = cdiv(column_tiles, groups), so that no program is left without a tile."""
    if wanted is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        wanted = max(launch_config.cdiv(sms, row_blocks), launch_config.cdiv(column_tiles, COLUMN_RUN))
    run = launch_config.cdiv(column_tiles, min(column_tiles, max(wanted, 1)))
    return launch_config.cdiv(column_tiles, run)


@triton.jit
def program_run(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row block, g, first column tile, run length, column tiles C) of this program in a grid of
    cdiv(M, BLOCK_M) * G programs: program p owns row block p // G and column tiles
    [g run, min((g + 1) run, C)), g = p % G, run = cdiv(C, G)."""
    num_n = tl.cdiv(N, BLOCK_N)
    groups = tl.num_programs(0) // tl.cdiv(M, BLOCK_M)
    group = tl.program_id(0) % groups
    run = tl.cdiv(num_n, groups)
    return tl.program_id(0) // groups, group, group * run, run, num_n


@triton.jit
def gemm_with_side(x_ptr, w_ptr, f_ptr, f_idx_ptr, rows, cols, K, R,
                   stride_xm, stride_xk, stride_wk, stride_wn, stride_fr, stride_fk,
                   seed, threshold, scale, row_ok, v, db_ptr, dbias_ptr,
                   SIDE: tl.constexpr, F_GATHER: tl.constexpr, DROPOUT: tl.constexpr, DB: tl.constexpr,
                   DBIAS: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(acc, side) over all of K: acc = X[rows] Wkn[:, cols] (BLOCK_M, BLOCK_N) and
    side = drop(X[rows]) F^T (BLOCK_M, R_PAD), both fp32, from the same X tiles; without SIDE
    the plain GEMM (F is not read, side is zero; DB and DBIAS need SIDE).

    X (M, K), Wkn (K, N), F (R, K) or the frozen matrix whose rows f_idx (R,) selects; rows and
    cols int64 (wrapped at the edges). DROPOUT: the X tile of the side product only is multiplied
    by the dropout mask of (rows, k) (``keep_scale``). DB: for each K tile, db_ptr[k, :R] =
    X[rows, k]^T v (v (BLOCK_M, R_PAD) in X's dtype, zero on rows past M and ranks past R;
    db_ptr: this row block's (K, R) slice). DBIAS: dbias_ptr[k] = sum of X[rows, k] over the rows where
    row_ok (BLOCK_M,) holds (rows past M wrap onto valid rows and must not count twice).
    """
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    if F_GATHER:
        f_rows = tl.load(f_idx_ptr + offs_r, mask=offs_r < R, other=0).to(tl.int64)
    else:
        f_rows = offs_r.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    f_ptrs = f_ptr + f_rows[None, :] * stride_fr + offs_k[:, None] * stride_fk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    side = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        if SIDE:
            ft = tl.load(f_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
            if DROPOUT:
                xd = (xt.to(tl.float32) * keep_scale(seed, rows, k0, threshold, scale, BLOCK_K)).to(xt.dtype)
                side = tl.dot(xd, ft.to(xt.dtype), side, input_precision=PRECISION)
            else:
                side = tl.dot(xt, ft.to(xt.dtype), side, input_precision=PRECISION)
        if DB:
            part = tl.dot(tl.trans(xt), v, input_precision=PRECISION)
            tl.store(db_ptr + (k0 + offs_k)[:, None] * R + offs_r[None, :], part.to(db_ptr.dtype.element_ty),
                     mask=k_ok[:, None] & (offs_r[None, :] < R))
        if DBIAS:
            sums = tl.sum(tl.where(row_ok[:, None], xt.to(tl.float32), 0.0), axis=0)
            tl.store(dbias_ptr + k0 + offs_k, sums.to(dbias_ptr.dtype.element_ty), mask=k_ok)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        f_ptrs += BLOCK_K * stride_fk
    return acc, side


@triton.jit
def times_middle(vec, mid_ptr, R, stride_i, stride_j, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """vec G (BLOCK_M, R_PAD) fp32 for vec (BLOCK_M, R_PAD) fp32 and G[i, j] = mid[i * stride_i + j * stride_j]
    (R, R), zero-padded: pass M's strides swapped for t M^T, as they are for du M."""
    offs_r = tl.arange(0, R_PAD)
    ok = (offs_r[:, None] < R) & (offs_r[None, :] < R)
    g = tl.load(mid_ptr + offs_r[:, None] * stride_i + offs_r[None, :] * stride_j, mask=ok, other=0.0)
    return tl.dot(vec.to(g.dtype), g, input_precision=PRECISION)


@triton.jit
def times_weights(vec, rw_ptr, R, stride, R_PAD: tl.constexpr):
    """vec ⊙ m (BLOCK_M, R_PAD) fp32 for the rank weights m (R,), zero past R."""
    offs_r = tl.arange(0, R_PAD)
    return vec * tl.load(rw_ptr + offs_r * stride, mask=offs_r < R, other=0.0).to(tl.float32)[None, :]


@triton.jit
def add_expand(acc, vec, g_ptr, g_idx_ptr, seed, rows, cols, col_start, N, R, stride_gr, stride_gn,
               threshold, scale, G_GATHER: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + drop(vec G[:, cols]) (BLOCK_M, BLOCK_N) fp32.

    vec (BLOCK_M, R_PAD) already scaled, in G's dtype (kept in registers across a run of tiles);
    G (R, N) or the frozen matrix whose rows g_idx (R,) selects; DROPOUT: times the mask of
    (rows, col_start + j). Without dropout the product accumulates into acc itself (no second
    (BLOCK_M, BLOCK_N) fp32 tile in registers).
    """
    offs_r = tl.arange(0, R_PAD)
    g = load_factor(g_ptr, g_idx_ptr, offs_r[:, None], cols[None, :], R, N, stride_gr, stride_gn, G_GATHER)
    if DROPOUT:
        low = tl.dot(vec, g, input_precision=PRECISION)
        acc = acc + low * keep_scale(seed, rows, col_start, threshold, scale, BLOCK_N)
    else:
        acc = tl.dot(vec, g, acc, input_precision=PRECISION)
    return acc

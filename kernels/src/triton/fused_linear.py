"""Base GEMM with the low-rank term in its epilogue.

    out = X Wkn + bias + drop(c * g * V U)   X (M, K), Wkn (K, N), V (M, r) fp32, U (r, N)

Forward: X = x, Wkn = W^T, V = v, c = s (times the host gate), g a device gate or 1,
U = B^T (or W[:, J]^T gathered), no dropout. Input gradient: X = dy, Wkn = W, V = dt,
U = A (or W[I] gathered), and drop() the dropout mask of x regenerated from the seed.
Without X and Wkn it is the low-rank "expand" alone, bias + drop(c * g * V U), written as the
output that the cuBLAS plan's base GEMM then accumulates into (beta = 1), launched with one fixed
tile (``launch_config.expand_config``). fp32 accumulation.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..philox import keep_threshold
from . import metadata
from .dropout import keep_scale
from .launch_config import (
    TOKEN_ARGS,
    cdiv,
    dot_precision,
    expand_config,
    gemm_configs,
    launch_context,
    next_power_of_2,
    pad_rank,
    prune_gemm_configs,
)
from .tiles import grouped_tile, load_factor


# Tuned per token-count bucket (the next power of two), not per exact token count, so
# training with varying sequence lengths does not re-tune on every new batch shape.
# The weight's layout is in the key: the forward (W^T, k-contiguous) and the input gradient
# (W, n-contiguous) favour different tiles.
@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "W_LAYOUT", "R_PAD", "HAS_LOWRANK", "DROPOUT"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs})
@triton.jit(launch_metadata=metadata.fused_linear, do_not_specialize=TOKEN_ARGS)
def _fused_linear_kernel(x_ptr, w_ptr, bias_ptr, v_ptr, u_ptr, u_idx_ptr, out_ptr,
                         seed_ptr, gate_ptr, M, N, K, R, M_BUCKET, W_LAYOUT, v_scale, threshold, scale,
                         stride_xm, stride_xk, stride_wk, stride_wn, stride_vm, stride_vr,
                         stride_ur, stride_un, stride_bias, stride_om, stride_on,
                         HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, U_GATHER: tl.constexpr,
                         GATE_PTR: tl.constexpr,
                         DROPOUT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of out (M, N) per program.

    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), program ids swizzled in groups of GROUP_M
    row tiles so neighbouring programs share W tiles in L2. Pointers: x (M, K), w (K, N),
    bias (N,) of stride stride_bias, v (M, R) fp32, u (R, N) or the frozen matrix whose rows
    u_idx (R,) selects, of any float dtype, out (M, N), seed (1,) int64, gate () — each used only
    when its constexpr flag is set. The low-rank product v U runs in out's dtype.
    Rows and columns past the edge wrap (offs % M) so edge tiles load valid memory; their
    stores are masked. Row and column offsets are int64: M * stride can pass 2^31.
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)  # wrapped: edge tiles read valid rows, stores are masked
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        wt = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LOWRANK:
        offs_r = tl.arange(0, R_PAD)
        v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                    mask=offs_r[None, :] < R, other=0.0)
        u = load_factor(u_ptr, u_idx_ptr, offs_r[:, None], cols[None, :], R, N, stride_ur, stride_un, U_GATHER)
        v = v * v_scale
        if GATE_PTR:
            v = v * tl.load(gate_ptr).to(tl.float32)
        # in the output's dtype, the compute dtype: a factor of another float dtype (PEFT's fp32
        # adapters under bf16 autocast) is cast in registers, as the other kernels and addmm do
        u = u.to(out_ptr.dtype.element_ty)
        v = v.to(out_ptr.dtype.element_ty)
        if DROPOUT:
            low = tl.dot(v, u, input_precision=PRECISION)
            acc += low * keep_scale(tl.load(seed_ptr), rows, pid_n * BLOCK_N, threshold, scale, BLOCK_N)
        else:  # into acc itself: a second (BLOCK_M, BLOCK_N) fp32 tile would spill at 128x256
            acc = tl.dot(v, u, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fused_linear(x: Optional[torch.Tensor], w_kn: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 v: Optional[torch.Tensor] = None, u: Optional[torch.Tensor] = None,
                 u_index: Optional[torch.Tensor] = None, *, v_scale: float = 1.0, gate: Optional[torch.Tensor] = None,
                 p: float = 0.0, seed: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """out (M, N) = x w_kn + bias + drop(v_scale * gate * v U), a fresh tensor in x's dtype (in
    ``out_dtype`` without the base GEMM).

    x (M, K) and w_kn (K, N) with any strides (pass W.t() or W as views), or both None: no
    base GEMM (the low-rank "expand" alone); bias (N,) of any stride or None; v (M, r) fp32
    or None (no low-rank term); U = u (r, N), or u[u_index] for u_index (r,) (rows of a frozen
    matrix read by index), of any float dtype (v U runs in the output's dtype); gate: a 0-dim
    device tensor multiplied in (no host read) or None.
    p > 0: the low-rank term is multiplied by the dropout mask of an (M, N) input drawn from
    ``seed`` ((1,) int64 device tensor).
    """
    has_base = x is not None
    m = x.shape[0] if has_base else v.shape[0]
    n = w_kn.shape[1] if has_base else u.shape[1]
    k = x.shape[1] if has_base else 0
    out = torch.empty(m, n, device=(x if has_base else v).device, dtype=x.dtype if has_base else out_dtype)
    has_lowrank = v is not None
    r = v.shape[1] if has_lowrank else 1
    dummy = out
    x = x if has_base else dummy
    w_kn = w_kn if has_base else dummy
    u = u if has_lowrank else dummy
    dropout = has_lowrank and p > 0.0
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    # the expand alone is memory-bound: one fixed tile, the autotuner (and its tile list) bypassed
    kernel, tile = (_fused_linear_kernel, {}) if has_base else (_fused_linear_kernel.fn, expand_config())
    with launch_context(out.device):
        kernel[grid](
            x, w_kn, bias if bias is not None else dummy, v if has_lowrank else dummy, u,
            u_index if u_index is not None else dummy, out, seed if dropout else dummy,
            gate if gate is not None else dummy,
            m, n, k, r, next_power_of_2(m), int(w_kn.stride(0) == 1), float(v_scale), keep_threshold(p),
            1.0 / (1.0 - p),
            x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1),
            v.stride(0) if has_lowrank else 0, v.stride(1) if has_lowrank else 0,
            u.stride(0), u.stride(1), bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, U_GATHER=u_index is not None,
            GATE_PTR=has_lowrank and gate is not None,
            DROPOUT=dropout, R_PAD=pad_rank(r), PRECISION=dot_precision(out.dtype), **tile)
    return out

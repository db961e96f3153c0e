"""NEAT's weight-space projection and its backward, one kernel each over W (d_out, d_in).

    forward:  Z = W^T A_n^T (d_in, r), H = act(Z)      (activation in the epilogue)
    backward: dA_n = (W (dH ⊙ act'(Z)))^T (r, d_out)   (act' applied on the loaded tiles)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import metadata
from .launch_config import cdiv, dot_precision, launch_context, pad_rank, skinny_blocks

#: activation name -> code of the ``ACT`` constexpr
ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4, "sigmoid": 5}


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) on an fp32 block."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = z * _sigmoid(z)
    elif ACT == 4:
        z = 2.0 * _sigmoid(2.0 * z) - 1.0
    elif ACT == 5:
        z = _sigmoid(z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """act'(z) on an fp32 block."""
    if ACT == 0:
        g = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        g = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        g = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 3:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        th = 2.0 * _sigmoid(2.0 * z) - 1.0
        g = 1.0 - th * th
    else:
        s = _sigmoid(z)
        g = s * (1.0 - s)
    return g


@triton.jit(launch_metadata=metadata.neat_projection)
def _neat_forward_kernel(w_ptr, a_ptr, h_ptr, z_ptr, D_OUT, D_IN, R,
                         stride_wo, stride_wi, stride_ar, stride_ao,
                         ACT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    """Rows [i * BLOCK_I, ...) of Z = W^T A_n^T and H = act(Z) (D_IN, R), reducing over all of D_OUT.

    Grid: (cdiv(D_IN, BLOCK_I),). Pointers: w (D_OUT, D_IN), a (R, D_OUT), h and z (D_IN, R)
    contiguous. W offsets are int64 (D_OUT * D_IN can pass 2^31).
    """
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_r = tl.arange(0, R_PAD)
    i_ok = offs_i < D_IN
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_I, R_PAD), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < D_OUT
        wt = tl.load(w_ptr + offs_o[None, :].to(tl.int64) * stride_wo + offs_i[:, None] * stride_wi,
                     mask=i_ok[:, None] & o_ok[None, :], other=0.0)
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_o[:, None] * stride_ao,
                     mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(wt, at, acc, input_precision=PRECISION)
    offs = offs_i[:, None].to(tl.int64) * R + offs_r[None, :]
    ok = i_ok[:, None] & r_ok[None, :]
    tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=ok)
    tl.store(h_ptr + offs, _act(acc, ACT).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit(launch_metadata=metadata.neat_projection)
def _neat_backward_kernel(w_ptr, dh_ptr, z_ptr, da_ptr, D_OUT, D_IN, R,
                          stride_wo, stride_wi, stride_dhi, stride_dhr, stride_zi, stride_zr,
                          ACT: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """Columns [o * BLOCK_O, ...) of dA_n = (W (dH ⊙ act'(Z)))^T (R, D_OUT), reducing over all of D_IN.

    Grid: (cdiv(D_OUT, BLOCK_O),). Pointers: w (D_OUT, D_IN), dh and z (D_IN, R), da (R, D_OUT)
    contiguous. W offsets are int64.
    """
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, R_PAD)
    o_ok = offs_o < D_OUT
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_O, R_PAD), dtype=tl.float32)
    for i0 in range(0, D_IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < D_IN
        wt = tl.load(w_ptr + offs_o[:, None].to(tl.int64) * stride_wo + offs_i[None, :] * stride_wi,
                     mask=o_ok[:, None] & i_ok[None, :], other=0.0)
        ok = i_ok[:, None] & r_ok[None, :]
        dh = tl.load(dh_ptr + offs_i[:, None] * stride_dhi + offs_r[None, :] * stride_dhr, mask=ok, other=0.0)
        z = tl.load(z_ptr + offs_i[:, None] * stride_zi + offs_r[None, :] * stride_zr, mask=ok, other=0.0)
        dz = dh.to(tl.float32) * _act_grad(z.to(tl.float32), ACT)
        acc = tl.dot(wt, dz.to(wt.dtype), acc, input_precision=PRECISION)
    out = da_ptr + offs_r[None, :] * D_OUT + offs_o[:, None]
    tl.store(out, acc.to(da_ptr.dtype.element_ty), mask=o_ok[:, None] & r_ok[None, :])


def neat_forward(weight: torch.Tensor, a_n: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, Z), both (d_in, r) in weight's dtype: Z = W^T A_n^T, H = act(Z); weight (d_out, d_in), a_n (r, d_out)."""
    d_out, d_in = weight.shape
    r = a_n.shape[0]
    r_pad = pad_rank(r)
    precision = dot_precision(weight.dtype)
    cfg = skinny_blocks(r_pad, precision)
    h = torch.empty(d_in, r, device=weight.device, dtype=weight.dtype)
    z = torch.empty_like(h)
    with launch_context(weight.device):
        _neat_forward_kernel[(cdiv(d_in, cfg["BLOCK_M"]),)](
            weight, a_n, h, z, d_out, d_in, r, weight.stride(0), weight.stride(1), a_n.stride(0), a_n.stride(1),
            ACT=ACT_CODES[act], R_PAD=r_pad, PRECISION=precision,
            BLOCK_I=cfg["BLOCK_M"], BLOCK_O=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return h, z


def neat_backward(dh: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    """dA_n = (W (dH ⊙ act'(Z)))^T, shape (r, d_out) in weight's dtype; dh, z (d_in, r)."""
    d_out, d_in = weight.shape
    r = z.shape[1]
    r_pad = pad_rank(r)
    precision = dot_precision(weight.dtype)
    cfg = skinny_blocks(r_pad, precision)
    da = torch.empty(r, d_out, device=weight.device, dtype=weight.dtype)
    with launch_context(weight.device):
        _neat_backward_kernel[(cdiv(d_out, cfg["BLOCK_M"]),)](
            weight, dh, z, da, d_out, d_in, r, weight.stride(0), weight.stride(1),
            dh.stride(0), dh.stride(1), z.stride(0), z.stride(1),
            ACT=ACT_CODES[act], R_PAD=r_pad, PRECISION=precision,
            BLOCK_O=cfg["BLOCK_M"], BLOCK_I=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return da

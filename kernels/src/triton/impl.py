"""Triton plans of the adapted linear and NEAT's projection (same contract as ``torch_impl``).

    y = x W^T + bias + s*g*((xd A^T) M^T ⊙ m) B^T,   xd = dropout(x) drawn from the seed

Two plans share the low-rank work (Triton skinny kernels, fp32) and differ in who runs the
two base GEMMs (forward x W^T, input gradient dy W):

- ``FUSED`` ("triton"): the Triton GEMM runs them with the low-rank term in its epilogue
  (s*g*v B^T forward, mask ⊙ dt A backward): no extra pass over y or dx.
- ``CUBLAS`` ("cublas"): torch's GEMM (cuBLAS on GPUs) runs them, low-rank term first: the
  output is created holding bias + s*g*v B^T (forward) or the masked s*g*dt A (input
  gradient) by a skinny ``addmm`` or, where addmm cannot (gathered factors read by index, a
  device gate, dropout in the input gradient), by the Triton expand kernel; the base GEMM then
  accumulates into it (``addmm_``, beta = 1). The GEMM reads that output in its epilogue,
  inside its compute-bound time, so the low-rank term costs one memory-bound write of y (dx)
  instead of a read and a write after the GEMM. Its factors may have another float dtype than x
  (PEFT's fp32 adapters over a bf16 model): the kernels read them as they are, addmm gets A or
  B cast (r-sized), and dA, dB, dM, dm are formed in fp32 and stored in the factors' own dtypes
  (no cast of the gradients).

Forward: t = xd A^T (shrink kernel, dropout in-kernel); v = (t M^T) ⊙ m on the small t.
Backward: one pass over dy for dP = dy B, dB and dbias; the r-sized chain dv, dm, du, dM,
dt in torch; dA = dt^T xd (xd regenerated). A = W[row_index] and B = W[:, col_index] are
read by index inside the kernels. Gate off: y = x W^T + bias with no low-rank launch; the
gate gradient, if asked, is s * sum(dP ⊙ v) from t and dP only; needed factors get zeros.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import torch_impl
from ..spec import Grads, GradsNeeded, LowRankTerm, fill_skipped_grads, in_dtype
from .dropout import dropout_mask
from .fused_linear import fused_linear
from .launch_config import INTERPRETED, INTERPRETER_READY
from .neat_kernels import neat_backward as _neat_backward
from .neat_kernels import neat_forward as _neat_forward
from .shrink import shrink as _shrink_kernel
from .skinny import down_grad, dy_pass

__all__ = ["CUBLAS", "FUSED", "INTERPRETED", "INTERPRETER_READY", "TritonPlan", "dropout_mask", "shrink"]


def down_view(weight: Tensor, term: LowRankTerm) -> tuple[Tensor, Optional[Tensor]]:
    """A (r, d_in) as (matrix, row index): the factor, or W with row_index."""
    return (term.a, None) if term.a is not None else (weight, term.row_index.contiguous())


def up_view(weight: Tensor, term: LowRankTerm) -> tuple[Tensor, Optional[Tensor]]:
    """B^T (r, d_out) as (matrix, row index): B.t(), or W.t() with col_index."""
    return (term.b.t(), None) if term.b is not None else (weight.t(), term.col_index.contiguous())


def _factors_in(term: LowRankTerm, dtype: torch.dtype) -> LowRankTerm:
    """``term`` with its factors cast to ``dtype`` (for torch's ops, which take one dtype)."""
    return term._replace(a=in_dtype(term.a, dtype), b=in_dtype(term.b, dtype), middle=in_dtype(term.middle, dtype),
                         rank_weights=in_dtype(term.rank_weights, dtype))


def shrink(x: Tensor, weight: Tensor, term: LowRankTerm) -> Tensor:
    """t = dropout(x) A^T (N, r) in fp32."""
    a, index = down_view(weight, term)
    return _shrink_kernel(x, a, index, term.dropout_p, term.dropout_seed)


def mixed_ranks(t: Tensor, term: LowRankTerm) -> tuple[Tensor, Tensor]:
    """u = t M^T and v = u ⊙ m in fp32 (both (N, r))."""
    u = t if term.middle is None else t @ term.middle.float().t()
    v = u if term.rank_weights is None else u * term.rank_weights.float()
    return u, v


def rank_chain_grads(grads: Grads, dp: Tensor, u: Tensor, t: Tensor, x: Tensor, term: LowRankTerm,
                     needs: GradsNeeded) -> Tensor:
    """The r-sized chain from dP = dy B (N, r) fp32, without the s*g factor: fills dm, dM and dA
    (scaled by s*g) into ``grads``; returns dt = (dP ⊙ m) M (N, r), still without s*g."""
    sg = term.scaled_gate()
    if needs.rank_weights:
        grads.rank_weights = ((dp * u).sum(0) * sg).to(term.rank_weights.dtype)
    du = dp if term.rank_weights is None else dp * term.rank_weights.float()
    if needs.middle:
        grads.middle = ((du.t() @ t) * sg).to(term.middle.dtype)
    dt = du if term.middle is None else du @ term.middle.float()
    if needs.a:
        grads.a = down_grad(dt, x, term.dropout_p, term.dropout_seed, dt_scale=term.scale * term.gate,
                            gate=term.gate_tensor, out_dtype=term.a.dtype)
    return dt


def _low_rank_first(v: Tensor, u: Tensor, u_index: Optional[Tensor], bias: Optional[Tensor], term: LowRankTerm,
                    dtype: torch.dtype, p: float = 0.0) -> Tensor:
    """bias + drop_p(s*g * v U) (N, d) in ``dtype``, a fresh tensor for the cuBLAS plan's base GEMM to
    accumulate into; v (N, r) fp32, U = u (r, d) or u[u_index]. A skinny cuBLAS addmm (the bias in
    cuBLASLt's epilogue; without one, beta = 0 never reads the uninitialised output) where it can run, the
    Triton expand for gathered factors, a device gate or the dropout mask (drop_p: of the (N, d) input
    regenerated from the term's seed)."""
    sg = term.scale * term.gate
    if term.gate_tensor is None and u_index is None and p == 0.0:
        v, u = in_dtype(v, dtype), in_dtype(u, dtype)
        if bias is not None:
            return torch.addmm(bias, v, u, alpha=sg)
        return torch.empty(v.shape[0], u.shape[1], device=v.device, dtype=dtype).addmm_(v, u, beta=0, alpha=sg)
    return fused_linear(None, None, bias, v, u, u_index, v_scale=sg, gate=term.gate_tensor, p=p,
                        seed=term.dropout_seed, out_dtype=dtype)


def zero_sized(x: Tensor, weight: Tensor) -> bool:
    """Whether the problem is empty (no rows, or d_in or d_out of 0, as nn.Linear allows): torch's ops
    run it, with no launch (the grids would be empty and the split reductions divide by the sizes)."""
    return x.numel() == 0 or weight.numel() == 0


class TritonPlan:
    """A ``spec.Plan`` on the Triton kernels (see the module docstring for the two variants)."""

    def __init__(self, name: str, fused_base: bool) -> None:
        self.name = name
        self.fused_base = fused_base

    def __repr__(self) -> str:
        return f"TritonPlan({self.name!r})"

    def _output(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], v: Tensor, term: LowRankTerm) -> Tensor:
        """y = x W^T + bias + s*g*v B^T (N, d_out)."""
        up, up_index = up_view(weight, term)
        if self.fused_base:
            return fused_linear(x, weight.t(), bias, v, up, up_index, v_scale=term.scale * term.gate,
                                gate=term.gate_tensor)
        return _low_rank_first(v, up, up_index, bias, term, x.dtype).addmm_(x, weight.t())

    def _input_grad(self, dy: Tensor, weight: Tensor, dt: Tensor, term: LowRankTerm) -> Tensor:
        """dx = dy W + dropout'(s*g * dt A) (N, d_in); dt without the s*g factor."""
        down, down_index = down_view(weight, term)
        if self.fused_base:
            return fused_linear(dy, weight, None, dt, down, down_index, v_scale=term.scale * term.gate,
                                gate=term.gate_tensor, p=term.dropout_p, seed=term.dropout_seed)
        return _low_rank_first(dt, down, down_index, None, term, dy.dtype, term.dropout_p).addmm_(dy, weight)

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], term: LowRankTerm,
                keep_t: bool) -> tuple[Tensor, Optional[Tensor]]:
        """y = x W^T + bias + s*g*v B^T (N, d_out); returns (y, t), t (N, r) fp32 or None when not computed."""
        if zero_sized(x, weight):
            return torch_impl.forward(x, weight, bias, _factors_in(term, x.dtype), keep_t)
        if not term.lowrank_on:
            return F.linear(x, weight, bias), (shrink(x, weight, term) if keep_t else None)
        t = shrink(x, weight, term)
        _, v = mixed_ranks(t, term)
        return self._output(x, weight, bias, v, term), t

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, term: LowRankTerm, t: Optional[Tensor],
                 needs: GradsNeeded) -> Grads:
        """Gradients of every needed input (see ``torch_impl.backward`` for the formulas)."""
        if zero_sized(x, weight):
            t = None if t is None else t.to(dy.dtype)  # fp32 from the forward: torch's ops take one dtype
            grads = torch_impl.backward(dy, x, weight, _factors_in(term, dy.dtype), t, needs)
            for name in ("a", "b", "middle", "rank_weights"):
                grad, factor = getattr(grads, name), getattr(term, name)
                if grad is not None:
                    setattr(grads, name, grad.to(factor.dtype))
            return grads
        grads = Grads()
        if not (term.lowrank_on or needs.gate) or not (needs.any_lowrank or needs.x):
            if needs.bias:
                grads.bias = dy.sum(0)
            if needs.x:
                grads.x = dy @ weight
            if not term.lowrank_on:
                fill_skipped_grads(grads, term, needs)
            return grads
        if t is None:
            t = shrink(x, weight, term)
        u, v = mixed_ranks(t, term)
        up, up_index = up_view(weight, term)
        want_db = term.lowrank_on and needs.b
        # s*g multiplies every low-rank gradient: the kernels apply it (a host float, times the
        # device gate when there is one); the r-sized chain below runs on the unscaled dP
        sg_host, gate = term.scale * term.gate, term.gate_tensor
        dp, db, dbias = dy_pass(dy, up, up_index, v if want_db else None, needs.bias, v_scale=sg_host, gate=gate,
                                db_dtype=term.b.dtype if want_db else torch.float32, dbias_dtype=dy.dtype)
        if needs.bias:
            grads.bias = dbias
        if needs.gate:
            grads.gate = term.scale * (dp * v).sum()
        if not term.lowrank_on:
            if needs.x:
                grads.x = dy @ weight
            fill_skipped_grads(grads, term, needs)
            return grads
        if want_db:
            grads.b = db
        dt = rank_chain_grads(grads, dp, u, t, x, term, needs)
        if needs.x:
            grads.x = self._input_grad(dy, weight, dt, term)
        return grads

    @staticmethod
    def neat_forward(weight: Tensor, a_n: Tensor, act: str) -> tuple[Tensor, Tensor]:
        """NEAT projection: (H, Z) with Z = W^T A_n^T (d_in, r) and H = act(Z), in weight's dtype."""
        if weight.numel() == 0 or a_n.shape[0] == 0:
            return torch_impl.neat_forward(weight, a_n, act)
        return _neat_forward(weight, a_n, act)

    @staticmethod
    def neat_backward(dh: Tensor, weight: Tensor, z: Tensor, act: str) -> Tensor:
        """dA_n = (W (dH ⊙ act'(Z)))^T, shape (r, d_out)."""
        if weight.numel() == 0 or z.shape[1] == 0:
            return torch_impl.neat_backward(dh, weight, z, act)
        return _neat_backward(dh, weight, z, act)


FUSED = TritonPlan("triton", fused_base=True)
CUBLAS = TritonPlan("cublas", fused_base=False)


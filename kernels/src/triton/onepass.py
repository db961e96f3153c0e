"""The "onepass" plan: the low-rank work inside the two base GEMMs, so x and dy are each read once there.

    forward:  y, t = onepass_forward(x)          x W^T, t = xd A^T and s*g*v B^T in one persistent kernel
              (each program forms t once for the run of column tiles it walks)
    backward: dx, dP, dB, dbias = onepass_input_grad(dy)   dy W, dy B, dy^T v, sum dy, s*g*dt A
              (persistent too: each program forms dy B once for the run of dx's column tiles it walks)
              the r-sized chain (dg, dm, dM, dt) in torch on (N, r) tensors
              dA = s*g dt^T xd   (``down_grad``: the one extra pass, over x)

dB comes from the input-gradient kernel's row-block partials when they move fewer bytes than
a second read of dy (``db_partials_are_cheaper``), else from one GEMM dy^T v. Everything else
(gate off, no input gradient, empty inputs, NEAT's projection) is the fused plan's code.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..spec import Grads, GradsNeeded, LowRankTerm
from .impl import TritonPlan, down_view, mixed_ranks, rank_chain_grads, shrink, up_view, zero_sized
from .onepass_backward import db_partials_are_cheaper, onepass_input_grad
from .onepass_forward import onepass_forward


class OnePassPlan(TritonPlan):
    """A ``spec.Plan``: the fused plan with one-pass kernels for the forward and the input gradient."""

    def __init__(self, name: str = "onepass") -> None:
        super().__init__(name, fused_base=True)

    def __repr__(self) -> str:
        return f"OnePassPlan({self.name!r})"

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], term: LowRankTerm,
                keep_t: bool) -> tuple[Tensor, Optional[Tensor]]:
        if zero_sized(x, weight) or not term.lowrank_on:
            return super().forward(x, weight, bias, term, keep_t)
        down, down_index = down_view(weight, term)
        up, up_index = up_view(weight, term)
        return onepass_forward(x, weight.t(), bias, down, down_index, up, up_index, term.middle, term.rank_weights,
                               v_scale=term.scale * term.gate, gate=term.gate_tensor, p=term.dropout_p,
                               seed=term.dropout_seed)

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, term: LowRankTerm, t: Optional[Tensor],
                 needs: GradsNeeded) -> Grads:
        if zero_sized(x, weight) or not term.lowrank_on or not needs.x:
            return super().backward(dy, x, weight, term, t, needs)
        if t is None:
            t = shrink(x, weight, term)
        u, v = mixed_ranks(t, term)
        db_in_kernel = needs.b and db_partials_are_cheaper(dy, t.shape[1])
        up, up_index = up_view(weight, term)
        down, down_index = down_view(weight, term)
        sg_host, gate, sg = term.scale * term.gate, term.gate_tensor, term.scaled_gate()
        grads = Grads()
        grads.x, dp, grads.b, grads.bias = onepass_input_grad(
            dy, weight, up, up_index, down, down_index, term.middle, term.rank_weights, v if db_in_kernel else None,
            needs.bias, v_scale=sg_host, gate=gate, p=term.dropout_p, seed=term.dropout_seed,
            db_dtype=term.b.dtype if db_in_kernel else dy.dtype, dbias_dtype=dy.dtype)
        if needs.b and not db_in_kernel:
            grads.b = (dy.t() @ (v * sg).to(dy.dtype)).to(term.b.dtype)
        if needs.gate:
            grads.gate = term.scale * (dp * v).sum()
        rank_chain_grads(grads, dp, u, t, x, term, needs)
        return grads


ONEPASS = OnePassPlan()

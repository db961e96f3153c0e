"""The autograd Function of the adapted linear: one hand-written backward for every backend.

The backend module (``torch_impl`` or ``triton.impl``) supplies ``forward`` and
``backward`` primitives with the same contract; this Function only saves what the
backward needs (x, the small t = xd A^T, the factors) and routes gradients.
Dropout is regenerated from the saved seed, so no (N, d_in) mask is stored.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from .spec import GradsNeeded, LowRankTerm


class AdaptedLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + scale * gate * ((dropout(x) A^T) M^T ⊙ m) B^T for x (..., d_in).

    Leading dimensions are flattened inside, so y (..., d_out) is a fresh tensor, not a
    view (as nn.Linear returns; FSDP's hooks rely on it).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                b: Optional[Tensor], middle: Optional[Tensor], rank_weights: Optional[Tensor],
                gate: Tensor, row_index: Optional[Tensor], col_index: Optional[Tensor],
                scale: float, gate_value: float, dropout_p: float, dropout_seed: int,
                backend: ModuleType) -> Tensor:
        term = LowRankTerm(a, b, middle, rank_weights, row_index, col_index,
                           scale, gate_value, dropout_p, dropout_seed)
        needs_gate_grad = ctx.needs_input_grad[7]
        ctx.x_shape = x.shape
        x2d = x.reshape(-1, x.shape[-1])
        y, t = backend.forward(x2d, weight, bias, term, keep_t=needs_gate_grad)
        ctx.save_for_backward(x2d, weight, a, b, middle, rank_weights, row_index, col_index, t)
        ctx.scalars = (scale, gate_value, dropout_p, dropout_seed)
        ctx.backend = backend
        ctx.gate_dtype, ctx.gate_shape = gate.dtype, gate.shape
        # aten's _unsafe_view (as matmul uses): same storage, no view relation to y
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, a, b, middle, rank_weights, row_index, col_index, t = ctx.saved_tensors
        term = LowRankTerm(a, b, middle, rank_weights, row_index, col_index, *ctx.scalars)
        flags = ctx.needs_input_grad
        needs = GradsNeeded(x=flags[0], bias=flags[2], a=flags[3], b=flags[4], middle=flags[5],
                            rank_weights=flags[6], gate=flags[7])
        dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
        grads = ctx.backend.backward(dy2d, x, weight, term, t, needs)
        if grads.x is not None:
            grads.x = grads.x.reshape(ctx.x_shape)
        gate_grad = grads.gate.to(ctx.gate_dtype).reshape(ctx.gate_shape) if grads.gate is not None else None
        return (grads.x, None, grads.bias, grads.a, grads.b, grads.middle, grads.rank_weights,
                gate_grad, None, None, None, None, None, None, None)

"""The autograd Function of the adapted linear: one hand-written backward for every backend.

The primitives are the custom ops ``fastlora::adapted_linear_fwd`` / ``_bwd``
(``custom_ops``), which run the named backend (``torch_impl`` or ``triton.impl``); this
Function only saves what the backward needs (x, the small t = xd A^T, the factors, the
seed) and routes gradients. Dropout is regenerated from the saved seed, so no (N, d_in)
mask is stored. The backward is first order: under ``create_graph=True`` its gradients come out tied to
the inputs they depend on by ``FirstOrderOnly``, which raises when they are differentiated (the torch
plan's recorded ops differentiate twice). Where autograd records nothing
(``torch.no_grad``, ``torch.inference_mode``), ``forward_without_grad`` runs the forward primitive
alone: no context, nothing saved.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import custom_ops

#: positions in forward's inputs of the gradients in custom_ops.GRAD_FIELDS order
_GRAD_INPUTS = (0, 2, 3, 4, 5, 6, 7)


def _gates(gate: Optional[Tensor], gate_value: Optional[float]) -> tuple[float, Optional[Tensor]]:
    """(the host gate, the device gate): gate_value None means only the device knows the gate (torch.compile),
    and the op multiplies by the tensor ``gate``."""
    return (1.0, gate.detach()) if gate_value is None else (gate_value, None)


def _rows(x: Tensor) -> Tensor:
    """x (..., d_in) as (N, d_in); the common 2-D call skips the reshape (host time per call)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _shaped(y: Tensor, x_shape: torch.Size) -> Tensor:
    """y (N, d_out) as (..., d_out) after x's leading dimensions: aten's _unsafe_view (as matmul uses), the
    same storage without a view relation to y."""
    return y if len(x_shape) == 2 else torch.ops.aten._unsafe_view.default(y, (*x_shape[:-1], y.shape[-1]))


def forward_without_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor], b: Optional[Tensor],
                         middle: Optional[Tensor], rank_weights: Optional[Tensor], gate: Optional[Tensor],
                         row_index: Optional[Tensor], col_index: Optional[Tensor], seed: Optional[Tensor],
                         scale: float, gate_value: Optional[float], dropout_p: float, backend: str) -> Tensor:
    """``AdaptedLinearFunction.apply``'s output (same arguments) where autograd records nothing: the forward
    primitive alone, t not kept."""
    gate_value, device_gate = _gates(gate, gate_value)
    y, _ = custom_ops.adapted_linear_fwd(_rows(x), weight, bias, a, b, middle, rank_weights, row_index, col_index,
                                         seed, scale, gate_value, dropout_p, False, backend, device_gate)
    return _shaped(y, x.shape)


class FirstOrderOnly(torch.autograd.Function):
    """A gradient the fused backward returned (a copy), tied to the tensors it depends on (dy and the
    differentiable inputs): differentiating it raises, where a plain result would silently lack the
    terms of those dependencies (a gradient penalty, a Hessian-vector product)."""

    @staticmethod
    def forward(ctx, grad: Tensor, *depends_on: Tensor) -> Tensor:
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("a gradient of fastlora's fused op was differentiated again (create_graph=True): the "
                           "Triton plans' backward is first order; run these layers on backend='torch', whose "
                           "recorded ops give second-order gradients")


class AdaptedLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + scale * gate * ((dropout(x) A^T) M^T ⊙ m) B^T for x (..., d_in).

    Leading dimensions are flattened inside, so y (..., d_out) is a fresh tensor, not a
    view (as nn.Linear returns; FSDP's hooks rely on it).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                b: Optional[Tensor], middle: Optional[Tensor], rank_weights: Optional[Tensor],
                gate: Optional[Tensor], row_index: Optional[Tensor], col_index: Optional[Tensor],
                seed: Optional[Tensor], scale: float, gate_value: Optional[float], dropout_p: float,
                backend: str) -> Tensor:
        gate_value, device_gate = _gates(gate, gate_value)
        keep_t = ctx.needs_input_grad[7]  # the gate's gradient needs t even when the gate is 0
        ctx.x_shape = x.shape
        x2d = _rows(x)
        y, t = custom_ops.adapted_linear_fwd(x2d, weight, bias, a, b, middle, rank_weights, row_index, col_index,
                                             seed, scale, gate_value, dropout_p, keep_t, backend, device_gate)
        t = t if custom_ops.t_computed(gate_value, keep_t) else None
        ctx.save_for_backward(x2d, weight, a, b, middle, rank_weights, row_index, col_index, t, seed, device_gate)
        ctx.scalars = (scale, gate_value, dropout_p)
        ctx.backend = backend
        if gate is not None:
            ctx.gate_dtype, ctx.gate_shape = gate.dtype, gate.shape
        return _shaped(y, x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, a, b, middle, rank_weights, row_index, col_index, t, seed, device_gate = ctx.saved_tensors
        flags = ctx.needs_input_grad
        needs = [flags[i] for i in _GRAD_INPUTS]
        dy2d = _rows(dy).contiguous()
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True): see FirstOrderOnly
        with torch.no_grad() if create_graph else contextlib.nullcontext():
            computed = iter(custom_ops.adapted_linear_bwd(
                dy2d, x, weight, a, b, middle, rank_weights, row_index, col_index, t, seed, *ctx.scalars,
                needs, ctx.backend, device_gate))
            grads = [next(computed) if need else None for need in needs]
        if create_graph:
            ties = [v for v in (dy, x, a, b, middle, rank_weights) if v is not None and v.requires_grad]
            grads = [g if g is None or not ties else FirstOrderOnly.apply(g, *ties) for g in grads]
        grad_x, grad_bias, grad_a, grad_b, grad_middle, grad_rank_weights, grad_gate = grads
        if grad_x is not None and len(ctx.x_shape) != 2:
            grad_x = grad_x.reshape(ctx.x_shape)
        if grad_gate is not None:
            grad_gate = grad_gate.to(ctx.gate_dtype).reshape(ctx.gate_shape)
        return (grad_x, None, grad_bias, grad_a, grad_b, grad_middle, grad_rank_weights,
                grad_gate, None, None, None, None, None, None, None)

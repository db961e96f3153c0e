"""NEAT's weight-space projection H = act(W^T A_n^T) (d_in, r) and its backward.

The rest of NEAT is the adapted linear with A = H^T (see ``adapted_linear``), so the
(d_out, d_in) delta is never built. Backward: dZ = dH ⊙ act'(Z), dA_n = (W dZ)^T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import custom_ops, dispatch, torch_impl
from .activations import activation, check_activation
from .transforms import functorch_active
from .validation import check_frozen_weight


def neat_projection_reference(weight: Tensor, a_n: Tensor, act: str = "relu") -> Tensor:
    """H = act(W^T A_n^T): weight (d_out, d_in), a_n (r, d_out) -> (d_in, r). Autograd-differentiable."""
    return activation(act, weight.t() @ a_n.t())


class NeatProjectionFunction(torch.autograd.Function):
    """H = act(W^T A_n^T) with the hand-written backward; saves Z (d_in, r).

    The primitives are the custom ops ``fastlora::neat_fwd`` / ``neat_bwd`` (``custom_ops``).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, a_n: Tensor, act: str, backend: str) -> Tensor:
        h, z = custom_ops.neat_fwd(weight, a_n, act, backend)
        ctx.save_for_backward(weight, z)
        ctx.act, ctx.backend = act, backend
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        weight, z = ctx.saved_tensors
        da = custom_ops.neat_bwd(dh.contiguous(), weight, z, ctx.act, ctx.backend)
        return None, da, None, None


def neat_projection(weight: Tensor, a_n: Tensor, act: str = "relu", backend: str = "auto") -> Tensor:
    """H = act(W^T A_n^T) (d_in, r) for weight (d_out, d_in) frozen and a_n (r, d_out), computed in W's
    dtype whether or not autocast is on (the adapted linear that uses H casts it as autocast does)."""
    check_activation(act)
    for name, t in (("weight", weight), ("a_n", a_n)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if weight.dim() != 2 or a_n.dim() != 2 or a_n.shape[1] != weight.shape[0]:
        raise ValueError(f"a_n must have shape (r, d_out={weight.shape[0] if weight.dim() == 2 else '?'}), "
                         f"got {tuple(a_n.shape)} for weight {tuple(weight.shape)}")
    if a_n.device != weight.device:
        raise RuntimeError(f"a_n is on {a_n.device} but weight is on {weight.device}")
    check_frozen_weight(weight)
    a_n = a_n if a_n.dtype == weight.dtype else a_n.to(weight.dtype)
    # auto on CUDA: the Triton projection kernel (activation fused into the skinny GEMM), not timed
    plan = dispatch.select_plan(backend, weight, weight.dtype, lambda: "triton")
    if functorch_active():  # torch.func differentiates recorded torch ops, not the Function
        with torch.autocast(weight.device.type, enabled=False):
            return torch_impl.neat_forward(weight, a_n, act)[0]
    # in W's dtype under autocast too: an autocast GEMM here would give a half-precision Z that the
    # backward (run outside autocast) multiplies with W; reading W once in its dtype is also cheaper
    # than casting it (the GEMM is skinny, bound by W's bytes)
    with torch.autocast(weight.device.type, enabled=False):
        return NeatProjectionFunction.apply(weight, a_n, act, plan)

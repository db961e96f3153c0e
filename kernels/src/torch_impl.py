"""Torch implementation of the forward and backward primitives of the adapted linear.

Used on CPU and wherever Triton is not eligible. Same contract as the Triton path
(``fastlora.kernels.triton.impl``): ``forward`` returns y and the saved
``t = xd A^T`` (N, r); ``backward`` returns the gradients of every needed input.
Gate off: A and B are never read in the forward; in the backward only the
straight-through gate gradient ``scale * sum((dy B) ⊙ v)`` is formed, if asked.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .activations import activation, activation_grad
from .masks import draw_mask
from .spec import Grads, GradsNeeded, LowRankTerm, fill_skipped_grads
from .transforms import functorch_active


def _mask(x: Tensor, term: LowRankTerm) -> Optional[Tensor]:
    """The dropout mask (N, d_in) regenerated from the term's seed (``masks.dropout_mask``), or None."""
    if term.dropout_p == 0.0:
        return None
    return draw_mask(x.shape[0], x.shape[1], term.dropout_p, term.dropout_seed, x.device, x.dtype)


def _dropped(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    return x if mask is None else x * mask


def _mixed(t: Tensor, term: LowRankTerm) -> tuple[Tensor, Tensor]:
    """u = t M^T and v = u ⊙ m (both (N, r))."""
    u = t if term.middle is None else t @ term.middle.t()
    v = u if term.rank_weights is None else u * term.rank_weights
    return u, v


def shrink(x: Tensor, weight: Tensor, term: LowRankTerm, y0: Optional[Tensor] = None,
           dropped: Optional[Tensor] = None) -> Tensor:
    """t = dropout(x) A^T (N, r) (``dropped``: dropout(x) drawn already). With gathered rows and no dropout,
    t = Y0[:, I]."""
    if term.row_index is not None and term.dropout_p == 0.0 and y0 is not None:
        return y0.index_select(1, term.row_index)
    if term.dropout_p != 0.0 and term.dropout_seed is None:  # recorded: torch's own dropout
        return (F.dropout(x, term.dropout_p) if dropped is None else dropped) @ term.down(weight).t()
    return _dropped(x, _mask(x, term)) @ term.down(weight).t()


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], term: LowRankTerm,
            keep_t: bool) -> tuple[Tensor, Optional[Tensor]]:
    """y = x W^T + bias + scale*gate*v B^T; returns (y, t) with t None unless computed.

    The base is F.linear itself, so a zero update reproduces nn.Linear bit for bit.
    """
    return _forward(x, weight, bias, term, keep_t)


def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], term: LowRankTerm, keep_t: bool,
             dropped: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``forward``, torch's dropout of x drawn already when ``dropped`` is given (see ``shrink``)."""
    y = F.linear(x, weight, bias)
    t = None
    if term.lowrank_on or keep_t:
        t = shrink(x, weight, term, y0=y if bias is None else None, dropped=dropped)
    if term.lowrank_on:
        _, v = _mixed(t, term)
        y = _add_update(y, v, term.up(weight).t(), term.scaled_gate())
    return y, t


def _add_update(y: Tensor, v: Tensor, up: Tensor, sg) -> Tensor:
    """y += sg * v up, in place (F.linear's backward does not need y; an out-of-place addmm would copy it).

    In fp16 the scale multiplies the (N, d_out) product, as PEFT orders it: autograd then scales dy before
    both backward products, which unscaled (dy^T v, dy B) overflow fp16 where the scaled gradients fit."""
    if functorch_active():  # out of place: under vmap the update may be batched where y is not
        if y.dtype == torch.float16:
            return y + (v @ up) * sg
        return torch.addmm(y, v, up, alpha=sg) if isinstance(sg, float) else torch.addmm(y, v * sg, up)
    if y.dtype == torch.float16:
        return y.add_((v @ up) * sg)
    return y.addmm_(v, up, alpha=sg) if isinstance(sg, float) else y.addmm_(v * sg, up)


def forward_recorded(x: Tensor, weight: Tensor, bias: Optional[Tensor], term: LowRankTerm) -> Tensor:
    """y (..., d_out) for x (..., d_in) by ``forward``'s ops, recorded by torch's autograd: the eager
    torch plan with the low-rank path on. Autograd runs their backward in C++ (no Python per
    backward call, unlike the Function around ``backward``); with dropout it keeps the mask and the
    dropped x for the backward (as ``nn.Dropout`` before ``nn.Linear`` does) instead of drawing the
    mask again, and without a seed (``term.dropout_seed`` None) the mask is ``F.dropout``'s. y is a
    fresh tensor, not a view of another (as nn.Linear returns).
    """
    if x.dim() == 2:
        return forward(x, weight, bias, term, keep_t=False)[0]
    dropped = None
    if term.lowrank_on and term.dropout_p != 0.0 and term.dropout_seed is None and not x.is_contiguous():
        # torch's mask drawn over x as laid out (nn.Dropout's draw), not over the row copy reshape makes
        dropped = F.dropout(x, term.dropout_p).reshape(-1, x.shape[-1])
    y, _ = _forward(x.reshape(-1, x.shape[-1]), weight, bias, term, keep_t=False, dropped=dropped)
    return torch.ops.aten._unsafe_view.default(y, (*x.shape[:-1], y.shape[-1]))


def backward(dy: Tensor, x: Tensor, weight: Tensor, term: LowRankTerm, t: Optional[Tensor],
             needs: GradsNeeded) -> Grads:
    """Gradients of y = x W^T + bias + s*g*((xd A^T) M^T ⊙ m) B^T.

    dP = dy B; dv = s g dP; dB = s g dy^T v; dm = sum_n dv ⊙ u; du = dv ⊙ m;
    dM = du^T t; dt = du M; dA = dt^T xd; dx = dy W + dropout'(dt A); dg = s sum(dP ⊙ v).
    In fp16 dy is scaled before the products (as autograd does for ``forward``'s fp16 update), so no
    product overflows where the scaled gradient fits; other dtypes scale after, as autograd does for
    its addmm (the two plans' gradients agree bit for bit).
    """
    grads = Grads()
    if needs.bias:
        grads.bias = dy.sum(0)
    if needs.x:
        grads.x = dy @ weight
    if not term.lowrank_on and not needs.gate:
        fill_skipped_grads(grads, term, needs)
        return grads
    if not needs.any_lowrank and not needs.x:
        return grads
    if t is None:
        t = shrink(x, weight, term)
    b = term.up(weight)
    u, v = _mixed(t, term)
    scaled_first = dy.dtype == torch.float16
    dy_s, after = (dy * term.scale, 1.0) if scaled_first else (dy, term.scale)  # s dy = dy_s * after
    dp = dy_s @ b
    if needs.gate:
        grads.gate = after * (dp * v).sum()
    if not term.lowrank_on:
        fill_skipped_grads(grads, term, needs)
        return grads
    gate_after = after * (term.gate if term.gate_tensor is None else term.gate_tensor)  # s g = scale of dy_s * this
    dv = dp * gate_after
    if needs.b:
        grads.b = (dy_s.t() @ v) * gate_after
    if needs.rank_weights:
        grads.rank_weights = (dv * u).sum(0)
    du = dv if term.rank_weights is None else dv * term.rank_weights
    if needs.middle:
        grads.middle = du.t() @ t
    dt = du if term.middle is None else du @ term.middle
    mask = _mask(x, term) if needs.a or needs.x else None  # drawn once for both gradients
    if needs.a:
        grads.a = dt.t() @ _dropped(x, mask)
    if needs.x:
        grads.x = grads.x + _dropped(dt @ term.down(weight), mask)
    return grads


def neat_forward(weight: Tensor, a_n: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """NEAT projection: (H, Z) with Z = W^T A_n^T (d_in, r) and H = act(Z)."""
    z = weight.t() @ a_n.t()
    return activation(act, z), z


def neat_backward(dh: Tensor, weight: Tensor, z: Tensor, act: str) -> Tensor:
    """dA_n = (W (dH ⊙ act'(Z)))^T, shape (r, d_out)."""
    return (weight @ (dh * activation_grad(act, z))).t()

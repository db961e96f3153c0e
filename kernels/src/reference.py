"""Pure-torch reference of the adapted-linear operation: the executable specification.

Differentiable by autograd; no fusion, no skipping. Every other path must match it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor


def adapted_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    *,
    middle: Optional[Tensor] = None,
    rank_weights: Optional[Tensor] = None,
    gate: Union[float, Tensor] = 1.0,
    scale: float = 1.0,
    row_index: Optional[Tensor] = None,
    col_index: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """y = x W^T + bias + scale * gate * ((xd A^T) M^T ⊙ m) B^T.

    x: (..., d_in); A = lora_a (r, d_in) or W[row_index]; B = lora_b (d_out, r) or
    W[:, col_index]; xd = x * dropout_mask (the mask already holds 1/(1-p) on kept
    entries) or x when no mask is given.
    """
    a = weight[row_index] if lora_a is None else lora_a
    b = weight[:, col_index] if lora_b is None else lora_b
    xd = x if dropout_mask is None else x * dropout_mask
    t = xd @ a.t()
    if middle is not None:
        t = t @ middle.t()
    if rank_weights is not None:
        t = t * rank_weights
    return F.linear(x, weight, bias) + scale * gate * (t @ b.t())

"""Argument bundles shared by the reference, the torch path and the Triton path.

The operation (DESIGN.md, "One operation under every method")::

    y = x W^T + bias + scale * gate * ((dropout(x) A^T) M^T ⊙ m) B^T

    x: (N, d_in)   W: (d_out, d_in)   bias: (d_out,)
    A: (r, d_in)   or W[row_index, :]   (CURLoRA's R)
    B: (d_out, r)  or W[:, col_index]   (CURLoRA's C)
    M: (r, r) or None (identity)        m: (r,) or None (ones)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRankTerm:
    """The low-rank factors and host-side scalars of one call.

    Exactly one of ``a`` / ``row_index`` and one of ``b`` / ``col_index`` is set.
    ``dropout_seed``: the (1,) int64 seed tensor on the input's device (None without dropout).
    ``gate`` is the host value of g; ``lowrank_on`` is False when g == 0, in which
    case neither A nor B is read in the forward pass. ``gate_tensor``: g as a 0-dim
    device tensor when its host value is not known (a tensor gate under torch.compile,
    which would otherwise break the graph to read it); then the low-rank path always
    runs and is multiplied by it (``gate`` is 1).
    """

    a: Optional[Tensor]
    b: Optional[Tensor]
    middle: Optional[Tensor]
    rank_weights: Optional[Tensor]
    row_index: Optional[Tensor]
    col_index: Optional[Tensor]
    scale: float
    gate: float
    dropout_p: float
    dropout_seed: Optional[Tensor]
    gate_tensor: Optional[Tensor] = None

    @property
    def lowrank_on(self) -> bool:
        return self.gate != 0.0

    def scaled_gate(self) -> Union[float, Tensor]:
        """s * g: a float, or a 0-dim tensor with a device gate."""
        gate = self.gate if self.gate_tensor is None else self.gate_tensor
        return self.scale * gate

    @property
    def rank(self) -> int:
        return (self.a if self.a is not None else self.row_index).shape[0]

    def down(self, weight: Tensor) -> Tensor:
        """A (r, d_in): the given factor or the gathered rows W[row_index, :]."""
        return self.a if self.a is not None else weight.index_select(0, self.row_index)

    def up(self, weight: Tensor) -> Tensor:
        """B (d_out, r): the given factor or the gathered columns W[:, col_index]."""
        return self.b if self.b is not None else weight.index_select(1, self.col_index)


@dataclass(frozen=True)
class GradsNeeded:
    """Which inputs of the operation need a gradient."""

    x: bool
    bias: bool
    a: bool
    b: bool
    middle: bool
    rank_weights: bool
    gate: bool

    @property
    def any_lowrank(self) -> bool:
        return self.a or self.b or self.middle or self.rank_weights or self.gate


@dataclass
class Grads:
    """Gradients in the order of GradsNeeded; None where not needed."""

    x: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    a: Optional[Tensor] = None
    b: Optional[Tensor] = None
    middle: Optional[Tensor] = None
    rank_weights: Optional[Tensor] = None
    gate: Optional[Tensor] = None


def zeros_like_or_none(needed: bool, like: Optional[Tensor]) -> Optional[Tensor]:
    """A zero gradient (never None) for a needed input whose path was skipped."""
    return torch.zeros_like(like) if needed and like is not None else None


def fill_skipped_grads(grads: Grads, term: LowRankTerm, needs: GradsNeeded) -> None:
    """Gate off: the factors get zero gradients (never None, for DDP)."""
    grads.a = zeros_like_or_none(needs.a, term.a)
    grads.b = zeros_like_or_none(needs.b, term.b)
    grads.middle = zeros_like_or_none(needs.middle, term.middle)
    grads.rank_weights = zeros_like_or_none(needs.rank_weights, term.rank_weights)

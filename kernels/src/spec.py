"""Argument bundles shared by the reference, the torch path and the Triton path.

The operation every method computes::

    y = x W^T + bias + scale * gate * ((dropout(x) A^T) M^T ⊙ m) B^T

    x: (N, d_in)   W: (d_out, d_in)   bias: (d_out,)
    A: (r, d_in)   or W[row_index, :]   (CURLoRA's R)
    B: (d_out, r)  or W[:, col_index]   (CURLoRA's C)
    M: (r, r) or None (identity)        m: (r,) or None (ones)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor


class LowRankTerm(NamedTuple):
    """The low-rank factors and host-side scalars of one call (immutable; a NamedTuple, which a call
    builds in a quarter of a frozen dataclass's host time).

    Exactly one of ``a`` / ``row_index`` and one of ``b`` / ``col_index`` is set.
    ``dropout_seed``: the (1,) int64 seed tensor on the input's device (None without dropout; with
    dropout, None only on the torch plan recorded by autograd, whose mask is then ``F.dropout``'s,
    drawn once from torch's generator as nn.Dropout's is).
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


class GradsNeeded(NamedTuple):
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


@dataclass(slots=True)
class Grads:
    """Gradients in the order of GradsNeeded; None where not needed."""

    x: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    a: Optional[Tensor] = None
    b: Optional[Tensor] = None
    middle: Optional[Tensor] = None
    rank_weights: Optional[Tensor] = None
    gate: Optional[Tensor] = None


#: the dedicated cast of each float dtype: the same op as ``Tensor.to(dtype)``, which parses its many
#: signatures on every call (about 1 us of host time more per cast on a CPU)
_CASTS = {torch.float16: Tensor.half, torch.bfloat16: Tensor.bfloat16, torch.float32: Tensor.float,
          torch.float64: Tensor.double}


def in_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in ``dtype`` (a differentiable cast), t itself when it has it or is None (``Tensor.to`` costs host
    time per call even when it returns t)."""
    if t is None or t.dtype == dtype:
        return t
    cast = _CASTS.get(dtype)
    return cast(t) if cast is not None else t.to(dtype)


def zeros_like_or_none(needed: bool, like: Optional[Tensor]) -> Optional[Tensor]:
    """A zero gradient (never None) for a needed input whose path was skipped."""
    return torch.zeros_like(like) if needed and like is not None else None


def fill_skipped_grads(grads: Grads, term: LowRankTerm, needs: GradsNeeded) -> None:
    """Gate off: the factors get zero gradients (never None, for DDP)."""
    grads.a = zeros_like_or_none(needs.a, term.a)
    grads.b = zeros_like_or_none(needs.b, term.b)
    grads.middle = zeros_like_or_none(needs.middle, term.middle)
    grads.rank_weights = zeros_like_or_none(needs.rank_weights, term.rank_weights)


class Plan(Protocol):
    """What every execution plan implements (``torch_impl``, the Triton plans); ``dispatch``
    returns one. Inputs are 2-D and already in the compute dtype; outputs are fresh tensors.

    Semantics:
      forward(x (N, d_in), weight (d_out, d_in), bias (d_out,) | None, term, keep_t)
          -> (y (N, d_out) = x W^T + bias + s*g*((xd A^T) M^T ⊙ m) B^T,
              t (N, r) = xd A^T, or None when neither the low-rank path (g != 0) nor keep_t needs it).
          g == 0: A and B are not read; xd = x times the dropout mask drawn from term.dropout_seed.
      backward(dy (N, d_out), x, weight, term, t | None (recompute), needs) -> Grads
          with a tensor for every input flagged in ``needs`` (zeros for skipped factors, never None):
          dx = dy W + mask ⊙ (s*g dt A), dbias = sum_n dy, dA = s*g dt^T xd, dB = s*g dy^T v,
          dM = s*g du^T t, dm = s*g sum_n dP ⊙ u, dg = s sum(dP ⊙ v), where dP = dy B,
          du = dP ⊙ m, dt = du M (derivation in ``torch_impl.backward``).
      neat_forward(weight, a_n (r, d_out), act) -> (H, Z), both (d_in, r): Z = W^T A_n^T, H = act(Z).
      neat_backward(dh (d_in, r), weight, z (d_in, r), act) -> dA_n (r, d_out) = (W (dH ⊙ act'(Z)))^T.
    """

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], term: LowRankTerm,
                keep_t: bool) -> tuple[Tensor, Optional[Tensor]]: ...

    def backward(self, dy: Tensor, x: Tensor, weight: Tensor, term: LowRankTerm, t: Optional[Tensor],
                 needs: GradsNeeded) -> Grads: ...

    def neat_forward(self, weight: Tensor, a_n: Tensor, act: str) -> tuple[Tensor, Tensor]: ...

    def neat_backward(self, dh: Tensor, weight: Tensor, z: Tensor, act: str) -> Tensor: ...

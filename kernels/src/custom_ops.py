"""The forward and backward primitives as torch custom ops: opaque nodes for torch.compile.

    fastlora::adapted_linear_fwd   (y, t)                    of the adapted linear
    fastlora::adapted_linear_bwd   [grad of each needed input]
    fastlora::neat_fwd             (H, Z)                    of NEAT's projection
    fastlora::neat_bwd             dA_n

Each runs the plan named by ``backend`` ("torch": ``torch_impl``; "triton" / "cublas": the
Triton plans, see ``dispatch``) and has a shape-only fake, so Dynamo/AOTAutograd record one node per call instead
of tracing the backend's Python. ``AdaptedLinearFunction`` and ``NeatProjectionFunction``
call them through the module-level functions of the same names: the hand-written backward
stays, the ops are its primitives (no autograd is registered on the ops themselves). Those
functions call the op while torch.compile traces and its implementation directly in eager
mode (the same code; the dispatcher's custom-op path added ~125 us per call on the 2-core CI CPU).

Conventions, so a fake can state every output's metadata: outputs are fresh, contiguous
tensors; t is fp32 on the Triton plans and in x's dtype on the torch plan, and an empty
(0,) tensor when not computed; the gate gradient is 0-dim in dy's dtype (torch) or fp32
(Triton plans). Scalars (scale, gate, dropout p) are floats; ``gate_tensor``, when given, is the
gate as a 0-dim tensor whose value only the device knows (see ``LowRankTerm``). The dropout
seed is a 1-element int64 tensor on the input's device (None without dropout), read only by
the kernels: it can be drawn in a compiled graph (no graph break, no recompile per seed) or
a captured CUDA graph, and no call reads it on the host.
"""
from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .spec import GradsNeeded, LowRankTerm, Plan, in_dtype

#: GradsNeeded / Grads fields in the order of the ``needs`` flags and of the backward's outputs
GRAD_FIELDS = ("x", "bias", "a", "b", "middle", "rank_weights", "gate")

_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor? a, Tensor? b, Tensor? middle, "
               "Tensor? rank_weights, Tensor? row_index, Tensor? col_index, Tensor? seed, float scale, "
               "float gate, float dropout_p, bool keep_t, str backend, Tensor? gate_tensor=None) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor weight, Tensor? a, Tensor? b, Tensor? middle, "
               "Tensor? rank_weights, Tensor? row_index, Tensor? col_index, Tensor? t, Tensor? seed, "
               "float scale, float gate, float dropout_p, bool[] needs, str backend, Tensor? gate_tensor=None) "
               "-> Tensor[]")


def _module(backend: str) -> Plan:
    return dispatch.plan_implementation(backend)


def _t_dtype(x: Tensor, backend: str) -> torch.dtype:
    return x.dtype if backend == "torch" else torch.float32


def _term(a, b, middle, rank_weights, row_index, col_index, seed, scale, gate, dropout_p,
          gate_tensor) -> LowRankTerm:
    return LowRankTerm(a, b, middle, rank_weights, row_index, col_index, scale, gate, dropout_p, seed, gate_tensor)


def t_computed(gate: float, keep_t: bool) -> bool:
    """Whether the forward forms t = xd A^T: the low-rank path is on, or the gate's gradient needs it."""
    return gate != 0.0 or keep_t


def _adapted_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                        b: Optional[Tensor], middle: Optional[Tensor], rank_weights: Optional[Tensor],
                        row_index: Optional[Tensor], col_index: Optional[Tensor], seed: Optional[Tensor],
                        scale: float, gate: float, dropout_p: float, keep_t: bool,
                        backend: str, gate_tensor: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(y (N, d_out), t (N, r) or empty) for x (N, d_in); see the backends' ``forward``."""
    term = _term(a, b, middle, rank_weights, row_index, col_index, seed, scale, gate, dropout_p, gate_tensor)
    y, t = _module(backend).forward(x, weight, bias, term, keep_t)
    t_dtype = _t_dtype(x, backend)
    t = x.new_empty(0, dtype=t_dtype) if t is None else in_dtype(t, t_dtype).contiguous()
    return y.contiguous(), t


def _adapted_linear_fwd_fake(x, weight, bias, a, b, middle, rank_weights, row_index, col_index, seed,
                             scale, gate, dropout_p, keep_t, backend, gate_tensor=None):
    rank = (a if a is not None else row_index).shape[0]
    t_shape = (x.shape[0], rank) if t_computed(gate, keep_t) else (0,)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(t_shape, dtype=_t_dtype(x, backend))


def _gate_grad_dtype(dy: Tensor, backend: str) -> torch.dtype:
    return dy.dtype if backend == "torch" else torch.float32


def _adapted_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, a: Optional[Tensor], b: Optional[Tensor],
                        middle: Optional[Tensor], rank_weights: Optional[Tensor], row_index: Optional[Tensor],
                        col_index: Optional[Tensor], t: Optional[Tensor], seed: Optional[Tensor], scale: float,
                        gate: float, dropout_p: float, needs: list[bool], backend: str,
                        gate_tensor: Optional[Tensor] = None) -> list[Tensor]:
    """The gradients of the inputs flagged in ``needs`` (order of GRAD_FIELDS), never None.

    t: the forward's t, or None (recomputed). See the backends' ``backward``.
    """
    term = _term(a, b, middle, rank_weights, row_index, col_index, seed, scale, gate, dropout_p, gate_tensor)
    grads = _module(backend).backward(dy, x, weight, term, t, GradsNeeded(*needs))
    out = []
    for field, needed in zip(GRAD_FIELDS, needs):
        if not needed:
            continue
        grad = getattr(grads, field)
        if grad is None:
            raise RuntimeError(f"backend {backend!r} returned no gradient for needed input {field!r}")
        if field == "gate":
            grad = grad.to(_gate_grad_dtype(dy, backend)).reshape(())
        out.append(grad.contiguous())
    return out


def _adapted_linear_bwd_fake(dy, x, weight, a, b, middle, rank_weights, row_index, col_index, t, seed,
                             scale, gate, dropout_p, needs, backend, gate_tensor=None):
    likes = {"x": x, "a": a, "b": b, "middle": middle, "rank_weights": rank_weights}
    out = []
    for field, needed in zip(GRAD_FIELDS, needs):
        if not needed:
            continue
        if field == "gate":
            out.append(dy.new_empty((), dtype=_gate_grad_dtype(dy, backend)))
        elif field == "bias":
            out.append(dy.new_empty(dy.shape[1]))
        else:
            out.append(dy.new_empty(likes[field].shape, dtype=likes[field].dtype))
    return out


def _neat_fwd(weight: Tensor, a_n: Tensor, act: str, backend: str) -> tuple[Tensor, Tensor]:
    """(H, Z), both (d_in, r) in weight's dtype: Z = W^T A_n^T, H = act(Z)."""
    h, z = _module(backend).neat_forward(weight, a_n, act)
    if h is z:  # the identity activation: outputs must not alias each other
        h = z.clone()
    return h.contiguous(), z.contiguous()


def _neat_fwd_fake(weight, a_n, act, backend):
    shape = (weight.shape[1], a_n.shape[0])
    return weight.new_empty(shape), weight.new_empty(shape)


def _neat_bwd(dh: Tensor, weight: Tensor, z: Tensor, act: str, backend: str) -> Tensor:
    """dA_n = (W (dH ⊙ act'(Z)))^T, (r, d_out) in weight's dtype."""
    return _module(backend).neat_backward(dh, weight, z, act).contiguous()


def _neat_bwd_fake(dh, weight, z, act, backend):
    return weight.new_empty(z.shape[1], weight.shape[0])


def _register(name: str, impl, fake, schema: str):
    op = torch.library.custom_op(f"fastlora::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)

    def call(*args):
        # under torch.compile (or export): the op, one opaque node with a fake for tracing;
        # eager: its implementation directly, without the dispatcher's per-call overhead
        return (getattr(torch.ops.fastlora, name) if torch.compiler.is_compiling() else impl)(*args)

    call.__name__, call.__doc__ = name, impl.__doc__
    return call


adapted_linear_fwd = _register("adapted_linear_fwd", _adapted_linear_fwd, _adapted_linear_fwd_fake, _FWD_SCHEMA)
adapted_linear_bwd = _register("adapted_linear_bwd", _adapted_linear_bwd, _adapted_linear_bwd_fake, _BWD_SCHEMA)
neat_fwd = _register("neat_fwd", _neat_fwd, _neat_fwd_fake,
                     "(Tensor weight, Tensor a_n, str act, str backend) -> (Tensor, Tensor)")
neat_bwd = _register("neat_bwd", _neat_bwd, _neat_bwd_fake,
                     "(Tensor dh, Tensor weight, Tensor z, str act, str backend) -> Tensor")

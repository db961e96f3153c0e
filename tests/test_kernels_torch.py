"""The torch path of the compute layer against independent float64 formulas.

Every expected value here is written out with einsum in float64 and its gradients come
from torch.autograd on that formula; ``adapted_linear_reference`` is not used as the
oracle. Relative error ``||out - ref|| / ||ref||``: < 1e-10 for float64 inputs,
< 1e-5 for float32 inputs (fp32 run against the fp64 formula on the same values). The checks of
values and gradients run both ways the torch plan runs (``PATHS``): the eager call's recorded ops and
the autograd Function over ``torch_impl.backward`` (torch.compile's route).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastlora.kernels import (
    ACTIVATIONS,
    adapted_linear,
    adapted_linear_reference,
    dropout_mask,
    neat_projection,
    neat_projection_reference,
)
from fastlora.kernels.function import AdaptedLinearFunction
from fastlora.kernels.philox import seed_tensor

from utils import rel

D_IN, D_OUT, R = 37, 29, 5
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def formula(x, w, bias, a, b, middle=None, rank_weights=None, gate=1.0, scale=1.0, mask=None):
    """y = x W^T + bias + scale * gate * (((x*mask) A^T) M^T * m) B^T, explicitly; returns (y, base)."""
    base = torch.einsum("...i,oi->...o", x, w)
    if bias is not None:
        base = base + bias
    xd = x if mask is None else x * mask
    t = torch.einsum("...i,ri->...r", xd, a)                    # t = xd A^T
    u = t if middle is None else torch.einsum("...k,rk->...r", t, middle)  # u = t M^T
    v = u if rank_weights is None else u * rank_weights         # v = u * m
    low = torch.einsum("...r,or->...o", v, b)                   # v B^T
    return base + scale * gate * low, base


def make_inputs(dtype, x_shape=(13, D_IN), d_out=D_OUT, r=R, *, bias=True, middle=False,
                rank_weights=False, seed=0):
    """Random, never-zero inputs (B is random, not PEFT's zero init, so the update matters)."""
    g = torch.Generator().manual_seed(seed)
    d_in = x_shape[-1]

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype)

    return dict(
        x=rnd(*x_shape),
        weight=rnd(d_out, d_in, s=1.0 / math.sqrt(d_in)),
        bias=rnd(d_out) if bias else None,
        lora_a=rnd(r, d_in, s=1.0 / math.sqrt(d_in)),
        lora_b=rnd(d_out, r, s=1.0 / math.sqrt(r)),
        middle=rnd(r, r, s=1.0 / math.sqrt(r)) if middle else None,
        # keep the rank weights away from zero so every rank contributes
        rank_weights=(rnd(r).sign() * (0.5 + rnd(r).abs())).to(dtype) if rank_weights else None,
    )


#: the two ways the torch plan runs: "recorded", adapted_linear's eager call (torch ops autograd records),
#: and "function", the autograd Function over ``torch_impl.forward``/``backward``, which torch.compile
#: (one custom op) and an off gate run
PATHS = ["recorded", "function"]


def through_function(x, weight, bias, lora_a, lora_b, *, middle, rank_weights, gate, scale, row_index,
                     col_index, dropout, dropout_seed, backend):
    """adapted_linear's call of the Function on plan ``backend``, its arguments prepared as it prepares them."""
    seed = None if dropout == 0.0 else seed_tensor(dropout_seed, x.device)
    gate_tensor = gate if isinstance(gate, torch.Tensor) else None
    row_index, col_index = (None if i is None else i.long() for i in (row_index, col_index))
    return AdaptedLinearFunction.apply(x, weight, bias, lora_a, lora_b, middle, rank_weights, gate_tensor,
                                       row_index, col_index, seed, float(scale), float(gate), float(dropout),
                                       backend)


def run_both(inputs, requires, *, gate=1.0, scale=1.0, dropout=0.0, dropout_seed=None,
             row_index=None, col_index=None, seed=1, path="recorded"):
    """Run the torch plan by ``path`` (``PATHS``) and the fp64 formula; return outputs and grads of both.

    ``requires``: names (keys of ``inputs`` plus "gate") that require grad.
    ``gate``: a float, or a float to be turned into a 0-dim tensor when "gate" is in ``requires``.
    """
    dtype = inputs["x"].dtype
    leaves = {k: (v.detach().clone().requires_grad_(k in requires) if v is not None else None)
              for k, v in inputs.items()}
    gate_arg = gate
    if "gate" in requires:
        gate_arg = torch.tensor(float(gate), dtype=dtype, requires_grad=True)
    call = adapted_linear if path == "recorded" else through_function
    y = call(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
             middle=leaves["middle"], rank_weights=leaves["rank_weights"], gate=gate_arg, scale=scale,
             row_index=row_index, col_index=col_index, dropout=dropout, dropout_seed=dropout_seed, backend="torch")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    names = [k for k in requires if k != "gate"]
    diff = [leaves[k] for k in names] + ([gate_arg] if "gate" in requires else [])
    got = dict(zip(names + (["gate"] if "gate" in requires else []),
                   torch.autograd.grad(y, diff, dy.to(y.dtype), allow_unused=True)))

    # the independent float64 formula
    ref_leaves = {k: (v.detach().to(F64).requires_grad_(k in requires) if v is not None else None)
                  for k, v in inputs.items()}
    w = ref_leaves["weight"]
    a = ref_leaves["lora_a"] if row_index is None else w[row_index.long()]
    b = ref_leaves["lora_b"] if col_index is None else w[:, col_index.long()]
    ref_gate = torch.tensor(float(gate), dtype=F64, requires_grad="gate" in requires)
    mask = None
    if dropout > 0.0:
        n = inputs["x"].numel() // inputs["x"].shape[-1]
        mask = dropout_mask(n, inputs["x"].shape[-1], dropout, dropout_seed, "cpu", F64)
        mask = mask.reshape(inputs["x"].shape)
    ref_y, base = formula(ref_leaves["x"], w, ref_leaves["bias"], a, b, ref_leaves["middle"],
                          ref_leaves["rank_weights"], ref_gate, scale, mask)
    ref_diff = [ref_leaves[k] for k in names] + ([ref_gate] if "gate" in requires else [])
    ref = dict(zip(names + (["gate"] if "gate" in requires else []),
                   torch.autograd.grad(ref_y, ref_diff, dy, allow_unused=True)))
    return y, got, ref_y, ref, base.detach()


def assert_grads_match(got, ref, tol):
    for name, r in ref.items():
        g = got[name]
        assert g is not None, f"grad of {name} is None"
        assert r is not None, f"formula gives no grad for {name}"
        assert g.shape == r.shape, f"grad of {name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        if float(r.norm()) == 0.0:
            assert torch.count_nonzero(g) == 0, f"grad of {name} should be exactly zero"
        else:
            err = rel(g, r)
            assert err < tol, f"grad of {name}: rel err {err:.3e} >= {tol:.0e}"


# --------------------------------------------------------------------------- values and grads

FACTORS = {
    "lora": dict(),
    "middle": dict(middle=True),
    "rank_weights": dict(rank_weights=True),
    "middle+rank_weights": dict(middle=True, rank_weights=True),
}
GATES = ["float_on", "float_off", "tensor_on", "tensor_off"]
SHAPES = [((13, D_IN), 1.0), ((2, 7, D_IN), 0.37)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("x_shape,scale", SHAPES, ids=["2d_s1", "3d_s0.37"])
@pytest.mark.parametrize("gate_kind", GATES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("factors", list(FACTORS), ids=list(FACTORS))
def test_values_and_grads(factors, with_bias, gate_kind, x_shape, scale, dtype, path):
    cfg = FACTORS[factors]
    inputs = make_inputs(dtype, x_shape, bias=with_bias, **cfg)
    gate = 1.0 if gate_kind.endswith("on") else 0.0
    requires = ["x", "lora_a", "lora_b"] + [k for k in ("bias", "middle", "rank_weights")
                                            if inputs[k] is not None]
    if gate_kind.startswith("tensor"):
        requires.append("gate")
    y, got, ref_y, ref, base = run_both(inputs, requires, gate=gate, scale=scale, path=path)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], D_OUT)
    # the low-rank term matters in the formula (so this test can fail)
    full, _ = formula(*(inputs[k].to(F64) if inputs[k] is not None else None
                        for k in ("x", "weight", "bias", "lora_a", "lora_b", "middle", "rank_weights")),
                      gate=1.0, scale=scale)
    assert float((full - base.detach()).norm()) > 1e-3 * float(base.detach().norm())
    err = rel(y, ref_y)
    assert err < tol, f"output rel err {err:.3e}"
    if gate == 0.0:
        # low-rank path skipped: the output is the base layer bit for bit
        assert torch.equal(y.detach(), F.linear(inputs["x"], inputs["weight"], inputs["bias"]))
    assert_grads_match(got, ref, tol)
    if gate == 0.0:
        for k in ("lora_a", "lora_b", "middle", "rank_weights"):
            if k in got:
                assert got[k] is not None and torch.count_nonzero(got[k]) == 0
    if gate_kind == "tensor_off":
        # straight-through: the gate gets scale * sum((dy B) * v) even while it is off
        assert float(got["gate"].abs()) > 1e-3
        assert got["gate"].shape == () and got["gate"].dtype == dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("requires", [
    ("x",), ("lora_a",), ("lora_b",), ("middle",), ("rank_weights",), ("gate",), ("bias",),
    ("lora_a", "lora_b"), ("x", "gate"), ("middle", "rank_weights", "gate"),
], ids=lambda r: "+".join(r))
@pytest.mark.parametrize("gate", [1.0, 0.0], ids=["on", "off"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_grad_subsets(requires, gate, dropout, path):
    """Every subset of inputs needing grad takes its own branch of the backward (with dropout: the mask is
    drawn for dA alone too)."""
    inputs = make_inputs(F64, (2, 7, D_IN), middle=True, rank_weights=True, seed=3)
    y, got, ref_y, ref, _ = run_both(inputs, list(requires), gate=gate, scale=-1.3, dropout=dropout,
                                     dropout_seed=31, path=path)
    assert rel(y, ref_y) < 1e-10
    assert set(got) == set(requires)
    assert_grads_match(got, ref, 1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gate", [1.0, 0.0, 0.5, -2.0])
def test_tensor_gate_grad_formula(gate, path):
    """d gate = scale * sum((dy B) * v), spelled out (v = ((x A^T) M^T) * m)."""
    inputs = make_inputs(F64, (13, D_IN), middle=True, rank_weights=True, seed=4)
    scale = 0.61
    y, got, ref_y, ref, _ = run_both(inputs, ["gate"], gate=gate, scale=scale, seed=9, path=path)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    v = ((inputs["x"] @ inputs["lora_a"].t()) @ inputs["middle"].t()) * inputs["rank_weights"]
    expected = scale * ((dy @ inputs["lora_b"]) * v).sum()
    assert abs(float(got["gate"]) - float(expected)) <= 1e-10 * abs(float(expected))
    assert rel(y, ref_y) < 1e-10


@pytest.mark.parametrize("gate_shape", [(), (1,), (1, 1)])
def test_one_element_gate_tensor_gets_grad_of_its_shape(gate_shape):
    """Validation accepts any one-element gate; its gradient must come back in its shape."""
    inputs = make_inputs(F64, (13, D_IN), seed=5)
    gate = torch.full(gate_shape, 1.0, dtype=F64, requires_grad=True)
    y = adapted_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"],
                       gate=gate, scale=0.8, backend="torch")
    y.sum().backward()
    expected = 0.8 * ((torch.ones_like(y) @ inputs["lora_b"]) * (inputs["x"] @ inputs["lora_a"].t())).sum()
    assert gate.grad.shape == gate_shape
    assert abs(float(gate.grad.reshape(())) - float(expected)) <= 1e-10 * abs(float(expected))


def test_gate_off_never_reads_factors():
    """gate == 0.0: A and B are not read, so even NaN factors leave the base output intact."""
    inputs = make_inputs(F64, (13, D_IN), seed=6)
    a = torch.full_like(inputs["lora_a"], float("nan")).requires_grad_()
    b = torch.full_like(inputs["lora_b"], float("nan")).requires_grad_()
    x = inputs["x"].clone().requires_grad_()
    y = adapted_linear(x, inputs["weight"], inputs["bias"], a, b, gate=0.0, backend="torch")
    assert torch.equal(y, F.linear(inputs["x"], inputs["weight"], inputs["bias"]))
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    assert torch.allclose(x.grad, torch.ones_like(y) @ inputs["weight"], rtol=0, atol=1e-12)


def test_one_dim_x_and_empty_batch():
    inputs = make_inputs(F64, (13, D_IN), seed=7)
    x1 = inputs["x"][0]
    y1 = adapted_linear(x1, inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"],
                        scale=0.5, backend="torch")
    ref, _ = formula(x1, inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], scale=0.5)
    assert y1.shape == (D_OUT,) and rel(y1, ref) < 1e-10
    a = inputs["lora_a"].clone().requires_grad_()
    x0 = torch.zeros(0, D_IN, dtype=F64, requires_grad=True)
    y0 = adapted_linear(x0, inputs["weight"], None, a, inputs["lora_b"], backend="torch")
    assert y0.shape == (0, D_OUT)
    y0.sum().backward()
    assert torch.count_nonzero(a.grad) == 0 and x0.grad.shape == (0, D_IN)


def test_noncontiguous_inputs():
    inputs = make_inputs(F64, (13, D_IN), middle=True, seed=8)
    x = inputs["x"].t().contiguous().t()                      # same values, column-major
    w = inputs["weight"].t().contiguous().t()
    a = inputs["lora_a"].t().contiguous().t().requires_grad_()
    y = adapted_linear(x, w, inputs["bias"], a, inputs["lora_b"], middle=inputs["middle"],
                       backend="torch")
    dy = torch.randn(26, D_OUT, dtype=F64)[::2]               # non-contiguous upstream grad
    (ga,) = torch.autograd.grad(y, [a], dy)
    a64 = inputs["lora_a"].clone().requires_grad_()
    ref, _ = formula(inputs["x"], inputs["weight"], inputs["bias"], a64, inputs["lora_b"],
                     middle=inputs["middle"])
    (ra,) = torch.autograd.grad(ref, [a64], dy)
    assert rel(y, ref) < 1e-10 and rel(ga, ra) < 1e-10


# --------------------------------------------------------------------------- CURLoRA gathering

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("x_shape", [(13, D_IN), (2, 7, D_IN)], ids=["2d", "3d"])
def test_curlora_gathering(x_shape, index_dtype, with_bias, dtype, path):
    inputs = make_inputs(dtype, x_shape, bias=with_bias, middle=True, seed=11)
    inputs["lora_a"] = None
    inputs["lora_b"] = None
    row_index = torch.tensor([3, 17, 3, 28, 0], dtype=index_dtype)   # rows of W (< d_out), repeated
    col_index = torch.tensor([36, 5, 5, 12, 5], dtype=index_dtype)   # columns of W (< d_in), repeated
    y, got, ref_y, ref, base = run_both(inputs, ["middle", "x"], scale=1.0,
                                        row_index=row_index, col_index=col_index, path=path)
    assert float((ref_y.detach() - base).norm()) > 1e-3 * float(base.norm())
    assert rel(y, ref_y) < TOL[dtype]
    assert_grads_match(got, ref, TOL[dtype])


class XProducts(TorchDispatchMode):
    """Counts the matrix products whose left operand has x's shape."""

    def __init__(self, x_shape):
        super().__init__()
        self.x_shape, self.count = tuple(x_shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operand = args[1] if func.overloadpacket is torch.ops.aten.addmm else args[0]
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and tuple(operand.shape) == self.x_shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias,dropout,products", [(False, 0.0, 1), (True, 0.0, 2), (False, 0.25, 2)],
                         ids=["nobias", "bias", "dropout"])
def test_gathered_rows_take_t_from_the_base_output(bias, dropout, products):
    """CURLoRA without dropout or bias: t = x W[I]^T is read from the columns I of x W^T (one product over
    x, the base's), not formed again; with a bias (in the base output) or dropout (on x) by its own product."""
    inputs = make_inputs(F64, (13, D_IN), bias=bias, middle=True, seed=14)
    x, weight = inputs["x"], inputs["weight"]
    rows, cols = torch.tensor([3, 17, 3, 28, 0]), torch.tensor([36, 5, 5, 12, 5])
    with XProducts(x.shape) as counter:
        y = adapted_linear(x, weight, inputs["bias"], None, None, middle=inputs["middle"], row_index=rows,
                           col_index=cols, dropout=dropout, dropout_seed=3, backend="torch")
    assert counter.count == products
    mask = dropout_mask(13, D_IN, dropout, 3, "cpu", F64) if dropout else None
    expected, _ = formula(x, weight, inputs["bias"], weight[rows], weight[:, cols], inputs["middle"], mask=mask)
    assert rel(y, expected) < 1e-12


@pytest.mark.parametrize("path", PATHS)
def test_curlora_middle_grad_nonzero_at_zero_init(path):
    """dU = alpha (dy C)^T (x R^T) is nonzero at U = 0 (CURLoRA's init)."""
    inputs = make_inputs(F64, (13, D_IN), middle=True, seed=12)
    inputs.update(lora_a=None, lora_b=None, middle=torch.zeros(R, R, dtype=F64))
    rows, cols = torch.tensor([1, 2, 2, 9, 20]), torch.tensor([0, 0, 30, 7, 8])
    y, got, ref_y, ref, base = run_both(inputs, ["middle"], row_index=rows, col_index=cols, path=path)
    assert torch.equal(y.detach(), F.linear(inputs["x"], inputs["weight"], inputs["bias"]))
    assert float(got["middle"].norm()) > 0.1
    assert_grads_match(got, ref, 1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_mixed_gathered_and_given_factors(path):
    inputs = make_inputs(F64, (13, D_IN), seed=13)
    inputs["lora_b"] = None
    cols = torch.tensor([4, 4, 0, 36, 11])
    y, got, ref_y, ref, _ = run_both(inputs, ["x", "lora_a", "bias"], col_index=cols, scale=0.9, path=path)
    assert rel(y, ref_y) < 1e-10
    assert_grads_match(got, ref, 1e-10)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("gathered", [False, True], ids=["factors", "gathered"])
@pytest.mark.parametrize("factors", list(FACTORS), ids=list(FACTORS))
def test_the_reference_is_the_formula(factors, gathered):
    """adapted_linear_reference, the other paths' oracle elsewhere, against the einsum formula: every factor,
    a gate and scale, a dropout mask, gathered rows and columns of W."""
    inputs = make_inputs(F64, (2, 7, D_IN), **FACTORS[factors], seed=8)
    mask = dropout_mask(14, D_IN, 0.3, 4, "cpu", F64).reshape(2, 7, D_IN)
    rows, cols = (torch.tensor([3, 17, 3, 28, 0]), torch.tensor([36, 5, 5, 12, 5])) if gathered else (None, None)
    a, b = (None, None) if gathered else (inputs["lora_a"], inputs["lora_b"])
    got = adapted_linear_reference(inputs["x"], inputs["weight"], inputs["bias"], a, b, middle=inputs["middle"],
                                   rank_weights=inputs["rank_weights"], gate=0.6, scale=1.7, row_index=rows,
                                   col_index=cols, dropout_mask=mask)
    w = inputs["weight"]
    want, base = formula(inputs["x"], w, inputs["bias"], w[rows] if gathered else a, w[:, cols] if gathered else b,
                         inputs["middle"], inputs["rank_weights"], gate=0.6, scale=1.7, mask=mask)
    assert rel(got, want) < 1e-12 and rel(got, base) > 1e-3


def test_the_references_options_are_keyword_only():
    """Past the five tensors every option is named: a middle factor given in rank_weights' place cannot be."""
    inputs = make_inputs(F64, middle=True, seed=9)
    with pytest.raises(TypeError, match="positional"):
        adapted_linear_reference(inputs["x"], inputs["weight"], None, inputs["lora_a"], inputs["lora_b"],
                                 inputs["middle"])


# --------------------------------------------------------------------------- dropout

def test_dropout_mask_properties():
    m1 = dropout_mask(64, 33, 0.3, 1234, "cpu", F64)
    m2 = dropout_mask(64, 33, 0.3, 1234, "cpu", F64)
    m3 = dropout_mask(64, 33, 0.3, 1235, "cpu", F64)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    values = set(torch.unique(m1).tolist())
    assert values == {0.0, 1.0 / 0.7}
    keep = float((m1 != 0).double().mean())
    assert 0.6 < keep < 0.8
    # the keep pattern does not depend on the dtype asked for
    m4 = dropout_mask(64, 33, 0.3, 1234, "cpu", torch.float32)
    assert torch.equal(m4 != 0, m1 != 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("x_shape", [(13, D_IN), (2, 7, D_IN)], ids=["2d", "3d"])
@pytest.mark.parametrize("gate_kind", ["float_on", "tensor_on", "tensor_off"])
def test_dropout_values_and_grads(gate_kind, x_shape, dtype, path):
    inputs = make_inputs(dtype, x_shape, middle=True, rank_weights=True, seed=21)
    gate = 0.0 if gate_kind.endswith("off") else 1.0
    requires = ["x", "bias", "lora_a", "lora_b", "middle", "rank_weights"]
    if gate_kind.startswith("tensor"):
        requires.append("gate")
    y, got, ref_y, ref, base = run_both(inputs, requires, gate=gate, scale=0.7, dropout=0.4,
                                        dropout_seed=777, path=path)
    assert rel(y, ref_y) < TOL[dtype]
    assert_grads_match(got, ref, TOL[dtype])
    # the mask matters: the formula without dropout is far from the output
    if gate:
        no_drop, _ = formula(*(inputs[k].to(F64) for k in ("x", "weight", "bias", "lora_a", "lora_b",
                                                             "middle", "rank_weights")), scale=0.7)
        assert rel(y, no_drop) > 1e-3
    else:
        assert torch.equal(y.detach(), F.linear(inputs["x"], inputs["weight"], inputs["bias"]))


@pytest.mark.parametrize("path", PATHS)
def test_dropout_with_gathered_rows(path):
    """With dropout the gathered-row shortcut t = Y0[:, I] must not be used."""
    inputs = make_inputs(F64, (13, D_IN), bias=False, middle=True, seed=22)
    inputs.update(lora_a=None, lora_b=None)
    rows, cols = torch.tensor([2, 2, 7, 0, 28]), torch.tensor([1, 36, 1, 3, 3])
    y, got, ref_y, ref, _ = run_both(inputs, ["x", "middle"], row_index=rows, col_index=cols,
                                     dropout=0.25, dropout_seed=5, path=path)
    assert rel(y, ref_y) < 1e-10
    assert_grads_match(got, ref, 1e-10)


def test_dropout_seed_reproducible_and_distinct():
    inputs = make_inputs(F64, (13, D_IN), seed=23)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"])
    y1 = adapted_linear(*args, dropout=0.5, dropout_seed=42, backend="torch")
    y2 = adapted_linear(*args, dropout=0.5, dropout_seed=42, backend="torch")
    y3 = adapted_linear(*args, dropout=0.5, dropout_seed=43, backend="torch")
    assert torch.equal(y1, y2)
    assert rel(y3, y1) > 1e-3
    # no seed: a fresh mask each call
    y4 = adapted_linear(*args, dropout=0.5, backend="torch")
    y5 = adapted_linear(*args, dropout=0.5, backend="torch")
    assert not torch.equal(y4, y5)
    # dropout acts on the low-rank path only
    y6 = adapted_linear(*args, dropout=0.5, dropout_seed=42, gate=0.0, backend="torch")
    assert torch.equal(y6, F.linear(inputs["x"], inputs["weight"], inputs["bias"]))


def test_dropout_without_seed_backward_uses_forward_mask():
    """With no seed given, backward still uses the forward's mask even if the global RNG moved."""
    inputs = make_inputs(F64, (13, D_IN), seed=24)
    dy = torch.randn(13, D_OUT, dtype=F64)

    def run(move_rng):
        a = inputs["lora_a"].clone().requires_grad_()
        x = inputs["x"].clone().requires_grad_()
        torch.manual_seed(7)
        y = adapted_linear(x, inputs["weight"], None, a, inputs["lora_b"], dropout=0.3, backend="torch")
        if move_rng:
            torch.rand(1000)
        return (y, *torch.autograd.grad(y, [a, x], dy))

    y1, ga1, gx1 = run(move_rng=True)
    y2, ga2, gx2 = run(move_rng=False)
    assert torch.equal(y1, y2) and torch.equal(ga1, ga2) and torch.equal(gx1, gx2)
    # and the dropout did act (differs from no dropout)
    y0 = adapted_linear(inputs["x"], inputs["weight"], None, inputs["lora_a"], inputs["lora_b"],
                        backend="torch")
    assert rel(y1, y0) > 1e-3


def test_dropout_without_seed_is_torchs_own_dropout(monkeypatch):
    """With no seed, the torch plan's mask is F.dropout's under the same random state (nn.Dropout's, as
    PEFT draws it): y = x W^T + b + s (F.dropout(x) A^T) B^T."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter keeps the kernels' draw
    inputs = make_inputs(F64, (13, D_IN), seed=25)
    x, w, b, a, lb = (inputs[k] for k in ("x", "weight", "bias", "lora_a", "lora_b"))
    torch.manual_seed(11)
    y = adapted_linear(x, w, b, a, lb, scale=1.5, dropout=0.3, backend="torch")
    torch.manual_seed(11)
    expected = F.linear(x, w, b) + 1.5 * (F.dropout(x, 0.3) @ a.t()) @ lb.t()
    assert rel(y, expected) < 1e-12
    assert rel(y, F.linear(x, w, b) + 1.5 * (x @ a.t()) @ lb.t()) > 1e-3  # the dropout acted


@pytest.mark.parametrize("layout", ["permuted", "channels_last"])
def test_dropout_without_seed_draws_over_a_non_contiguous_input_as_laid_out(layout, monkeypatch):
    """A (B, H, W, C) view of NCHW data, or a channels_last 4-D input: the mask is F.dropout's over x as it
    is laid out (nn.Dropout's draw before PEFT's Linear), not over the row copy the flattening makes."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(26)
    if layout == "permuted":
        x = torch.randn(2, D_IN, 3, 4, generator=g, dtype=F64).permute(0, 2, 3, 1)
    else:
        x = torch.randn(2, 3, 4, D_IN, generator=g, dtype=F64).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    inputs = make_inputs(F64, (13, D_IN), seed=27)
    w, b, a, lb = (inputs[k] for k in ("weight", "bias", "lora_a", "lora_b"))
    torch.manual_seed(12)
    y = adapted_linear(x, w, b, a, lb, scale=1.5, dropout=0.3, backend="torch")
    torch.manual_seed(12)
    expected = F.linear(x, w, b) + 1.5 * (F.dropout(x, 0.3) @ a.t()) @ lb.t()
    assert rel(y, expected) < 1e-12


def test_a_gate_of_zero_draws_no_dropout_over_a_non_contiguous_input_under_vmap(monkeypatch):
    """The low-rank path is off: nothing random runs (vmap's default refuses random ops), as for a contiguous x."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # torch's own dropout, not a seed drawn for the kernels'
    inputs = make_inputs(F64, (13, D_IN), seed=28)
    w, b, a, lb = (inputs[k] for k in ("weight", "bias", "lora_a", "lora_b"))
    x = torch.randn(2, D_IN, 3, 4, dtype=F64).permute(0, 2, 3, 1)
    y = torch.func.vmap(lambda xi: adapted_linear(xi, w, b, a, lb, gate=0.0, dropout=0.3, backend="torch"))(x)
    assert rel(y, F.linear(x, w, b)) < 1e-12


# --------------------------------------------------------------------------- gradcheck

def _small(seed, *, bias=True, middle=True, rank_weights=True):
    g = torch.Generator().manual_seed(seed)
    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)
    return dict(x=r(2, 3, 6), weight=r(5, 6), bias=r(5) if bias else None, lora_a=r(3, 6),
                lora_b=r(5, 3), middle=r(3, 3) if middle else None,
                rank_weights=r(3) if rank_weights else None)


@pytest.mark.parametrize("gate", [1.0, 0.0], ids=["on", "off"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_all_inputs(gate, dropout, bias):
    t = _small(31, bias=bias)
    weight = t.pop("weight")
    names = [k for k, v in t.items() if v is not None]
    leaves = [t[k].clone().requires_grad_() for k in names]
    gate_t = torch.tensor(gate, dtype=F64, requires_grad=True)

    def fn(*args):
        kw = dict(zip(names, args[:-1]))
        return adapted_linear(kw["x"], weight, kw.get("bias"), kw["lora_a"], kw["lora_b"],
                              middle=kw["middle"], rank_weights=kw["rank_weights"], gate=args[-1],
                              scale=0.7, dropout=dropout, dropout_seed=99, backend="torch")

    assert torch.autograd.gradcheck(fn, (*leaves, gate_t), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_curlora():
    t = _small(32)
    weight = t["weight"]
    rows, cols = torch.tensor([4, 0, 4]), torch.tensor([5, 5, 1])
    x = t["x"].clone().requires_grad_()
    bias = t["bias"].clone().requires_grad_()
    middle = t["middle"].clone().requires_grad_()
    m = t["rank_weights"].clone().requires_grad_()
    gate = torch.tensor(1.0, dtype=F64, requires_grad=True)

    def fn(x, bias, middle, m, gate):
        return adapted_linear(x, weight, bias, None, None, middle=middle, rank_weights=m, gate=gate,
                              row_index=rows, col_index=cols, scale=1.3, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, bias, middle, m, gate), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------- NEAT

def _act_formulas():
    def sig(z):
        return 1.0 / (1.0 + torch.exp(-z))
    return {
        "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
        "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
        "silu": lambda z: z * sig(z),
        "tanh": lambda z: (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z)),
        "sigmoid": sig,
        "identity": lambda z: z,
    }


def test_every_activation_has_a_formula_here():
    assert set(ACTIVATIONS) <= set(_act_formulas()), \
        f"add a float64 formula for {sorted(set(ACTIVATIONS) - set(_act_formulas()))}"


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activation_grads_are_autograds_including_at_zero(act):
    """act'(z) as torch's autograd differentiates act, at exact zeros too (relu'(0) = 0, as torch's relu)."""
    from fastlora.kernels.activations import activation, activation_grad

    z = torch.tensor([-1.5, -0.0, 0.0, 0.3, 2.0], dtype=F64, requires_grad=True)
    (want,) = torch.autograd.grad(activation(act, z).sum(), z)
    torch.testing.assert_close(activation_grad(act, z.detach()), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_neat_projection_values_and_grads(act, dtype):
    g = torch.Generator().manual_seed(41)
    d_out, d_in, r = 23, 19, 4
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    a_n = torch.randn(r, d_out, generator=g, dtype=F64) / math.sqrt(d_out)
    dh = torch.randn(d_in, r, generator=g, dtype=F64)

    a_run = a_n.to(dtype).requires_grad_()
    h = neat_projection(w.to(dtype), a_run, act, backend="torch")
    (ga,) = torch.autograd.grad(h, [a_run], dh.to(dtype))

    a_ref = a_n.to(dtype).to(F64).requires_grad_()
    z = torch.einsum("oi,ro->ir", w.to(dtype).to(F64), a_ref)      # Z = W^T A_n^T, (d_in, r)
    h_ref = _act_formulas()[act](z)
    (ga_ref,) = torch.autograd.grad(h_ref, [a_ref], dh)

    assert h.shape == (d_in, r) and h.dtype == dtype
    assert ga.shape == (r, d_out) and ga.dtype == dtype
    assert rel(h, h_ref) < TOL[dtype]
    assert rel(ga, ga_ref) < TOL[dtype]
    assert rel(neat_projection_reference(w.to(dtype), a_n.to(dtype), act), h_ref) < TOL[dtype]


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_neat_projection_gradcheck(act):
    g = torch.Generator().manual_seed(42)
    w = torch.randn(7, 5, generator=g, dtype=F64)
    a_n = torch.randn(3, 7, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: neat_projection(w, a, act, backend="torch"), (a_n,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_neat_end_to_end_through_adapted_linear():
    """NEAT: y = x W^T + b + s (x H) B_n^T with H = act(W^T A_n^T), grads for A_n and B_n."""
    g = torch.Generator().manual_seed(43)
    d_out, d_in, r, s = 17, 13, 3, 1.0
    x = torch.randn(2, 5, d_in, generator=g, dtype=F64)
    w = torch.randn(d_out, d_in, generator=g, dtype=F64) / math.sqrt(d_in)
    bias = torch.randn(d_out, generator=g, dtype=F64)
    a_n = (torch.randn(r, d_out, generator=g, dtype=F64) / math.sqrt(d_out)).requires_grad_()
    b_n = torch.randn(d_out, r, generator=g, dtype=F64).requires_grad_()
    dy = torch.randn(2, 5, d_out, generator=g, dtype=F64)

    h = neat_projection(w, a_n, "gelu", backend="torch")
    y = adapted_linear(x, w, bias, h.t(), b_n, scale=s, backend="torch")
    got = torch.autograd.grad(y, [a_n, b_n], dy)

    a2, b2 = a_n.detach().clone().requires_grad_(), b_n.detach().clone().requires_grad_()
    h_ref = _act_formulas()["gelu"](torch.einsum("oi,ro->ir", w, a2))
    y_ref = torch.einsum("...i,oi->...o", x, w) + bias + s * torch.einsum(
        "...i,ir,or->...o", x, h_ref, b2)
    ref = torch.autograd.grad(y_ref, [a2, b2], dy)
    assert rel(y, y_ref) < 1e-10
    for got_g, ref_g in zip(got, ref):
        assert rel(got_g, ref_g) < 1e-10


# --------------------------------------------------------------------------- dtypes and autocast

def _fp32_adapter_setup(base_dtype, seed=51):
    inputs = make_inputs(F64, (2, 7, D_IN), middle=True, rank_weights=True, seed=seed)
    base = {k: inputs[k].to(base_dtype) for k in ("x", "weight", "bias")}
    factors = {k: inputs[k].float().requires_grad_() for k in ("lora_a", "lora_b", "middle",
                                                                "rank_weights")}
    return base, factors


def _fp64_formula_and_grads(base, factors, dy, scale):
    f = {k: v.detach().double().requires_grad_() for k, v in factors.items()}
    b = {k: v.detach().double() for k, v in base.items()}
    y, _ = formula(b["x"], b["weight"], b["bias"], f["lora_a"], f["lora_b"], f["middle"],
                   f["rank_weights"], scale=scale)
    grads = torch.autograd.grad(y, list(f.values()), dy.double())
    return y, dict(zip(f, grads))


def test_cpu_autocast_bf16():
    base, factors = _fp32_adapter_setup(torch.float32)
    x = base["x"].clone().requires_grad_()
    bias = base["bias"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = adapted_linear(x, base["weight"], bias, factors["lora_a"], factors["lora_b"],
                           middle=factors["middle"], rank_weights=factors["rank_weights"],
                           scale=0.8, backend="torch")
        expected_dtype = F.linear(x, base["weight"], bias).dtype
    assert y.dtype == torch.bfloat16 == expected_dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    names = list(factors)
    grads = torch.autograd.grad(y, [factors[k] for k in names] + [x, bias], dy.to(y.dtype))
    y_ref, ref = _fp64_formula_and_grads(base, factors, dy, 0.8)
    assert rel(y, y_ref) < 2e-2
    for k, gk in zip(names, grads):
        assert gk.dtype == torch.float32, f"grad of {k} is {gk.dtype}"
        assert rel(gk, ref[k]) < 2e-2, k
    assert grads[-2].dtype == torch.float32 and grads[-1].dtype == torch.float32


def test_bf16_base_with_fp32_adapters_without_autocast():
    """PEFT's mix: fp32 adapters over a bf16 base; compute in bf16, grads in fp32."""
    base, factors = _fp32_adapter_setup(torch.bfloat16)
    y = adapted_linear(base["x"], base["weight"], base["bias"], factors["lora_a"], factors["lora_b"],
                       middle=factors["middle"], rank_weights=factors["rank_weights"], scale=0.8,
                       backend="torch")
    assert y.dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(y, list(factors.values()), dy.to(y.dtype))
    y_ref, ref = _fp64_formula_and_grads(base, factors, dy.to(torch.bfloat16), 0.8)
    assert rel(y, y_ref) < 2e-2
    for k, gk in zip(factors, grads):
        assert gk.dtype == torch.float32 and rel(gk, ref[k]) < 2e-2, k


def test_fp64_base_with_fp32_adapters():
    """fp32 factors over an fp64 x/W: computed in fp64, factor grads returned in fp32."""
    base, factors = _fp32_adapter_setup(F64)
    y = adapted_linear(base["x"], base["weight"], base["bias"], factors["lora_a"], factors["lora_b"],
                       middle=factors["middle"], rank_weights=factors["rank_weights"], scale=0.8,
                       backend="torch")
    assert y.dtype == F64
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = torch.autograd.grad(y, list(factors.values()), dy)
    y_ref, ref = _fp64_formula_and_grads(base, factors, dy, 0.8)
    assert rel(y, y_ref) < 1e-10
    for k, gk in zip(factors, grads):
        assert gk.dtype == torch.float32 and rel(gk, ref[k]) < 1e-6, k


def test_fp64_under_cpu_autocast_stays_fp64_like_nn_linear():
    """Autocast does not touch float64 (as for nn.Linear); the adapter follows."""
    base, factors = _fp32_adapter_setup(F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = adapted_linear(base["x"], base["weight"], base["bias"], factors["lora_a"],
                           factors["lora_b"], scale=0.8, backend="torch")
        expected_dtype = F.linear(base["x"], base["weight"], base["bias"]).dtype
    assert y.dtype == expected_dtype == F64
    y_ref, _ = formula(base["x"], base["weight"], base["bias"], factors["lora_a"].double(),
                       factors["lora_b"].double(), scale=0.8)
    assert rel(y, y_ref) < 1e-10


def test_auto_backend_on_cpu_is_torch_path():
    inputs = make_inputs(torch.float32, (13, D_IN), seed=61)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"])
    assert torch.equal(adapted_linear(*args), adapted_linear(*args, backend="torch"))
    # and the reference agrees with the formula (it is the spec for the Triton path)
    ref, _ = formula(*(t.double() for t in args))
    assert rel(adapted_linear_reference(*args), ref) < 1e-5

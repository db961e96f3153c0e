"""Inputs at the edges of the op, on every plan: zero-sized problems (no rows, d_in = 0 or d_out = 0, as
nn.Linear allows: the Triton plans hand them to torch's ops, no launch), and gather indices made under
inference_mode serving a call autograd records."""
from __future__ import annotations

import pytest
import torch

from fastlora.kernels import adapted_linear, adapted_linear_reference

from utils import assert_close

PLANS = ["torch", "cublas", "triton", "onepass"]
SHAPES = {"no_rows": (0, 7, 5), "no_inputs": (6, 0, 5), "no_outputs": (6, 7, 0)}  # (N, d_in, d_out)


@pytest.fixture
def plan_ready(request, plan):
    if plan != "torch":
        request.getfixturevalue("triton_impl")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("plan", PLANS)
def test_a_zero_sized_problem_gives_the_reference_shapes_and_values(plan, shape, plan_ready):
    n, d_in, d_out = SHAPES[shape]
    gen = torch.Generator().manual_seed(3)
    tensors = {"x": torch.randn(n, d_in, generator=gen), "weight": torch.randn(d_out, d_in, generator=gen),
               "bias": torch.randn(d_out, generator=gen), "lora_a": torch.randn(3, d_in, generator=gen),
               "lora_b": torch.randn(d_out, 3, generator=gen)}
    for name in ("x", "bias", "lora_a", "lora_b"):
        tensors[name].requires_grad_()
    y = adapted_linear(*tensors.values(), scale=0.5, dropout=0.2, dropout_seed=4, backend=plan)
    ref = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in tensors.items()}
    y_ref = adapted_linear_reference(*ref.values(), scale=0.5)  # with a dimension of 0 dropout changes nothing
    assert y.shape == (n, d_out) and y.dtype == torch.float32
    dy = torch.randn(n, d_out, generator=gen)
    grads = torch.autograd.grad(y, [tensors[k] for k in ("x", "bias", "lora_a", "lora_b")], dy)
    grads_ref = torch.autograd.grad(y_ref, [ref[k] for k in ("x", "bias", "lora_a", "lora_b")], dy.double())
    if y.numel():
        assert_close(y, y_ref, 1e-6)
    for name, grad, want in zip(("x", "bias", "A", "B"), grads, grads_ref):
        assert grad.shape == want.shape, name
        if grad.numel():
            assert_close(grad, want, 1e-6, name, zero_ref_ok=True)


@pytest.mark.parametrize("plan", PLANS)
def test_gather_indices_made_under_inference_mode_serve_a_training_call(plan, plan_ready):
    """Indices built under torch.inference_mode (a model loaded for evaluation), then used where autograd
    records the call: the Function saves a normal copy (an inference tensor cannot be saved)."""
    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(6, 8, generator=gen), torch.randn(5, 8, generator=gen)
    b = torch.randn(5, 3, generator=gen, requires_grad=True)
    with torch.inference_mode():
        rows = torch.tensor([4, 0, 2])
    y = adapted_linear(x, weight, None, None, b, row_index=rows, scale=0.5, backend=plan)
    (grad,) = torch.autograd.grad(y.square().sum(), b)
    b64 = b.detach().double().requires_grad_()
    y_ref = adapted_linear_reference(x.double(), weight.double(), None, None, b64, row_index=rows.clone(), scale=0.5)
    (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), b64)
    assert_close(y, y_ref, 1e-6)
    assert_close(grad, grad_ref, 1e-6, "dB")


def _fp16_overflow_case():
    """fp16 x, W, A, B with scale 1/8 and an upstream gradient of 12000 (a loss scaler's size): the scaled
    gradients fit fp16 (max 65504), dy^T v and dy B unscaled would not."""
    g = torch.Generator().manual_seed(5)
    x, w, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((8, 16), (12, 16), (4, 16),
                                                                                      (12, 4)))
    dy = torch.full((8, 12), 12000.0, dtype=torch.float64)
    return x, w * 0.1, a, b, dy


def _exact_grads(x, w, a, b, dy, scale):
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    y = adapted_linear_reference(leaves[0], w, None, leaves[1], leaves[2], scale=scale)
    return torch.autograd.grad(y, leaves, dy)


def test_fp16_gradients_that_fit_do_not_overflow_on_the_torch_plan():
    """The recorded torch plan scaled after the product (addmm's alpha): dB = s (dy^T v) overflowed to inf in fp16
    where s dy^T v fits (PEFT and the Triton plans scale first)."""
    x, w, a, b, dy = _fp16_overflow_case()
    exact = _exact_grads(x, w, a, b, dy, 0.125)
    assert max(float(g.abs().max()) for g in exact) < 65504 < float((dy.t() @ (x @ a.t())).abs().max())
    leaves = [t.half().requires_grad_(True) for t in (x, a, b)]
    y = adapted_linear(leaves[0], w.half(), None, leaves[1], leaves[2], scale=0.125, backend="torch")
    grads = torch.autograd.grad(y, leaves, dy.half())
    for name, got, want in zip(("x", "a", "b"), grads, exact):
        assert bool(torch.isfinite(got).all()), name
        assert_close(got.double(), want, 2e-3, name)


def test_fp16_gradients_that_fit_do_not_overflow_in_the_torch_backward():
    """The Python backward (the torch plan's under torch.compile) forms s dy B and s g dy^T v with the scale on the
    r-wide operand first."""
    from fastlora.kernels.spec import GradsNeeded, LowRankTerm
    from fastlora.kernels.torch_impl import backward

    x, w, a, b, dy = _fp16_overflow_case()
    exact = _exact_grads(x, w, a, b, dy, 0.125)
    term = LowRankTerm(a.half(), b.half(), None, None, None, None, 0.125, 1.0, 0.0, None)
    grads = backward(dy.half(), x.half(), w.half(), term, None, GradsNeeded(True, False, True, True, False, False,
                                                                            False))
    for name, got, want in (("x", grads.x, exact[0]), ("a", grads.a, exact[1]), ("b", grads.b, exact[2])):
        assert bool(torch.isfinite(got).all()), name
        assert_close(got.double(), want, 2e-3, name)

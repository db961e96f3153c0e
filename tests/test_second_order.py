"""Second-order gradients (``create_graph=True``, e.g. a gradient penalty): the torch plan's recorded ops
differentiate twice and match float64 autograd of the reference formula; the kernels' backward is first
order, so differentiating the gradients it returned raises instead of silently dropping the low-rank term."""
from __future__ import annotations

import pytest
import torch

from fastlora.kernels import adapted_linear, adapted_linear_reference

from utils import assert_close

F64 = torch.float64


def _inputs(dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    make = dict(generator=gen, dtype=dtype)
    return {"x": torch.randn(6, 11, **make).requires_grad_(), "weight": torch.randn(9, 11, **make) / 11 ** 0.5,
            "bias": torch.randn(9, **make), "lora_a": torch.randn(3, 11, **make).requires_grad_(),
            "lora_b": torch.randn(9, 3, **make).requires_grad_()}


def _penalty_grads(op, t: dict, **kw) -> tuple:
    """d/d(x, A, B) of ||dL/dx||^2 with L = sum(y^2): a gradient of a gradient."""
    y = op(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scale=1.5, **kw)
    (gx,) = torch.autograd.grad(y.square().sum(), t["x"], create_graph=True)
    return torch.autograd.grad(gx.square().sum(), [t["x"], t["lora_a"], t["lora_b"]])


def test_the_torch_plan_differentiates_twice_as_float64_autograd():
    t = _inputs(torch.float32)
    got = _penalty_grads(adapted_linear, t, backend="torch")
    want = _penalty_grads(adapted_linear_reference, {k: v.detach().to(F64).requires_grad_(v.requires_grad)
                                                     for k, v in t.items()})
    for name, g, w in zip(("x", "A", "B"), got, want):
        assert_close(g, w, 1e-5, f"d/d{name} of the gradient penalty")


@pytest.mark.parametrize("plan", ["cublas", "triton", "onepass"])
def test_the_kernels_first_order_gradients_hold_and_a_second_order_raises(triton_impl, plan):
    t = _inputs(torch.float32, seed=1)
    y = adapted_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scale=1.5, backend=plan)
    (gx,) = torch.autograd.grad(y.square().sum(), t["x"], create_graph=True)
    ref = {k: v.detach().to(F64).requires_grad_(v.requires_grad) for k, v in t.items()}
    y_ref = adapted_linear_reference(ref["x"], ref["weight"], ref["bias"], ref["lora_a"], ref["lora_b"], scale=1.5)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), ref["x"])
    assert_close(gx, gx_ref, 1e-5, "first-order dx under create_graph=True")
    for inputs in ([t["x"], t["lora_a"], t["lora_b"]], [t["lora_a"]]):
        with pytest.raises(RuntimeError, match="differentiated again .* first order; run these layers on "
                                               "backend='torch'"):
            torch.autograd.grad(gx.square().sum(), inputs)
    constant_dy = torch.randn(6, 9, generator=torch.Generator().manual_seed(2))  # dy needs no grad here
    (gx,) = torch.autograd.grad(y, t["x"], constant_dy, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiated again"):
        torch.autograd.grad(gx.square().sum(), t["lora_b"])

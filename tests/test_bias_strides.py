"""Every plan takes a bias of any stride: contiguous, a [::2] slice, an expanded stride-0 view.

For each plan forced by ``backend=`` (the Triton plans under the interpreter without a GPU, bounds-checked
there: a kernel that reads the bias past its span fails by name), y and the gradients of x, bias, A and B
against the float64 reference on the same fp32-rounded inputs, ``||out - ref|| / ||ref|| < 1e-5``; the bias
gradient reaches the tensor the view was taken of (summed over the expanded entries).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastlora.kernels import PLANS, adapted_linear, adapted_linear_reference  # noqa: E402

import bounds_check  # noqa: E402
from utils import assert_close, poison_empty  # noqa: E402

F64 = torch.float64
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
N, D_IN, D_OUT, R = 37, 53, 29, 5
LAYOUTS = {
    "contiguous": ((D_OUT,), lambda leaf: leaf),
    "slice": ((2 * D_OUT,), lambda leaf: leaf[::2]),
    "expanded": ((1,), lambda leaf: leaf.expand(D_OUT)),
}


@pytest.fixture
def checked(monkeypatch):
    """Bounds checking when the Triton kernels run under the interpreter; torch.empty NaN-filled."""
    poison_empty(monkeypatch)
    if CUDA or bounds_check.unavailable() is not None:
        yield
        return
    with bounds_check.bounds_checked():
        yield


def run(plan, layout, dtype):
    """y and the gradients (x, bias leaf, A, B) of ``plan`` (None: the float64 reference) for dy fixed."""
    g = torch.Generator().manual_seed(11)
    shape, view = LAYOUTS[layout]

    def leaf(*size, s=1.0):
        value = (torch.randn(*size, generator=g, dtype=F64) * s).float()
        return value.to(DEVICE, dtype).requires_grad_()

    x, bias = leaf(N, D_IN), leaf(*shape)
    weight = leaf(D_OUT, D_IN, s=D_IN ** -0.5).detach()
    a, b = leaf(R, D_IN, s=D_IN ** -0.5), leaf(D_OUT, R, s=R ** -0.5)
    dy = torch.randn(N, D_OUT, generator=g, dtype=F64).float().to(DEVICE, dtype)
    if plan is None:
        y = adapted_linear_reference(x, weight, view(bias), a, b, scale=0.7)
    else:
        y = adapted_linear(x, weight, view(bias), a, b, scale=0.7, backend=plan)
    return (y, *torch.autograd.grad(y, (x, bias, a, b), dy))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("plan", PLANS)
def test_bias_of_any_stride(plan, layout, checked):
    if plan != "torch" and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton plans need a GPU or TRITON_INTERPRET=1")
    got, want = run(plan, layout, torch.float32), run(None, layout, F64)
    for name, out, ref in zip(("y", "dx", "dbias", "dA", "dB"), got, want):
        assert_close(out, ref, 1e-5, f"{plan} plan, {layout} bias: {name}")

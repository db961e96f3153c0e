"""Which dropout mask a call uses: the kernels' Philox draw wherever the Triton kernels can run, torch's
CPU generator on CPU otherwise (the torch plan alone runs there; its mask costs a few ops)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastlora.kernels import adapted_linear, adapted_linear_reference, dropout_mask
from fastlora.kernels.philox import philox_mask, seed_tensor

from utils import assert_close

F64 = torch.float64


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_cpu_mask_depends_on_the_seed_alone_and_keeps_one_minus_p(cpu_only):
    p = 0.3
    first = dropout_mask(128, 96, p, 1234, dtype=F64)
    assert torch.equal(first, dropout_mask(128, 96, p, seed_tensor(1234, "cpu"), dtype=F64))
    assert not torch.equal(first, dropout_mask(128, 96, p, 1235, dtype=F64))
    assert set(first.unique().tolist()) == {0.0, 1 / (1 - p)}
    keep_rate = float((first != 0).double().mean())
    assert abs(keep_rate - (1 - p)) < 4 * (p * (1 - p) / first.numel()) ** 0.5


def test_cpu_mask_costs_a_few_ops_where_philox_costs_a_hundred(cpu_only):
    counters = OpCounter(), OpCounter()
    with counters[0]:
        dropout_mask(8, 64, 0.05, 7)
    with counters[1]:
        philox_mask(8, 64, 0.05, seed_tensor(7, "cpu"))
    assert counters[0].ops <= 8 < 100 <= counters[1].ops


def test_where_the_kernels_run_every_plan_uses_their_philox_mask(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert torch.equal(dropout_mask(9, 22, 0.4, 5, dtype=F64), philox_mask(9, 22, 0.4, seed_tensor(5, "cpu"), F64))


@pytest.mark.parametrize("interpreted", ["0", "1"])
def test_torch_plan_applies_the_mask_it_documents(monkeypatch, interpreted):
    """Forward and every gradient of the torch plan equal the float64 formula with dropout_mask(...)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpreted)
    torch.manual_seed(0)
    n, d_in, d_out, r, p, seed = 13, 20, 11, 4, 0.25, 99
    x, weight = torch.randn(n, d_in, dtype=F64), torch.randn(d_out, d_in, dtype=F64)
    bias = torch.randn(d_out, dtype=F64)
    a, b = torch.randn(r, d_in, dtype=F64), torch.randn(d_out, r, dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = adapted_linear(leaves[0], weight, bias, leaves[1], leaves[2], scale=0.7, dropout=p, dropout_seed=seed,
                       backend="torch")
    refs = [t.clone().requires_grad_() for t in (x, a, b)]
    y_ref = adapted_linear_reference(refs[0], weight, bias, refs[1], refs[2], scale=0.7,
                                     dropout_mask=dropout_mask(n, d_in, p, seed, dtype=F64))
    dy = torch.randn(n, d_out, dtype=F64)
    assert_close(y, y_ref, 1e-12)
    for got, want, name in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, refs, dy),
                               ("x", "lora_a", "lora_b")):
        assert_close(got, want, 1e-12, name)


def test_on_a_gpu_the_mask_in_the_kernels_dtypes_is_the_mask_kernel():
    """On CUDA, in fp32/fp16/bf16, the torch plan's mask is one launch of the Triton mask kernel (not Philox's
    hundred integer torch ops over the whole mask); in float64, the reference's dtype, and on CPU (the
    interpreter's kernel is far slower than torch's ops) it is torch's Philox."""
    from fastlora.kernels.eligibility import triton_backend
    from fastlora.kernels.masks import mask_kernel_draws

    cuda = torch.device("cuda", 0)
    expected = triton_backend() is not None
    assert all(mask_kernel_draws(cuda, dtype) is expected for dtype in (torch.float32, torch.float16, torch.bfloat16))
    assert not mask_kernel_draws(cuda, F64) and not mask_kernel_draws(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_mask_kernel_writes_the_philox_mask_in_the_requested_dtype(dtype):
    from fastlora.kernels.eligibility import triton_ineligibility
    if triton_ineligibility(torch.device("cpu"), dtype) is not None:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 set before triton is imported")
    from fastlora.kernels.triton.dropout import dropout_mask as kernel_mask

    got = kernel_mask(9, 22, 0.4, 5, "cpu", dtype)
    assert got.dtype == dtype and torch.equal(got, philox_mask(9, 22, 0.4, seed_tensor(5, "cpu"), dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_mask_in_each_dtype_is_the_float64_mask(cpu_only, dtype):
    """The same kept entries in every dtype, each scaled by 1 / (1 - p) rounded to the dtype."""
    p = 0.35
    want = dropout_mask(40, 33, p, 21, dtype=F64)
    got = dropout_mask(40, 33, p, 21, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_cpu_mask_ignores_torchs_default_dtype(cpu_only, default):
    """torch.set_default_dtype changes neither the keep pattern (fp32 uniforms) nor the mask's dtype and
    value; a seeded fp32 call keeps working (float64 mask against fp32 factors failed in the GEMM)."""
    p = 0.3
    want = dropout_mask(24, 19, p, 5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(8)
    x, weight, a, b = (torch.randn(*shape, generator=gen) for shape in ((24, 19), (7, 19), (3, 19), (7, 3)))
    expected = adapted_linear(x, weight, None, a, b, dropout=p, dropout_seed=5, backend="torch")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        got = dropout_mask(24, 19, p, 5, dtype=torch.float32)
        y = adapted_linear(x, weight, None, a, b, dropout=p, dropout_seed=5, backend="torch")
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert set(got.unique().tolist()) == {0.0, float(torch.tensor(1 / (1 - p), dtype=torch.float32))}
    assert y.dtype == torch.float32 and torch.equal(y, expected)


@pytest.mark.parametrize("interpreted", ["0", "1"])
def test_dropout_rate_zero_keeps_everything_and_rates_outside_0_1_are_refused(monkeypatch, interpreted):
    monkeypatch.setenv("TRITON_INTERPRET", interpreted)
    assert torch.equal(dropout_mask(6, 10, 0.0, 3), torch.ones(6, 10))
    for p in (-0.1, 1.0, 1.5, "0.1", None):
        with pytest.raises(ValueError, match=rf"p must be a number in \[0, 1\), got {p!r}"):
            dropout_mask(6, 10, p, 3)


@pytest.mark.parametrize("arguments, message", [
    ((-1, 10, 0.1, 3), "n must be an int >= 0, got -1"), ((6, 2.0, 0.1, 3), "d_in must be an int >= 0, got 2.0"),
    ((6, 10, 0.1, torch.tensor([1.5])), r"a seed tensor must hold one int64 element, got torch.float32 of shape "
                                        r"\(1,\)"),
    ((6, 10, 0.1, torch.tensor([1, 2])), r"one int64 element, got torch.int64 of shape \(2,\)")])
def test_dropout_mask_refuses_bad_arguments_naming_them(arguments, message):
    with pytest.raises(ValueError, match=message):
        dropout_mask(*arguments)
    with pytest.raises(ValueError, match="dtype must be a floating dtype, got torch.int64"):
        dropout_mask(6, 10, 0.1, 3, dtype=torch.int64)  # was a float32 mask, silently


def test_the_kernels_draw_on_every_device_but_a_cpu_without_the_interpreter(monkeypatch):
    from fastlora.kernels.masks import kernels_draw

    for interpreted, on_cpu in (("0", False), ("1", True)):
        monkeypatch.setenv("TRITON_INTERPRET", interpreted)
        assert kernels_draw(torch.device("cpu")) is on_cpu
        assert kernels_draw(torch.device("cuda", 0)) is True

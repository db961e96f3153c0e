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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_where_the_kernels_run_the_mask_in_their_dtypes_is_one_kernel_launch(monkeypatch, dtype):
    """In fp32/fp16/bf16 the torch plan's mask comes from the Triton mask kernel (one launch, not Philox's
    hundred integer ops over the whole mask); in float64, the reference's dtype, from torch's ops. Both are
    the Philox mask bit for bit."""
    from fastlora.kernels.dispatch import triton_ineligibility
    if triton_ineligibility(torch.device("cpu"), dtype) is not None:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 set before triton is imported")
    from fastlora.kernels.triton import dropout as kernel_dropout

    launches = []
    kernel_mask = kernel_dropout.dropout_mask
    monkeypatch.setattr(kernel_dropout, "dropout_mask", lambda *a, **k: launches.append(a) or kernel_mask(*a, **k))
    got = dropout_mask(9, 22, 0.4, 5, dtype=dtype)
    assert len(launches) == 1 and got.dtype == dtype
    assert torch.equal(got, philox_mask(9, 22, 0.4, seed_tensor(5, "cpu"), dtype))
    reference = dropout_mask(9, 22, 0.4, 5, dtype=F64)
    assert len(launches) == 1 and torch.equal(reference, philox_mask(9, 22, 0.4, seed_tensor(5, "cpu"), F64))

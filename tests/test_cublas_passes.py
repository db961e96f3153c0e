"""The cublas plan adds the low-rank term without a pass over the output after the base GEMM: the output
is created holding the low-rank term (and the bias), then the GEMM accumulates into it (``addmm_``,
beta = 1). Values match the float64 formula; the structure is read from the aten operators the forward
and the backward dispatch (Triton launches are not operators: the expand kernel shows as the empty
output it fills).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

pytest.importorskip("triton")

from fastlora.kernels import adapted_linear, adapted_linear_reference, dropout_mask  # noqa: E402

from utils import assert_close, poison_empty  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64


@pytest.fixture(autouse=True)
def kernels_run_here(triton_impl, monkeypatch):
    poison_empty(monkeypatch)
    # the interpreter runs a kernel as torch operators on its arguments: not the plan's own operators
    from triton.runtime import interpreter, jit

    for launcher in (interpreter.InterpretedFunction, jit.JITFunction):
        monkeypatch.setattr(launcher, "run", _unrecorded(launcher.run))


def _unrecorded(run):
    def launch(*args, **kwargs):
        with _disable_current_modes():
            return run(*args, **kwargs)
    return launch


class OutputWrites(TorchDispatchMode):
    """Records (operator, args) of every aten operator the block dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _storage(t) -> int:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else -1


def _touching(calls, tensor: torch.Tensor) -> list:
    """The calls with an argument in ``tensor``'s storage (reads or in-place writes of it), but for the
    NaN fill of ``poison_empty``."""
    return [(func, args) for func, args, _ in calls
            if func != torch.ops.aten.fill_.Scalar and any(_storage(a) == _storage(tensor) for a in args)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
def test_the_base_gemms_accumulate_into_the_low_rank_term(bias, dropout):
    gen = torch.Generator().manual_seed(3)
    n, d_in, d_out, r = 21, 34, 27, 6
    x = torch.randn(n, d_in, generator=gen, dtype=F64)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=F64) / d_in ** 0.5
    b = torch.randn(d_out, generator=gen, dtype=F64) if bias else None
    a = torch.randn(r, d_in, generator=gen, dtype=F64) / d_in ** 0.5
    up = torch.randn(d_out, r, generator=gen, dtype=F64)
    dy = torch.randn(n, d_out, generator=gen, dtype=F64)
    inputs = [t.to(DEVICE, torch.float32) if t is not None else None for t in (x, weight, b, a, up)]
    xs, ws, bs, a_s, ups = inputs
    for t in (xs, a_s, ups):
        t.requires_grad_()

    with OutputWrites() as forward:
        y = adapted_linear(xs, ws, bs, a_s, ups, scale=0.8, dropout=dropout, dropout_seed=17, backend="cublas")
    with OutputWrites() as backward:
        grads = torch.autograd.grad(y, (xs, a_s, ups), dy.to(DEVICE, torch.float32))

    ref_inputs = [t.to(DEVICE).requires_grad_() if i in (0, 3, 4) else (t.to(DEVICE) if t is not None else None)
                  for i, t in enumerate((x, weight, b, a, up))]
    mask = dropout_mask(n, d_in, dropout, 17, DEVICE, F64) if dropout else None
    ref = adapted_linear_reference(*ref_inputs, scale=0.8, dropout_mask=mask)
    ref_grads = torch.autograd.grad(ref, (ref_inputs[0], ref_inputs[3], ref_inputs[4]), dy.to(DEVICE))
    assert_close(y, ref, 1e-5, "y")
    for name, got, want in zip(("dx", "dA", "dB"), grads, ref_grads):
        assert_close(got, want, 1e-5, name)

    for calls, out, mat1, mat2 in ((forward.calls, y, xs, ws), (backward.calls, grads[0], None, ws)):
        touching = _touching(calls, out)
        last_func, last_args = touching[-1]
        assert last_func == torch.ops.aten.addmm_.default, touching
        assert last_args[2].shape == mat2.t().shape if mat1 is not None else last_args[2].shape == mat2.shape
        assert mat1 is None or last_args[1] is mat1  # the base GEMM of x W^T, or of dy W, is the last write
        # nothing runs on the output after it, and before it only the op that created the low-rank term
        assert len(touching) <= 2, touching

"""Factors in another float dtype than the input on the cublas plan (PEFT's fp32 adapters over a
half-precision model): the kernels read them as they are, no cast of a factor or of its gradient
is recorded by autograd, and values and every gradient match the float64 formula, with the
gradients in the factors' own dtype; every method's layer likewise. Without a GPU the kernels run
under the Triton interpreter (fp16 compute there: its bf16 arithmetic is wrong).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from benchmarks import check_correctness  # noqa: E402
from benchmarks.bench_methods import METHODS  # noqa: E402
from fastlora.kernels import adapted_linear, adapted_linear_reference, dropout_mask  # noqa: E402

from utils import assert_close, poison_empty  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
HALF = torch.bfloat16 if CUDA else torch.float16
F64 = torch.float64
N, D_IN, D_OUT, R = 23, 37, 19, 5


@pytest.fixture(autouse=True)
def kernels_run_here(triton_impl, monkeypatch):
    poison_empty(monkeypatch)


def _inputs(compute, factor, *, middle=False, rank_weights=False, gathered=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * s

    base = {"x": rnd(N, D_IN).to(compute), "weight": rnd(D_OUT, D_IN, s=D_IN ** -0.5).to(compute),
            "bias": rnd(D_OUT).to(compute)}
    factors = {"lora_a": rnd(R, D_IN, s=D_IN ** -0.5).to(factor)}
    if gathered:
        base["col_index"] = torch.randperm(D_IN, generator=gen)[:R]
    else:
        factors["lora_b"] = rnd(D_OUT, R, s=0.5).to(factor)
    if middle:
        factors["middle"] = (torch.eye(R, dtype=F64) + rnd(R, R, s=0.3)).to(factor)
    if rank_weights:
        factors["rank_weights"] = (1 + rnd(R, s=0.3)).to(factor)
    return ({k: v.to(DEVICE) for k, v in base.items()},
            {k: v.to(DEVICE).requires_grad_() for k, v in factors.items()})


def _reference(base, factors, dy, dropout, seed, compute):
    """y and the factor gradients of the float64 formula on the compute-dtype-rounded factors (what
    the kernels read once cast in registers)."""
    leaves = {k: v.detach().to(compute).double().requires_grad_() for k, v in factors.items()}
    weight = base["weight"].double()
    mask = dropout_mask(N, D_IN, dropout, seed, DEVICE, F64) if dropout else None
    lora_b = leaves.get("lora_b")
    if lora_b is None:
        lora_b = weight[:, base["col_index"]]
    y = adapted_linear_reference(base["x"].double(), weight, base["bias"].double(), leaves["lora_a"], lora_b,
                                 middle=leaves.get("middle"), rank_weights=leaves.get("rank_weights"), scale=0.7,
                                 dropout_mask=mask)
    return y, dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy.double())))


CASES = {"plain": {}, "middle_rank_weights": dict(middle=True, rank_weights=True),
         "dropout": dict(dropout=0.3), "gathered_b": dict(gathered=True)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtypes", [(HALF, torch.float32), (torch.float32, HALF)], ids=["fp32_factors", "half_factors"])
def test_factors_keep_their_dtype_on_the_cublas_plan(case, dtypes):
    compute, factor = dtypes
    options = dict(CASES[case])
    dropout = options.pop("dropout", 0.0)
    base, factors = _inputs(compute, factor, **options)
    x = base["x"].clone().requires_grad_()
    y = adapted_linear(x, base["weight"], base["bias"], factors["lora_a"], factors.get("lora_b"),
                       middle=factors.get("middle"), rank_weights=factors.get("rank_weights"),
                       col_index=base.get("col_index"), scale=0.7, dropout=dropout, dropout_seed=11, backend="cublas")
    assert y.dtype == compute
    # every factor is an input of the op itself: no cast node between it and the op
    fed = {id(node.variable) for node, _ in y.grad_fn.next_functions if hasattr(node, "variable")}
    assert all(id(f) in fed for f in factors.values())
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64).to(DEVICE)
    grads = torch.autograd.grad(y, list(factors.values()), dy.to(compute))
    y_ref, ref = _reference(base, factors, dy, dropout, 11, compute)
    tol = 1e-2 if torch.float16 in dtypes or torch.bfloat16 in dtypes else 1e-5
    assert_close(y, y_ref, tol)
    for (name, grad), factor_tensor in zip(ref.items(), factors.values()):
        got = grads[list(factors).index(name)]
        assert got.dtype == factor_tensor.dtype, name
        assert_close(got, grad, tol, name)


def test_autocast_passes_fp32_factors_through_on_the_cublas_plan():
    """fp32 model and adapters under autocast: x and W are cast, the factors are read as they are."""
    base, factors = _inputs(torch.float32, torch.float32, middle=True)
    with torch.autocast(DEVICE.type, dtype=HALF):
        y = adapted_linear(base["x"], base["weight"], base["bias"], factors["lora_a"], factors["lora_b"],
                           middle=factors["middle"], scale=0.7, backend="cublas")
    assert y.dtype == HALF
    fed = {id(node.variable) for node, _ in y.grad_fn.next_functions if hasattr(node, "variable")}
    assert all(id(f) in fed for f in factors.values())
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=F64).to(DEVICE)
    grads = torch.autograd.grad(y, list(factors.values()), dy.to(HALF))
    rounded = {k: v.to(HALF) for k, v in base.items()}
    y_ref, ref = _reference(rounded, factors, dy, 0.0, 0, HALF)
    assert_close(y, y_ref, 1e-2)
    for grad, (name, want) in zip(grads, ref.items()):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert_close(grad, want, 1e-2, name)


def test_an_empty_batch_gives_zero_gradients_in_the_factors_dtype():
    base, factors = _inputs(HALF, torch.float32, middle=True)
    x = base["x"][:0].clone().requires_grad_()
    y = adapted_linear(x, base["weight"], base["bias"], factors["lora_a"], factors["lora_b"],
                       middle=factors["middle"], scale=0.7, backend="cublas")
    assert y.shape == (0, D_OUT) and y.dtype == HALF
    grads = torch.autograd.grad(y, list(factors.values()), torch.empty_like(y))
    for grad, factor in zip(grads, factors.values()):
        assert grad.dtype == torch.float32 and grad.shape == factor.shape and not grad.any()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_layer_on_the_cublas_plan_with_fp32_factors(method):
    """Each method's AdapterLinear as built (fp32 factors over a half-precision W) forced onto the cublas plan,
    which ``auto`` runs on a GPU: output, input gradient and every trainable parameter's gradient against
    ``reference_forward`` of a float64 copy (gpu_check's layer item)."""
    result = check_correctness.layer_check(method, check_correctness.QUICK_SHAPES["base"], HALF, DEVICE, "cublas")
    assert result["pass"], result


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_expand_runs_in_the_outputs_dtype_whatever_the_factors(dropout):
    """drop(s * dt A) with fp32 A written in half precision gives, bit for bit, what A cast to the half
    dtype first gives: the product runs in the compute dtype (as addmm and the other kernels run it), not in
    fp32 (IEEE fp32 dots, without tensor cores)."""
    from fastlora.kernels.philox import seed_tensor
    from fastlora.kernels.triton.fused_linear import fused_linear

    gen = torch.Generator().manual_seed(5)
    dt = torch.randn(37, 8, generator=gen).to(DEVICE)
    a = (torch.randn(8, 72, generator=gen) / 3).to(DEVICE)
    seed = seed_tensor(11, DEVICE)
    got = fused_linear(None, None, None, dt, a, v_scale=1.5, p=dropout, seed=seed, out_dtype=HALF)
    cast_first = fused_linear(None, None, None, dt, a.to(HALF), v_scale=1.5, p=dropout, seed=seed, out_dtype=HALF)
    assert got.dtype == HALF and torch.equal(got, cast_first)
    assert got.abs().sum() > 0

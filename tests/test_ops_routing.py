"""adapted_linear's routing: a named Triton plan runs its own implementation (not the recorded torch ops),
without grad its forward alone, auto's plan key describes the call, and a dropout seed given as a tensor is
checked and used as the int."""
import pytest
import torch

from fastlora.kernels import adapted_linear, adapted_linear_reference, dispatch, ops, plans
from fastlora.kernels.eligibility import triton_backend, triton_interpreter_on

TRITON_RUNS = triton_backend() is not None and (torch.cuda.is_available() or triton_interpreter_on())
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _call_tensors(n=6, d_in=10, d_out=7, r=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE).requires_grad_(grad)

    return make(n, d_in, grad=True), make(d_out, d_in), make(d_out), make(r, d_in, grad=True), make(d_out, r, grad=True)


@pytest.mark.skipif(not TRITON_RUNS, reason="the Triton plans need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("plan", ["cublas", "triton", "onepass"])
def test_a_named_triton_plan_runs_its_own_forward_and_backward(plan, monkeypatch):
    implementation, ran = dispatch.plan_implementation(plan), []
    for step in ("forward", "backward"):
        def recording(*args, _step=step, _original=getattr(implementation, step), **kwargs):
            ran.append(_step)
            return _original(*args, **kwargs)
        monkeypatch.setattr(implementation, step, recording)
    x, w, b, a, bb = _call_tensors()
    adapted_linear(x, w, b, a, bb, scale=0.5, backend=plan).sum().backward()
    assert ran == ["forward", "backward"]


@pytest.mark.skipif(not TRITON_RUNS, reason="the Triton plans need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("plan", ["cublas", "triton"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_grad_the_forward_runs_alone_and_gives_the_recorded_output(plan, mode, monkeypatch):
    """Under no_grad / inference_mode the Function's forward primitive runs alone (no context, nothing saved):
    the same output as the recording call, for x of three dimensions, a tensor gate and dropout."""
    x, w, b, a, bb = _call_tensors()
    x = x.detach().reshape(2, 3, -1)
    kwargs = dict(gate=torch.tensor(0.7, device=DEVICE), scale=0.5, dropout=0.2, dropout_seed=5, backend=plan)
    recorded = adapted_linear(x, w, b, a, bb, **kwargs)
    assert recorded.requires_grad
    alone = []
    original = ops.forward_without_grad
    monkeypatch.setattr(ops, "forward_without_grad", lambda *args: alone.append(1) or original(*args))
    with mode():
        out = adapted_linear(x, w, b, a, bb, **kwargs)
    assert alone == [1] and not out.requires_grad
    assert out.shape == (2, 3, 7) and torch.equal(out, recorded.detach())


@pytest.mark.parametrize("gathered", [False, True, "rows only"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_autos_plan_key_describes_the_call(gathered, dropout, monkeypatch):
    keys = []

    def choose(key, section, run, *, measurable, **kwargs):
        keys.append(key)
        assert measurable is False and run is None  # nothing is timed unless tuning is on
        return "torch"

    monkeypatch.delenv(plans.TUNE_ENV_VAR, raising=False)
    monkeypatch.setattr(plans, "choose", choose)
    monkeypatch.setattr(dispatch, "select_plan", lambda backend, x, dtype, choose_plan: choose_plan())
    x, w, b, a, bb = _call_tensors(n=5, d_in=10, d_out=7, r=3)
    factors = dict(lora_a=None, lora_b=None, row_index=torch.tensor([0, 4, 6], device=DEVICE),
                   col_index=torch.tensor([1, 2, 9], device=DEVICE)) if gathered else dict(lora_a=a, lora_b=bb)
    if gathered == "rows only":
        factors.update(lora_b=bb, col_index=None)
    adapted_linear(x.detach(), w, b, dropout=dropout, dropout_seed=3, **factors)
    (key,) = keys
    assert (key.token_bucket, key.d_in, key.d_out, key.rank, key.dropout, key.gathered) == \
        (8, 10, 7, 3, dropout > 0, bool(gathered))
    assert key.device == str(x.device) and key.dtype == "float32"


@pytest.mark.parametrize("seed, problem", [(torch.tensor([7], dtype=torch.int32), "int32"),
                                           (torch.tensor([7, 8]), "shape"), (torch.zeros(0, dtype=torch.long), "empty"),
                                           (torch.tensor([7], device="meta"), "meta")])
def test_a_dropout_seed_tensor_must_be_one_int64_element_on_xs_device(seed, problem):
    x, w, b, a, bb = _call_tensors()
    with pytest.raises(ValueError, match="dropout_seed tensor must be one int64 element"):
        adapted_linear(x, w, b, a, bb, dropout=0.3, dropout_seed=seed, backend="torch")


def test_a_dropout_seed_tensor_draws_the_ints_mask():
    x, w, b, a, bb = _call_tensors()
    as_int = adapted_linear(x, w, b, a, bb, dropout=0.3, dropout_seed=7, backend="torch")
    as_tensor = adapted_linear(x, w, b, a, bb, dropout=0.3, dropout_seed=torch.tensor([7], device=DEVICE),
                               backend="torch")
    no_dropout = adapted_linear(x, w, b, a, bb, backend="torch")
    assert torch.equal(as_int, as_tensor) and not torch.equal(as_int, no_dropout)



@pytest.mark.parametrize("gathered, dropout, bias", [(False, False, False), (True, True, True)])
def test_a_timing_step_runs_forward_and_backward_of_the_keys_call(gathered, dropout, bias, monkeypatch):
    """What ``fastlora.tune`` times for a shape: a call with the key's features, gradients included."""
    key = plans.PlanKey(DEVICE, "float32", 8, 10, 7, 3, dropout, gathered)
    run, calls, real = ops._timing_step(key, torch.device(DEVICE), torch.float32, bias), [], ops.adapted_linear

    def recording(x, weight, b, **kwargs):
        calls.append((x, weight, b, kwargs))
        return real(x, weight, b, **kwargs)

    monkeypatch.setattr(ops, "adapted_linear", recording)
    run("torch")
    (x, weight, b, kwargs) = calls[0]
    assert x.shape == (8, 10) and weight.shape == (7, 10) and (b is not None) is bias
    assert kwargs["dropout"] == (0.1 if dropout else 0.0) and kwargs["backend"] == "torch"
    trained = ["middle"] if gathered else ["lora_a", "lora_b"]
    assert (kwargs.get("row_index") is not None, kwargs.get("col_index") is not None) == (gathered, gathered)
    assert x.grad is not None and all(kwargs[name].grad is not None for name in trained)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_call_without_dropout_draws_no_randomness(backend):
    """The user's random stream is the same after a no-dropout call as before it."""
    x, w, b, a, bb = _call_tensors()
    torch.manual_seed(5)
    adapted_linear(x, w, b, a, bb, dropout=0.0, backend=backend).sum().backward()
    after_call = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after_call, torch.rand(4))


@pytest.mark.skipif(not TRITON_RUNS, reason="the Triton plans need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("plan", ["cublas", "triton"])
def test_a_one_dimensional_input_is_one_row_as_in_nn_linear(plan):
    """x (d_in,) through the Function: y (d_out,) and dx (d_in,), the values of the float64 reference."""
    x, w, b, a, bb = _call_tensors()
    row = x[2].detach().double().requires_grad_(True)
    y = adapted_linear(row.float(), w, b, a, bb, scale=0.5, backend=plan)
    want = adapted_linear_reference(row, w.double(), b.double(), a.detach().double(), bb.detach().double(), scale=0.5)
    assert y.shape == (7,) and torch.allclose(y.double(), want, atol=1e-5)
    (dx,) = torch.autograd.grad(y.double().square().sum(), row)
    (want_dx,) = torch.autograd.grad(want.square().sum(), row)
    assert dx.shape == (10,) and torch.allclose(dx, want_dx, atol=1e-4)

"""pytest-benchmark of every method's AdapterLinear (backend "auto", benchmarks/bench_methods.py):
forward in eval mode, forward + backward in train mode."""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_adapted_linear import case_tensors
from benchmarks.bench_methods import METHODS, method_layer
from benchmarks.conftest import CASES, DEVICE, DTYPE, case_id
from benchmarks.timing import forward_backward, forward_only


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def case(request) -> dict:
    return {"id": case_id(request.param), "r": request.param[3], **case_tensors(*request.param, DEVICE, DTYPE)}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method", METHODS)
def test_method(timed, case, method, mode):
    layer = method_layer(method, case["weight"], case["r"], "auto", torch.Generator(device=DEVICE).manual_seed(1))
    layer.train(mode == "fwd_bwd")
    params = [case["x"], *(p for p in layer.parameters() if p.requires_grad)]
    forward = lambda: layer(case["x"])  # noqa: E731
    fn = forward_only(forward) if mode == "fwd" else forward_backward(forward, params, case["dy"])
    timed(fn, f"{case['id']} method {mode}", method=method, mode=mode)

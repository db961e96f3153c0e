"""pytest-benchmark of the raw variants of benchmarks/bench_adapted_linear.py: base, every
plan, auto (gate off, half the ranks pruned, dropout), PEFT; forward and forward + backward."""
from __future__ import annotations

import pytest

from benchmarks.bench_adapted_linear import case_tensors, raw_variants, variant_names
from benchmarks.conftest import CASES, DEVICE, DTYPE, PLANS, case_id
from benchmarks.timing import forward_backward, forward_only


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def case(request) -> dict:
    t = case_tensors(*request.param, DEVICE, DTYPE)
    return {"id": case_id(request.param), "dy": t["dy"],
            "variants": raw_variants(t["x"], t["weight"], t["a"], t["b"], PLANS)}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("variant", variant_names(PLANS))
def test_variant(timed, case, variant, mode):
    forward, params = case["variants"][variant]
    fn = forward_only(forward) if mode == "fwd" else forward_backward(forward, params, case["dy"])
    timed(fn, f"{case['id']} {mode}", variant=variant, mode=mode)

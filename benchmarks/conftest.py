"""pytest-benchmark suites of one adapted Linear and of a whole model's training step
(benchmarks/test_bench_*.py).

    python -m pytest benchmarks --benchmark-only [--benchmark-save=NAME] [--benchmark-compare]

CUDA: the benchmark's shapes (N = 8192; 4096 -> 4096 and 4096 -> 11008; r = 16 and 64) in
bf16, base, every plan, auto, PEFT and every method; CPU: one small float32 case, torch plan
(a check that the suites run); the model step: benchmarks/test_bench_model.py. The timed call
synchronizes the GPU. Not collected by the default ``python -m pytest`` (testpaths = tests);
skipped when pytest-benchmark is missing.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from benchmarks.bench_adapted_linear import DTYPES, FULL_RANKS, FULL_SHAPES, device_plans, pick_device

DEVICE = pick_device(None)
DTYPE = DTYPES[DEVICE.type]
PLANS = device_plans(DEVICE)
CPU_CASES = [(256, 128, 192, 8)]
CASES = [(n, d_in, d_out, r) for n, d_in, d_out in FULL_SHAPES for r in FULL_RANKS] if DEVICE.type == "cuda" \
    else CPU_CASES


def pytest_collection_modifyitems(config, items):
    """Without the pytest-benchmark plugin every benchmark test is skipped (not an error)."""
    if not config.pluginmanager.hasplugin("benchmark"):
        skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install -e .[bench])")
        for item in items:
            item.add_marker(skip)


def case_id(case: tuple) -> str:
    n, d_in, d_out, r = case
    return f"N{n}-{d_in}x{d_out}-r{r}"


@pytest.fixture
def timed(benchmark) -> Callable:
    """timed(fn, group, **info): pytest-benchmark of ``fn`` after one warm-up call (autotuning,
    plan timing), with a device synchronisation inside the timed call on GPU."""
    def run(fn: Callable[[], object], group: str, **info):
        def call():
            fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        call()
        benchmark.group = group
        benchmark.extra_info.update({"device": str(DEVICE), "dtype": str(DTYPE).replace("torch.", ""), **info})
        return benchmark(call)
    return run

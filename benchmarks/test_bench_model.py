"""pytest-benchmark of one whole-model training step (benchmarks/bench_model.py): each model and variant
of benchmarks/model_setups.py, forward under bf16 autocast, backward and AdamW (CPU: the quick 2-layer
models, a check that the suite runs)."""
from __future__ import annotations

import pytest

from benchmarks.conftest import DEVICE
from benchmarks.model_setups import DROPOUT, MODELS, VARIANTS, adapt, build_model, make_batch
from benchmarks.train_step import make_step, release

QUICK = DEVICE.type != "cuda"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_step(timed, model_name, variant):
    pytest.importorskip("peft")
    spec = MODELS[model_name]
    model = adapt(build_model(spec, QUICK, DEVICE), variant, spec, DROPOUT)
    step = make_step(model, make_batch(spec, model, QUICK, DEVICE), DEVICE)
    timed(step, f"{model_name} step", model=model_name, variant=variant)
    del model, step
    release(DEVICE)

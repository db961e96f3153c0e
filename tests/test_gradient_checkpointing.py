"""Activation checkpointing recomputes the same forward: adapter gradients and the training
trajectory match the run without it, dropout included (the mask is drawn from a seed that
the recompute draws again from the restored RNG state), for every method and backend.

Models and the 3-step SGD loop (training hooks attached) come from tests/distributed_worker.py.
"""
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastlora import AdapterLinear

import distributed_worker as models
from utils import rel

# the torch backend runs the float64 models; the Triton one float32 (its dtypes), where the
# same deterministic kernels in the same order still give the same values
DTYPES = {"torch": torch.float64, "triton": torch.float32}
TOLERANCE = {"torch": 1e-12, "triton": 1e-6}


class Checkpointed(nn.Module):
    """Calls ``model`` under torch.utils.checkpoint (activations recomputed in the backward)."""

    def __init__(self, model: nn.Module, use_reentrant: bool):
        super().__init__()
        self.model = model
        self.use_reentrant = use_reentrant

    def forward(self, x):
        return checkpoint(self.model, x, use_reentrant=self.use_reentrant)


def _with_dropout_and_backend(model: nn.Module, backend: str) -> nn.Module:
    for layer in model:
        if isinstance(layer, AdapterLinear):
            layer.config = dataclasses.replace(layer.config, dropout=0.3, backend=backend)
    return model


def _run(method: str, backend: str, use_reentrant=None) -> dict:
    torch.manual_seed(7)  # the dropout seeds drawn in the forward
    model = _with_dropout_and_backend(models.build_model(method, DTYPES[backend]), backend)
    x, target = models.full_batch(DTYPES[backend])
    x.requires_grad_(True)  # the reentrant variant needs an input that requires grad
    wrapped = model if use_reentrant is None else Checkpointed(model, use_reentrant)
    return models.train(model, wrapped, x, target)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", sorted(models.METHODS))
def test_checkpointed_training_matches_plain_training(method, backend, use_reentrant):
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the models run on the CPU: the Triton backend needs the interpreter there")
    plain = _run(method, backend)
    recomputed = _run(method, backend, use_reentrant)
    for step, (grads, ref) in enumerate(zip(recomputed["grads"], plain["grads"])):
        for name, value in ref.items():
            err = rel(grads[name], value, zero_ref_ok=True)
            assert err < TOLERANCE[backend], f"step {step + 1}, grad of {name}"
    for name, value in plain["params"].items():
        assert rel(recomputed["params"][name], value, zero_ref_ok=True) < TOLERANCE[backend], name

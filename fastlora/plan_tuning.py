"""Opt-in measurement of the execution plans for a model's layer shapes.

``backend="auto"`` runs a fixed default plan on CUDA and never times anything on first use.
``tune`` runs one forward pass of the model on an example batch with timing switched on: each
adapted layer shape (tokens rounded up to a power of two, d_in, d_out, r, dtype, dropout,
gathered factors) not measured before gets every candidate plan timed (forward + backward on
random tensors of that shape), and the fastest is kept in memory and in the on-disk plan cache
(``fastlora.kernels.plans``), so later processes on the same GPU and versions reuse it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from fastlora.kernels import plans


def tune(model: nn.Module, example_batch: Any, *, report: Optional[Callable[[str], None]] = print) -> dict[str, str]:
    """Measure the plans of every adapted layer shape ``model`` meets on ``example_batch``; returns
    every recorded winner as {"<section>|<shape key>": plan}.

    ``example_batch``: a dict (called as ``model(**batch)``), a tuple or list (``model(*batch)``)
    or one tensor. Call it inside the ``torch.autocast`` context you train in: the compute dtype is
    part of the shape key. ``report`` gets one line per measured shape (None: silent). On CPU
    nothing is timed (auto runs the torch plan there). The model's forward runs under no_grad and
    the random streams are left as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    with plans.tuning(report or (lambda line: None)), torch.no_grad(), torch.random.fork_rng(_devices(model)):
        if isinstance(example_batch, dict):
            model(**example_batch)
        elif isinstance(example_batch, (tuple, list)):
            model(*example_batch)
        else:
            model(example_batch)
    return plans.auto_choices()


def _devices(model: nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)

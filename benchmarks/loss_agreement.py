"""PEFT and fastlora trained side by side without dropout, from the same adapters: their losses
must agree step by step.

One base model without dropout of its own (BERT's 0.1 off); PEFT's LoRA model over a copy of it
(fp32 adapters, dropout 0) with lora_B drawn from N(0, B_STD^2) instead of zeros (so that the
adapters change the output from the first step on);
``fastlora.accelerate`` over a copy of that PEFT model, and ``fastlora.inject`` over another copy
of the base with PEFT's factors copied in. Each trains ``steps`` steps (benchmarks/train_step.py)
on the same batch, repeated so that the loss falls. Reported: the loss curves, each fastlora
curve's largest absolute difference from PEFT's, the tolerance (``LOSS_ATOL`` + ``LOSS_RTOL`` times
PEFT's largest loss: bf16 rounding, which the two compute in different orders; about ten times
the differences of the CPU runs, a third of what other initial adapters give there) and how far
PEFT's loss fell (a difference is small only next to that).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .model_setups import ModelSpec, adapt, build_model, copy_factors, lora_factors, make_batch
from .train_step import LR, make_step, release

B_STD = 0.02
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-3
REFERENCE = "peft_fp32"


@torch.no_grad()
def _draw_b(model: nn.Module, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _, b in lora_factors(model).values():
        b.copy_(torch.randn(b.shape, generator=gen) * B_STD)


def _models(spec: ModelSpec, quick: bool, device: torch.device) -> dict[str, nn.Module]:
    import fastlora

    base = build_model(spec, quick, device, dropout=False)
    peft = adapt(copy.deepcopy(base), REFERENCE, spec, dropout=0.0)
    _draw_b(peft, seed=1)
    accelerated = fastlora.accelerate(copy.deepcopy(peft))
    injected = adapt(base, "inject_fp32", spec, dropout=0.0)
    copy_factors(peft, injected)
    return {REFERENCE: peft, "accelerate_fp32": accelerated, "inject_fp32": injected}


def loss_curves(spec: ModelSpec, quick: bool, device: torch.device, steps: int) -> dict:
    """The curves and their agreement (see the module docstring)."""
    models = _models(spec, quick, device)
    batch = make_batch(spec, models[REFERENCE], quick, device)
    curves = {}
    for name in list(models):
        step = make_step(models.pop(name), batch, device)
        curves[name] = [float(step()) for _ in range(steps)]
        del step
        release(device)
    ref = curves[REFERENCE]
    tolerance = LOSS_ATOL + LOSS_RTOL * max(abs(v) for v in ref)
    diffs = {name: max(abs(a - b) for a, b in zip(curve, ref)) for name, curve in curves.items() if name != REFERENCE}
    return {"steps": steps, "lr": LR, "dropout": 0.0, "b_std": B_STD, "reference": REFERENCE, "curves": curves,
            "max_abs_diff": diffs, "tolerance": tolerance, "loss_drop": ref[0] - ref[-1],
            "agree": all(d <= tolerance for d in diffs.values())}

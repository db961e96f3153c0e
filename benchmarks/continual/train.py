"""Fine-tuning one method on task B with a fixed budget, recording the trade-off trajectory."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import fastlora
from fastlora.methods.cascade import CascadeLoraAdapter

from .data import Scenario
from .methods import MethodSpec
from .metrics import output_drift
from .model import accuracy, batches, task_loss


@dataclass
class Run:
    """One fine-tuning run. trajectory: one point per evaluation (step 0 = the pretrained
    model), each {"step", "val_a", "val_b", "test_a", "test_b"}; final: the last point plus
    drift of task-A test logits vs the pretrained model ("kl", "rel_l2")."""

    method: str
    lr: float
    seed: int
    trainable: int
    seconds: float
    trajectory: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _evaluate(model: nn.Module, scenario: Scenario, step: int) -> dict:
    a, b = scenario.task_a, scenario.task_b
    model.eval()
    point = {"step": step, "val_a": accuracy(model, a, a.val), "val_b": accuracy(model, b, b.val),
             "test_a": accuracy(model, a, a.test), "test_b": accuracy(model, b, b.test)}
    model.train()
    return point


def _prepare(pretrained: nn.Module, spec: MethodSpec, rank: int, steps: int, seed: int) -> nn.Module:
    model = copy.deepcopy(pretrained)
    if spec.is_adapter:
        return fastlora.inject(model, spec.make_config(rank, steps, seed))
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def adapter_stats(model: nn.Module) -> dict[str, float]:
    """Each extra_stats() key averaged over the adapted layers, plus "layers" (their count)."""
    totals: dict[str, float] = {}
    layers = list(fastlora.adapter_layers(model))
    for _, layer in layers:
        for key, value in layer.adapter.extra_stats().items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {"layers": float(len(layers)), **{k: v / len(layers) for k, v in totals.items()}} if layers else {}


def _end_cascade_stages(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """LoRASC's stage ends with the epoch (the paper): fold, fresh pair without optimizer state."""
    for _, layer in fastlora.adapter_layers(model):
        if isinstance(layer.adapter, CascadeLoraAdapter):
            layer.adapter.cascade_step()
            for param in (layer.adapter.lora_A, layer.adapter.lora_B):
                optimizer.state.pop(param, None)


def fine_tune(pretrained: nn.Module, scenario: Scenario, spec: MethodSpec, lr: float, seed: int,
              epochs: int, rank: int, batch_size: int = 64) -> Run:
    """Adam on task B's train split for ``epochs`` epochs (every method the same steps and
    batches), the method's regulariser added to the loss and its post-step rule attached;
    evaluates after every epoch; LoRASC's stages end with the epochs (not after the last). Wall time
    counts training only."""
    task = scenario.task_b
    n = len(task.train.y)
    steps = epochs * -(-n // batch_size)
    torch.manual_seed(seed)
    model = _prepare(pretrained, spec, rank, steps, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer) if spec.is_adapter else None
    generator = torch.Generator().manual_seed(seed)
    run = Run(spec.name, lr, seed, sum(p.numel() for p in trainable), 0.0)
    run.trajectory.append(_evaluate(model, scenario, 0))
    step = 0
    for epoch in range(epochs):
        start = time.perf_counter()
        for index in batches(n, batch_size, generator):
            loss = task_loss(model, task, task.train.x[index], task.train.y[index])
            if spec.is_adapter:
                loss = loss + fastlora.regularization_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if epoch < epochs - 1:
            _end_cascade_stages(model, optimizer)
        run.seconds += time.perf_counter() - start
        run.trajectory.append(_evaluate(model, scenario, step))
    if hooks is not None:
        hooks.remove()
    model.eval()
    with torch.no_grad():
        x = scenario.task_a.test.x
        run.final = {**run.trajectory[-1], **output_drift(pretrained(x), model(x))}
    run.stats = adapter_stats(model)
    return run

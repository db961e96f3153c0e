"""One method on a task sequence: train each task at every learning rate of the method's grid,
keep the run the current task's validation accuracy prefers, end the task with the method's rule."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import fastlora
from fastlora.methods.cascade import CascadeLoraAdapter

from .data import Scenario, Task
from .methods import MethodSpec
from .model import accuracy, batches, task_loss


@dataclass
class SequenceRun:
    """One (method, seed). test[i][j] / val[i][j]: accuracy on task j after stage i (stage 0 =
    pretraining, stage t = task t learned), a (T+1) x (T+1) matrix; start[t - 1]: test accuracies
    of every task when task t's training starts (after the previous task's next_task); lrs[t - 1]:
    the selected lr of task t; candidates[t - 1]: per lr tried, {"lr", "val", "test"} (rows over tasks);
    seconds: training wall time of the selected runs; stats[t - 1]: adapter stats at the end of task t."""

    method: str
    seed: int
    trainable: int = 0
    seconds: float = 0.0
    test: list[list[float]] = field(default_factory=list)
    val: list[list[float]] = field(default_factory=list)
    start: list[list[float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    candidates: list[list[dict]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)


def evaluate(model: nn.Module, tasks: tuple[Task, ...]) -> dict[str, list[float]]:
    """{"val": [...], "test": [...]} accuracies of ``model`` on every task."""
    was_training = model.training
    model.eval()
    scores = {split: [accuracy(model, t, getattr(t, split)) for t in tasks] for split in ("val", "test")}
    model.train(was_training)
    return scores


def adapter_stats(model: nn.Module) -> dict[str, float]:
    """Each extra_stats() key averaged over the adapted layers, plus "layers" (their count)."""
    totals: dict[str, float] = {}
    layers = list(fastlora.adapter_layers(model))
    for _, layer in layers:
        for key, value in layer.adapter.extra_stats().items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {"layers": float(len(layers)), **{k: v / len(layers) for k, v in totals.items()}} if layers else {}


def steps_per_epoch(task: Task, batch_size: int) -> int:
    return -(-len(task.train.y) // batch_size)


def _end_cascade_stages(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """LoRASC's stage ends with the epoch (the paper): fold, fresh pair without optimizer state."""
    for _, layer in fastlora.adapter_layers(model):
        if isinstance(layer.adapter, CascadeLoraAdapter):
            layer.adapter.cascade_step()
            for param in (layer.adapter.lora_A, layer.adapter.lora_B):
                optimizer.state.pop(param, None)


def train_task(model: nn.Module, task: Task, spec: MethodSpec, lr: float, seed: int, epochs: int,
               batch_size: int = 64) -> float:
    """Adam on the task's train split for ``epochs`` epochs (seeded batch order, the same for every
    method), the method's regulariser added to the loss and its post-step rule attached, given the
    task's length in optimizer steps (CoDyRA's schedule spans it); LoRASC's stages end with the epochs
    (not after the last: next_task folds it) unless the spec has no epoch_stages. Returns the wall time."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    total = epochs * steps_per_epoch(task, batch_size)
    hooks = fastlora.attach_training_hooks(model, optimizer, total_steps=total) if spec.is_adapter else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        for index in batches(len(task.train.y), batch_size, generator):
            loss = task_loss(model, task, task.train.x[index], task.train.y[index])
            if spec.is_adapter:
                loss = loss + fastlora.regularization_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch < epochs - 1 and spec.epoch_stages:
            _end_cascade_stages(model, optimizer)
    seconds = time.perf_counter() - start
    if hooks is not None:
        hooks.remove()
    return seconds


def select(candidates: list[dict], task: int) -> int:
    """Index of the kept candidate: best validation accuracy on the current task (ties: better mean
    validation accuracy on the earlier tasks, then the smaller lr)."""
    def key(i):
        val = candidates[i]["val"]
        return val[task], sum(val[:task]) / task, -candidates[i]["lr"]
    return max(range(len(candidates)), key=key)


def run_sequence(pretrained: nn.Module, scenario: Scenario, spec: MethodSpec, lrs, seed: int, epochs: int,
                 rank: int, batch_size: int = 64) -> SequenceRun:
    """Learn tasks 1..T in order from the pretrained model. Adapters: injected for task 1; after
    each task ``fastlora.next_task`` keeps what the method keeps in W and starts fresh adapters
    (one init per task, shared by every lr). Full fine-tuning: all parameters, a new optimizer per task."""
    tasks = scenario.tasks
    steps = {steps_per_epoch(t, batch_size) for t in tasks[1:]}
    if len(steps) != 1:
        raise ValueError(f"the tasks' batches per epoch differ ({sorted(steps)}): one config cannot fit them all")
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    if spec.is_adapter:
        fastlora.inject(model, spec.make_config(rank, epochs * steps.pop(), seed))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    run = SequenceRun(spec.name, seed, sum(p.numel() for p in model.parameters() if p.requires_grad))
    scores = evaluate(pretrained, tasks)
    run.test.append(scores["test"])
    run.val.append(scores["val"])
    for t in range(1, len(tasks)):
        if t > 1 and spec.is_adapter:
            torch.manual_seed(seed * 1000 + t)
            fastlora.next_task(model)
        run.start.append(evaluate(model, tasks)["test"])
        tried, models = [], []
        for lr in lrs:
            candidate = copy.deepcopy(model)
            seconds = train_task(candidate, tasks[t], spec, lr, seed * 1000 + t, epochs, batch_size)
            tried.append({"lr": lr, "seconds": seconds, **evaluate(candidate, tasks)})
            models.append(candidate)
        best = select(tried, t)
        model = models[best]
        run.lrs.append(lrs[best])
        run.seconds += tried[best]["seconds"]
        run.test.append(tried[best]["test"])
        run.val.append(tried[best]["val"])
        run.candidates.append(tried)
        run.stats.append(adapter_stats(model))
    return run

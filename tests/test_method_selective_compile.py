"""Selective LoRA's gate statistics under torch.compile: the switches are counted on the device inside the
compiled graph (no host read, no graph break), so ``adapter_stats`` of a compiled run equal an eager run's;
a compiled training run neither recompiles per optimizer step nor hits the recompile limit.

Backend "aot_eager" (Dynamo's trace and AOTAutograd's graph: what fastlora's code has to get right; see
tests/test_compile.py), tiny float32 models on the CPU.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import fastlora
from fastlora import AdapterLinear, SelectiveLoraConfig

GATE_CHANGES = "fastlora/selective_lora/gate_changes"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Checkpointed(nn.Module):
    """Calls ``model`` (here a compiled one) under non-reentrant activation checkpointing: the compiled forward
    runs again in the backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return checkpoint(self.model, x, use_reentrant=False)


def _model(**config) -> nn.Sequential:
    """Three gated layers whose scores (0.15, threshold 0.1) fall under AdamW at lr 0.02 by ~0.02 a step:
    each switches off within the run, the layers at different steps (different penalty weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    fastlora.inject(model, SelectiveLoraConfig(r=2, backend="torch", **config))
    for weight, index in zip((1.0, 0.02, 0.0), (0, 2, 4)):  # the last one only follows its task gradient
        model[index].adapter.sparsity_weight = weight
    return model.train()


def _run(model: nn.Module, call, steps: int) -> list[list[float]]:
    """Per AdamW step (training hooks attached): each layer's gate_changes, active and score after it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x, target = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)), torch.zeros(5, 3)
    history = []
    for _ in range(steps):
        loss = F.mse_loss(call(x), target) + fastlora.regularization_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append([(layer.adapter.extra_stats()["gate_changes"], layer.adapter.extra_stats()["active"])
                        for layer in model if isinstance(layer, AdapterLinear)])
    hooks.remove()
    return history


@pytest.mark.parametrize("variant", ["default", "fullgraph", "checkpointed"])
def test_compiled_gate_statistics_equal_eager_over_training_steps(variant):
    """Every step's per-layer gate_changes and active of a compiled run are the eager run's, and gates do
    switch (not zeros); activation checkpointing's recompute of the compiled forward counts nothing twice."""
    steps = 6
    eager_model = _model()
    eager = _run(eager_model, eager_model, steps)
    model = _model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=variant == "fullgraph")
    if variant == "checkpointed":
        compiled = Checkpointed(compiled)
    assert _run(model, compiled, steps) == eager
    assert counters["stats"]["unique_graphs"] == 1  # the forwards ran compiled, in one graph
    assert eager[0] == [(0.0, 1.0)] * 3 and eager[-1][0] == (1.0, 0.0)  # the heavily penalised layer switched off
    assert fastlora.adapter_stats(model) == pytest.approx(fastlora.adapter_stats(eager_model))
    assert fastlora.adapter_stats(model)[GATE_CHANGES] >= 2


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_forwards_count_switches_both_ways(fullgraph):
    layer = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5, backend="torch"))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=fullgraph)
    x = torch.randn(3, 5)
    for score in (0.5, 0.0, 0.0, 0.3, 0.2, -1.0):  # on, off, off, on, on, off: three switches
        with torch.no_grad():
            layer.adapter.score.fill_(score)
        compiled(x).sum().backward()
    assert layer.adapter.extra_stats()["gate_changes"] == 3.0
    with torch.no_grad():
        layer.adapter.score.fill_(0.4)
        compiled(x)  # a no_grad (evaluation) forward sees the switch too, as in eager
    assert layer.adapter.extra_stats()["gate_changes"] == 4.0


def test_eager_and_compiled_forwards_of_one_model_count_each_switch_once():
    """Both kinds of forward compare with the gate the previous forward saw, whichever kind it was."""
    layer = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5, backend="torch"))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5)
    for score, call in ((0.5, layer), (0.0, compiled), (0.3, compiled), (0.3, layer), (-1.0, compiled),
                        (-1.0, layer), (0.2, compiled), (0.2, layer), (0.0, layer), (0.0, compiled)):
        with torch.no_grad():
            layer.adapter.score.fill_(score)
        call(x).sum().backward()
    # off, on, off, on seen first by compiled forwards (eager ones then see no change), off by an eager one
    assert layer.adapter.extra_stats()["gate_changes"] == 5.0


@pytest.mark.parametrize("warmup", [0, 3])
def test_compiled_training_compiles_once_per_penalty_phase_not_per_step(warmup):
    """10 optimizer steps, more than Dynamo's recompile limit (8): the step count is not guarded on, only
    whether the warm-up is over (one recompile when it ends); fullgraph=True would fail at the limit."""
    model = _model(sparsity_warmup_steps=warmup)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    history = _run(model, compiled, 10)
    assert counters["stats"]["unique_graphs"] == (1 if warmup == 0 else 2)
    assert model[0].adapter.extra_stats()["optimizer_steps"] == 10.0
    assert history[-1][0] == (1.0, 0.0)


def test_the_gate_record_is_not_saved_and_follows_the_layer():
    layer = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5, backend="torch"))
    assert set(layer.adapter.state_dict()) == {"lora_A", "lora_B", "score", "optimizer_steps", "tasks_done"}
    with torch.device("meta"):
        meta = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5, backend="torch"))
    meta.to_empty(device="cpu")  # the record had no values: it starts afresh (gate on, no switch)
    meta.load_state_dict(layer.state_dict())
    assert meta.adapter.extra_stats()["gate_changes"] == 0.0
    with torch.no_grad():
        meta.adapter.score.fill_(0.0)
    torch.compile(meta, backend="aot_eager", fullgraph=True)(torch.randn(3, 5))
    assert meta.adapter.extra_stats()["gate_changes"] == 1.0


def test_a_meta_layer_given_values_by_assign_starts_its_gate_record():
    """load_state_dict(assign=True) onto a meta layer (a big-model loading flow): the record, absent from the
    state dict, starts afresh on the score's device and counts; adapter stats read it."""
    layer = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5, backend="torch"))
    with torch.device("meta"):
        meta = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5, backend="torch"))
    meta.load_state_dict(layer.state_dict(), assign=True)
    assert not meta.adapter._gate_seen.is_meta and meta.adapter.extra_stats()["gate_changes"] == 0.0
    with torch.no_grad():
        meta.adapter.score.fill_(0.0)
    meta(torch.randn(3, 5))
    assert meta.adapter.extra_stats()["gate_changes"] == 1.0


def test_a_layer_built_under_inference_mode_counts_outside_it():
    with torch.inference_mode():
        layer = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5, backend="torch"))
        layer.adapter.score.fill_(0.0)
        layer(torch.randn(3, 5))
    assert layer.adapter.extra_stats()["gate_changes"] == 1.0
    # forwards outside inference mode (under no_grad: its parameters cannot enter autograd) write the record,
    # an ordinary tensor (the score, an inference tensor, is written inside inference mode)
    with torch.inference_mode():
        layer.adapter.score.fill_(0.5)
    with torch.no_grad():
        layer(torch.randn(3, 5))
    assert layer.adapter.extra_stats()["gate_changes"] == 2.0
    with torch.inference_mode():
        layer.adapter.score.fill_(0.0)
    with torch.no_grad():
        torch.compile(layer, backend="aot_eager", fullgraph=True)(torch.randn(3, 5))
    assert layer.adapter.extra_stats()["gate_changes"] == 3.0

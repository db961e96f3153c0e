"""The CoDyRA and Selective LoRA defaults prune at typical learning rates. A small MLP pretrained on
scikit-learn's digits 0-3 learns digits 4 vs 5 through adapters given only r and target_modules, trained
as a user would: AdamW (or TAPS's SGD), the training hooks attached, regularization_loss in the loss."""
from __future__ import annotations

import copy

import pytest
import torch

import fastlora
from fastlora import RankSelectiveLoraConfig, SelectiveLoraConfig

pytest.importorskip("sklearn")

from benchmarks.continual.data import load_scenario  # noqa: E402
from benchmarks.continual.model import accuracy, pretrain, task_loss  # noqa: E402

TARGETS = ["fc1", "fc2", "head"]
R = 8
BATCH = 32

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(one_thread):
    """(the MLP pretrained on digits 0-3, the task digits 4 vs 5)."""
    scenario = load_scenario("split", seed=0)
    return pretrain(scenario.tasks[0], seed=0, epochs=10), scenario.tasks[1]


def train(digits, config, steps, lr, sgd=False, watch=None):
    """The adapted model after ``steps`` optimizer steps of batches of 32 (AdamW, or SGD with momentum 0.9);
    ``watch(step, model)`` after each step."""
    base, task = digits
    torch.manual_seed(0)
    model = fastlora.inject(copy.deepcopy(base), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9) if sgd else torch.optim.AdamW(params, lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        index = torch.randint(len(task.train.y), (BATCH,), generator=generator)
        loss = task_loss(model, task, task.train.x[index], task.train.y[index]) + fastlora.regularization_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if watch is not None:
            watch(step, model)
    hooks.remove()
    return model.eval()


def test_the_pretrained_model_does_not_know_the_task(digits):
    base, task = digits
    assert accuracy(base, task, task.test) < 0.6


def test_the_default_schedule_thresholds_add_up_to_0_6375():
    """The total shrinkage of |w| over the default schedule: 50 levels of 5 steps after 250 dense ones,
    5 * 0.005 / 50 * (1 + ... + 50) = 0.6375. Ranks drawn from N(0, 1) end below it about half the time;
    a constant 1.0 never does."""
    config = RankSelectiveLoraConfig()
    assert sum(config.kappa(t, 500) for t in range(1, 501)) == pytest.approx(0.6375, abs=1e-12)


@pytest.mark.parametrize("lr", [1e-4, 3e-4])
def test_codyra_defaults_prune_about_half_the_ranks(digits, lr):
    config = RankSelectiveLoraConfig(r=R, target_modules=TARGETS)
    model = train(digits, config, 500, lr)
    stats = fastlora.adapter_stats(model)
    assert stats["fastlora/rank_selective_lora/kappa"] == 0.0  # the schedule is done
    assert stats["fastlora/rank_selective_lora/total_steps"] == 500
    assert 0.25 * 3 * R <= stats["fastlora/rank_selective_lora/active_ranks"] <= 0.75 * 3 * R
    assert accuracy(model, digits[1], digits[1].test) > 0.93


@pytest.mark.parametrize("lr", [1e-4, 3e-4])
def test_codyra_trained_twice_its_schedule_keeps_its_pruned_set(digits, lr):
    """1000 AdamW steps on a 500-step schedule: the ranks at 0 after step 500 stay 0 (AdamW's moments and
    weight decay would move them), the kept ones are not thresholded any more (kappa_max = 0.005 a step
    would shrink them all to 0 at these learning rates): they stay nonzero and keep training."""
    config = RankSelectiveLoraConfig(r=R, target_modules=TARGETS, total_steps=500)
    at_end = {}

    def watch(step, model):
        if step == config.total_steps:
            at_end.update({name: layer.adapter.importance.detach().clone()
                           for name, layer in fastlora.adapter_layers(model)})

    model = train(digits, config, 2 * config.total_steps, lr, watch=watch)
    stats = fastlora.adapter_stats(model)
    assert stats["fastlora/rank_selective_lora/kappa"] == 0.0
    assert stats["fastlora/rank_selective_lora/optimizer_steps"] == 2 * config.total_steps
    kept = 0
    for name, layer in fastlora.adapter_layers(model):
        end, w = at_end[name], layer.adapter.importance.detach()
        pruned = end == 0
        assert torch.equal(w[pruned], torch.zeros_like(w[pruned])), name
        assert torch.all(w[~pruned] != 0) and torch.all(w[~pruned] != end[~pruned]), name
        assert layer.adapter.active_index.tolist() == torch.nonzero(~pruned).flatten().tolist()
        kept += int((~pruned).sum())
    assert 0.25 * 3 * R <= kept <= 0.75 * 3 * R  # the schedule's pruning, as in a 500-step run
    assert stats["fastlora/rank_selective_lora/active_ranks"] == kept
    assert accuracy(model, digits[1], digits[1].test) > 0.93


def test_codyra_with_a_constant_importance_of_1_prunes_nothing(digits):
    config = RankSelectiveLoraConfig(r=R, target_modules=TARGETS, importance_init=1.0)
    model = train(digits, config, 500, 3e-4)
    assert fastlora.adapter_stats(model)["fastlora/rank_selective_lora/active_ranks"] == 3 * R
    smallest = min(float(layer.adapter.importance.detach().abs().min()) for _, layer in fastlora.adapter_layers(model))
    assert 0 < smallest < 1 - 0.6375 + 0.2  # shrunk by the schedule, moved a little by AdamW


@pytest.mark.parametrize("lr, steps", [(1e-4, 800), (3e-4, 400)])
def test_selective_lora_defaults_switch_blocks_off_under_adamw(digits, lr, steps):
    """A score moves about lr per AdamW step: the penalty takes (0.15 - 0.1) / lr steps to switch a block
    off (500 at lr 1e-4, about 170 at 3e-4). The block the task needs most stays on."""
    model = train(digits, SelectiveLoraConfig(r=R, target_modules=TARGETS), steps, lr)
    active = fastlora.adapter_stats(model)["fastlora/selective_lora/active"]
    assert 1 <= active <= 2
    assert accuracy(model, digits[1], digits[1].test) > 0.9


def test_selective_lora_under_taps_sgd_needs_its_warm_up(digits):
    """SGD at TAPS's lr 0.01 with momentum 0.9: the penalty (1 / 3 per score here) switches every block off
    within 10 steps, before B has learned anything; held back for 100 steps (TAPS: 2 epochs), it leaves
    the block the task needs on."""
    config = SelectiveLoraConfig(r=R, target_modules=TARGETS)
    early = train(digits, config, 10, 1e-2, sgd=True)
    assert fastlora.adapter_stats(early)["fastlora/selective_lora/active"] == 0
    assert accuracy(early, digits[1], digits[1].test) == accuracy(digits[0], digits[1], digits[1].test)
    warmed = train(digits, SelectiveLoraConfig(r=R, target_modules=TARGETS, sparsity_warmup_steps=100), 300, 1e-2,
                   sgd=True)
    assert 1 <= fastlora.adapter_stats(warmed)["fastlora/selective_lora/active"] <= 2
    assert accuracy(warmed, digits[1], digits[1].test) > 0.9

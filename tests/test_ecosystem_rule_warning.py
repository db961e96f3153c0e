"""A method whose training rule is not attached warns once, after a few training forwards, then costs nothing."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora import (
    CascadeLoraConfig,
    LoraConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
    attach_training_hooks,
    regularization_loss,
)
from fastlora.training import WATCHED_FORWARDS


def model_with(config):
    torch.manual_seed(0)
    return fastlora.inject(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), config)


def train(model, steps, hooks=False, penalty=False):
    """``steps`` SGD steps; the warnings they raised."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    attached = attach_training_hooks(model, optimizer, total_steps=steps) if hooks else None
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss = model(x).square().mean() + (regularization_loss(model) if penalty else 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if attached is not None:
        attached.remove()
    return [str(w.message) for w in caught if "fastlora:" in str(w.message)]


@pytest.mark.parametrize("config, method", [(RankSelectiveLoraConfig(r=2), "rank_selective_lora"),
                                            (CascadeLoraConfig(r=2, cascade_interval=3), "cascade_lora")])
def test_rule_without_hooks_warns_once_then_the_watch_is_gone(config, method):
    model = model_with(config)
    assert train(model, WATCHED_FORWARDS - 1) == []
    messages = train(model, 3 * WATCHED_FORWARDS)
    assert len(messages) == 1 and method in messages[0] and "attach_training_hooks" in messages[0]
    assert not model._forward_pre_hooks


def test_attached_hooks_and_penalty_silence_the_watch():
    assert train(model_with(RankSelectiveLoraConfig(r=2)), 2 * WATCHED_FORWARDS, hooks=True) == []
    assert train(model_with(SelectiveLoraConfig(r=2)), 2 * WATCHED_FORWARDS, hooks=True, penalty=True) == []


def test_selective_lora_without_its_penalty_warns():
    messages = train(model_with(SelectiveLoraConfig(r=2)), WATCHED_FORWARDS, hooks=True)
    assert len(messages) == 1 and "regularization_loss(model)" in messages[0]
    both = train(model_with(SelectiveLoraConfig(r=2)), WATCHED_FORWARDS)
    assert len(both) == 2


def test_methods_that_need_nothing_are_not_watched():
    for config in (LoraConfig(r=2), CascadeLoraConfig(r=2, cascade_interval=None),
                   SelectiveLoraConfig(r=2, sparsity_weight=0.0)):
        model = model_with(config)
        if isinstance(config, SelectiveLoraConfig):  # its gate refresh is still a rule
            assert train(model, WATCHED_FORWARDS, hooks=True) == []
        else:
            assert not model._forward_pre_hooks


def test_eval_and_no_grad_forwards_are_not_counted():
    model = model_with(RankSelectiveLoraConfig(r=2))
    x = torch.randn(3, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()(x)
        for _ in range(2 * WATCHED_FORWARDS):
            model.eval()(x)
            with torch.no_grad():
                model.train()(x)
    assert model._forward_pre_hooks


def test_a_watched_model_pickles_and_copies():
    model = model_with(RankSelectiveLoraConfig(r=2))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone):
        assert len(train(other, WATCHED_FORWARDS)) == 1 and not other._forward_pre_hooks
    assert model._forward_pre_hooks

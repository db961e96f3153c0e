"""Training hooks: one set per model, every rule parameter covered, state dropped in every optimizer,
lr=None groups, no rule on merged layers."""
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.methods.rank_selective import soft_threshold

D_IN, D_OUT = 10, 8


def _model(config):
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)), config)
    with torch.no_grad():
        for p in model[0].adapter.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _step(model, *optimizers):
    x = torch.randn(6, D_IN, dtype=torch.float64)
    loss = model(x).square().sum() + fastlora.regularization_loss(model)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_attaching_twice_is_refused_until_removed():
    model = _model(RankSelectiveLoraConfig(r=3, total_steps=4, dense_fraction=0.0, threshold_levels=1,
                                           kappa_max=0.05))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    with pytest.raises(ValueError, match="already attached"):
        fastlora.attach_training_hooks(model, optimizer)
    with pytest.raises(ValueError, match="already attached"):
        fastlora.attach_training_hooks(model, torch.optim.SGD([model[0].adapter.importance], lr=0.1))
    importance = model[0].adapter.importance
    importance.grad = torch.zeros_like(importance)
    before = importance.detach().clone()
    optimizer.step()  # zero gradient: only the proximal step (applied once) moves lambda
    assert torch.equal(importance.detach(), soft_threshold(before, 0.05))
    hooks.remove()
    fastlora.attach_training_hooks(model, optimizer).remove()
    with pytest.raises(ValueError, match="given twice"):
        fastlora.attach_training_hooks(model, [optimizer, optimizer])


@pytest.mark.parametrize("config, name", [(RankSelectiveLoraConfig(r=3), "rank_selective_lora"),
                                          (SelectiveLoraConfig(r=3), "selective_lora"),
                                          (CascadeLoraConfig(r=3), "cascade_lora")])
def test_a_rule_parameter_missing_from_every_optimizer_is_refused(config, name):
    model = _model(config)
    rule = model[0].adapter.rule_parameter()
    others = [p for p in model.parameters() if p.requires_grad and p is not rule]
    with pytest.raises(ValueError, match=rf"layer 0: its {name} rule parameter .* in none of the optimizers"):
        fastlora.attach_training_hooks(model, torch.optim.SGD(others, lr=0.1))
    rule.requires_grad_(False)  # a frozen rule parameter turns its rule off
    fastlora.attach_training_hooks(model, torch.optim.SGD(others, lr=0.1)).remove()
    # plain LoRA has no rule: nothing is required (a parameter left out only warns that it will not train)
    lora = _model(LoraConfig(r=3))
    with pytest.warns(RuntimeWarning, match=r"1 trainable parameters are in none of the optimizers"):
        fastlora.attach_training_hooks(lora, torch.optim.SGD([lora[0].adapter.lora_B], lr=0.1)).remove()


def test_a_restarted_pair_loses_its_state_in_every_optimizer():
    model = _model(CascadeLoraConfig(r=3, cascade_interval=2))
    adapter = model[0].adapter
    first = torch.optim.Adam([adapter.lora_A], lr=0.01)
    second = torch.optim.Adam([adapter.lora_B], lr=0.01)
    hooks = fastlora.attach_training_hooks(model, [first, second])
    _step(model, second, first)  # step 1: both hold Adam moments
    assert adapter.lora_A in first.state and adapter.lora_B in second.state
    _step(model, second, first)  # step 2 of lora_A's optimizer: a cascade restarts the pair
    assert adapter.extra_stats()["cascades"] == 1.0
    assert adapter.lora_A not in first.state and adapter.lora_B not in second.state
    hooks.remove()


class NoLrSGD(torch.optim.Optimizer):
    """An optimizer whose groups carry lr=None (as Adafactor with relative steps)."""

    def __init__(self, params):
        super().__init__(params, {"lr": None})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(0.01 * p.grad)


def test_an_lr_none_optimizer_runs_rules_that_do_not_use_the_rate():
    model = _model(CascadeLoraConfig(r=3, cascade_interval=1))
    optimizer = NoLrSGD([p for p in model.parameters() if p.requires_grad])
    hooks = fastlora.attach_training_hooks(model, optimizer)
    _step(model, optimizer)
    assert model[0].adapter.extra_stats()["cascades"] == 1.0
    hooks.remove()
    # CoDyRA's threshold is absolute (its schedule, not the learning rate): it runs under lr=None too
    codyra = _model(RankSelectiveLoraConfig(r=3, total_steps=2, dense_fraction=0.0, threshold_levels=1,
                                            kappa_max=0.01))
    importance = codyra[0].adapter.importance
    optimizer = NoLrSGD([p for p in codyra.parameters() if p.requires_grad])
    hooks = fastlora.attach_training_hooks(codyra, optimizer)
    _step(codyra, optimizer)
    assert codyra[0].adapter.extra_stats()["kappa"] == 0.01
    hooks.remove()
    assert torch.isfinite(importance).all()


@pytest.mark.parametrize("config", [RankSelectiveLoraConfig(r=3, total_steps=4, dense_fraction=0.0, kappa_max=0.5),
                                    CascadeLoraConfig(r=3, cascade_interval=1)], ids=["codyra", "cascade"])
def test_rules_do_not_act_on_merged_layers(config):
    model = _model(config)
    weight = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    fastlora.merge(model)
    state = {k: v.clone() for k, v in model[0].adapter.state_dict().items()}
    optimizer.step()  # a merged forward gives the adapter no gradient; the rule must not run either
    assert all(torch.equal(v, state[k]) for k, v in model[0].adapter.state_dict().items())
    fastlora.unmerge(model)
    assert torch.equal(model[0].weight, weight)
    _step(model, optimizer)
    assert any(not torch.equal(v, state[k]) for k, v in model[0].adapter.state_dict().items())
    hooks.remove()


def test_attaching_the_hooks_to_merged_layers_warns_that_their_adapters_do_not_train():
    model = _model(LoraConfig(r=2))
    fastlora.merge(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"attach_training_hooks: adapter layers \['0'\] are merged: their "
                                            r"update is part of W, so their adapters get no gradient") as caught:
        fastlora.attach_training_hooks(model, optimizer).remove()
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()(torch.randn(3, D_IN, dtype=torch.float64))  # a merged model evaluated in train mode: quiet
        fastlora.unmerge(model)
        fastlora.attach_training_hooks(model, optimizer).remove()


@pytest.mark.parametrize("remove", [fastlora.unload, fastlora.merge_and_unload], ids=lambda f: f.__name__)
def test_unloading_the_adapters_removes_their_hooks(remove):
    """Hooks left on a model whose adapters are gone would refuse the next attach as a second set."""
    model = _model(RankSelectiveLoraConfig(r=3, total_steps=4))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    remove(model)
    assert not hooks.attached
    fastlora.inject(model, RankSelectiveLoraConfig(r=3, total_steps=4))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    fastlora.attach_training_hooks(model, optimizer).remove()


def test_removed_hooks_are_detached_everywhere_and_the_rule_warning_comes_back():
    """After ``remove()``: ``attached`` is False, ``attached_hooks`` forgets them, and the layers count as
    unruled again (training on warns)."""
    from fastlora.training import attached_hooks

    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(6, 6)), fastlora.RankSelectiveLoraConfig(r=2, total_steps=50))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    assert hooks.attached is True and attached_hooks(model) is hooks
    hooks.remove()
    assert hooks.attached is False and attached_hooks(model) is None
    model.train()
    with pytest.warns(UserWarning, match="rank_selective_lora layers have trained 8 forward passes without"):
        for _ in range(8):
            model(torch.randn(2, 6)).sum().backward()


def test_a_lorasc_stage_noise_waits_for_a_training_forward_of_an_enabled_layer():
    """The hooks add a pending stage's noise before the first *training* forward, and not into a layer whose
    adapter is disabled (that layer computes the base alone)."""
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)),
                            fastlora.CascadeLoraConfig(r=2, cascade_interval=4, noise_intensity=0.5))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    fastlora.attach_training_hooks(model, optimizer)
    before = [layer.weight.detach().clone() for layer in model]
    with torch.no_grad():
        model.eval()(torch.randn(2, 6))
    assert all(torch.equal(layer.weight, w) for layer, w in zip(model, before))
    model[1].adapter_enabled = False
    model.train()(torch.randn(2, 6))
    assert not torch.equal(model[0].weight, before[0]) and not model[0].adapter.pending_start
    assert torch.equal(model[1].weight, before[1]) and model[1].adapter.pending_start


def test_hooks_attach_through_hugging_face_accelerates_optimizer_wrapper():
    """accelerate's AcceleratedOptimizer (an Optimizer subclass without a hook registry of its own) is
    unwrapped: the rules run on every step it takes (CoDyRA's soft threshold moves w)."""
    accelerate = pytest.importorskip("accelerate")
    model = _model(RankSelectiveLoraConfig(r=4, total_steps=4, kappa_max=1e-3, dense_fraction=0.0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model, wrapped = accelerate.Accelerator(cpu=True).prepare(model, optimizer)
    assert type(wrapped) is not type(optimizer)
    hooks = fastlora.attach_training_hooks(model, wrapped)
    importance = model[0].adapter.importance.detach().clone()
    _step(model, wrapped)  # lr 0: only the rule moves w
    kappa = model[0].adapter.config.kappa(1, 4)
    assert kappa > 0
    torch.testing.assert_close(model[0].adapter.importance, soft_threshold(importance, kappa), rtol=0, atol=0)
    hooks.remove()


INFERENCE_LOAD_CONFIGS = [LoraConfig(r=3), SelectiveLoraConfig(r=3), RankSelectiveLoraConfig(r=3, total_steps=4),
                          CurLoraConfig(r=3), NeatConfig(r=3), CascadeLoraConfig(r=3, cascade_interval=2)]


@pytest.mark.parametrize("config", INFERENCE_LOAD_CONFIGS, ids=lambda c: c.method)
def test_a_state_dict_loaded_under_inference_mode_trains_as_one_loaded_outside_it(config):
    """A load under torch.inference_mode (a serving habit) leaves no inference tensor behind: training after it
    (past CoDyRA's schedule, with a pruned rank; across a LoRASC stage end) is that after a plain load."""
    saved = _model(config)
    if config.method == "rank_selective_lora":
        with torch.no_grad():
            saved[0].adapter.importance[0] = 0.0
            saved[0].adapter.optimizer_steps.fill_(4)  # the schedule is done: rank 0 is dropped for good
    state = saved.state_dict()
    runs = []
    for inference in (False, True):
        model = _model(config)
        with torch.inference_mode(inference):
            model.load_state_dict(state)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        hooks = fastlora.attach_training_hooks(model, optimizer)
        torch.manual_seed(5)
        for _ in range(3):
            _step(model, optimizer)
        hooks.remove()
        runs.append(model.state_dict())
    if config.method == "rank_selective_lora":
        assert model[0].adapter.active_index.tolist() == [1, 2]
    assert all(t.isfinite().all() for t in runs[0].values() if t.is_floating_point())
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_an_optimizer_built_before_inject_is_refused_and_one_missing_some_parameters_warns():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64), nn.Tanh(), nn.Linear(D_OUT, 3,
                                                                                            dtype=torch.float64))
    stale = torch.optim.SGD(base.parameters(), lr=0.1)  # W and b: frozen by inject, the adapters not in it
    model = fastlora.inject(base, LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"attach_training_hooks: the optimizer holds none of the adapters' 4 "
                                         r"trainable parameters \(e.g. 0.adapter.lora_A\), so they would not "
                                         r"train: an optimizer built before fastlora.inject"):
        fastlora.attach_training_hooks(model, stale)
    model[2].bias.requires_grad_(True)  # a trainable tensor besides the adapters (a head's, a LayerNorm's)
    with pytest.raises(ValueError, match=r"holds none of the adapters' 4 trainable parameters"):
        fastlora.attach_training_hooks(model, stale)  # it holds that bias, none of the adapters
    model[2].bias.requires_grad_(False)
    flat = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)  # DeepSpeed's flat partitions, say
    fastlora.attach_training_hooks(model, flat).remove()  # which parameters they stand for cannot be told
    with pytest.raises(ValueError, match=r"holds none of the adapters' 4 trainable parameters"):  # a plain tensor
        fastlora.attach_training_hooks(model, [stale, flat])  # beside stale parameters: those are judged
    head = torch.optim.SGD([model[2].bias.requires_grad_(True)], lr=0.1)  # a head-only phase:
    for switch_off, switch_on in ((lambda: fastlora.set_adapters_enabled(model, False),
                                   lambda: fastlora.set_adapters_enabled(model, True)),
                                  (lambda: fastlora.merge(model), lambda: fastlora.unmerge(model))):
        switch_off()  # adapters off or merged get no gradient anyway: not refused (left out: warned)
        with pytest.warns(RuntimeWarning, match=r"4 trainable parameters are in none of the optimizers"):
            fastlora.attach_training_hooks(model, head).remove()
        switch_on()
    model[2].bias.requires_grad_(False)
    first_layer = torch.optim.SGD(model[0].adapter.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"attach_training_hooks: 2 trainable parameters are in none of the "
                                            r"optimizers \(2.adapter.lora_A, 2.adapter.lora_B\)") as caught:
        fastlora.attach_training_hooks(model, first_layer).remove()
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlora.attach_training_hooks(model, [first_layer, torch.optim.SGD(model[2].parameters(), lr=0.1)]).remove()

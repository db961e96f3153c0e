"""Selective LoRA as the paper and TAPS define it: hard gate 1[score >= tau] (tau 0.1, score_init 0.15),
straight-through score gradient in train and eval mode, L1 penalty over the gated layers after a
warm-up, gated-off blocks cost nothing and merge to nothing."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import AdapterLinear, SelectiveLoraConfig

from host_reads import HostReads
from utils import rel

D_IN, D_OUT, N = 37, 29, 11


def _layer(r=5, alpha=3.0, bias=True, **kwargs):
    torch.manual_seed(1)
    return AdapterLinear(D_IN, D_OUT, bias=bias, config=SelectiveLoraConfig(r=r, alpha=alpha, **kwargs),
                         dtype=torch.float64)


def _randomise(layer, score=None):
    with torch.no_grad():
        layer.adapter.lora_A.copy_(torch.randn_like(layer.adapter.lora_A))
        layer.adapter.lora_B.copy_(torch.randn_like(layer.adapter.lora_B))
        if score is not None:
            layer.adapter.score.fill_(score)


def _formula(x, weight, bias, a, b, gate, scale):
    """y = x W^T + b + g s (x A^T) B^T (float64)."""
    y = x @ weight.T + gate * scale * (x @ a.T) @ b.T
    return y if bias is None else y + bias


def _hand_grads(x, dy, a, b, gate, scale):
    """(dA, dB, d score) of the formula; d score is the straight-through s sum((dy B) ⊙ (x A^T))."""
    t, dp = x @ a.T, dy @ b
    return gate * scale * dp.T @ x, gate * scale * dy.T @ t, scale * (dp * t).sum()


def test_initialisation_and_zero_b_reproduces_base_exactly():
    layer = _layer(score_init=0.7)
    adapter = layer.adapter
    assert adapter.lora_A.shape == (5, D_IN) and adapter.lora_B.shape == (D_OUT, 5)
    assert adapter.score.shape == (1,) and adapter.score.item() == 0.7 and adapter.active  # FSDP2 shards dim 0
    assert torch.count_nonzero(adapter.lora_B) == 0 and adapter.lora_A.abs().max() > 0
    assert set(adapter.state_dict()) == {"lora_A", "lora_B", "score", "optimizer_steps", "tasks_done"}
    x = torch.randn(N, D_IN, dtype=torch.float64)
    for mode in (True, False):
        layer.train(mode)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_gate_on_forward_and_grads_match_float64_formula(bias):
    layer = _layer(r=6, alpha=2.0, bias=bias)
    _randomise(layer, score=0.4)
    adapter, scale = layer.adapter, 2.0 / 6
    x = torch.randn(3, N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    ref = _formula(xr, layer.weight, layer.bias, a, b, 1.0, scale)
    assert rel(out, ref) < 1e-10
    base = F.linear(x, layer.weight, layer.bias).detach()
    assert rel(out - base, ref - base) < 1e-10
    dy = torch.randn_like(out)
    gx, ga, gb, gs = torch.autograd.grad(out, [x, adapter.lora_A, adapter.lora_B, adapter.score], dy)
    (rx,) = torch.autograd.grad(ref, [xr], dy)
    ha, hb, hs = _hand_grads(x.detach().reshape(-1, D_IN), dy.reshape(-1, D_OUT), a, b, 1.0, scale)
    assert rel(gx, rx) < 1e-10 and rel(ga, ha) < 1e-10 and rel(gb, hb) < 1e-10
    assert abs(float(hs)) > 0 and abs(float(gs - hs)) / abs(float(hs)) < 1e-10


def test_gate_is_a_hard_threshold_at_tau():
    layer = _layer(threshold=0.25, score_init=0.5)
    _randomise(layer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    base = F.linear(x, layer.weight, layer.bias)
    a, b = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
    for score, gate in ((0.25, 1.0), (0.2500001, 1.0), (0.2499999, 0.0), (-3.0, 0.0), (7.0, 1.0)):
        with torch.no_grad():
            layer.adapter.score.fill_(score)
        for mode in (True, False):
            layer.train(mode)
            out = layer(x)
            # the output does not scale with the score: g is exactly 0 or 1
            assert rel(out, _formula(x, layer.weight, layer.bias, a, b, gate, 3.0 / 5)) < 1e-12
            if gate == 0.0:
                assert torch.equal(out, base)
        assert layer.adapter.extra_stats()["active"] == gate


def test_gated_off_in_training_costs_nothing_but_score_still_learns():
    layer = _layer(r=4, alpha=1.5)
    _randomise(layer, score=0.05)
    adapter = layer.adapter
    x = torch.randn(N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    dy = torch.randn_like(out)
    out.backward(dy)
    # A and B get exact zeros (never None), x only the base gradient
    assert torch.equal(adapter.lora_A.grad, torch.zeros_like(adapter.lora_A))
    assert torch.equal(adapter.lora_B.grad, torch.zeros_like(adapter.lora_B))
    assert torch.equal(x.grad, dy @ layer.weight)
    # straight-through: the score still sees how the block would have helped
    _, _, hs = _hand_grads(x.detach(), dy, adapter.lora_A.detach(), adapter.lora_B.detach(), 0.0, 1.5 / 4)
    assert abs(float(hs)) > 0 and abs(float(adapter.score.grad - hs)) / abs(float(hs)) < 1e-10


def test_defaults_are_taps():
    config = SelectiveLoraConfig()
    assert (config.threshold, config.score_init, config.sparsity_weight) == (0.1, 0.15, 1.0)
    assert (config.normalize_penalty, config.sparsity_warmup_steps) == (True, 0)
    assert SelectiveLoraConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("score", [0.6, 0.05])
def test_eval_mode_with_grad_gets_the_straight_through_gradient(score):
    """The estimator does not depend on the module's mode: eval with grad enabled == train."""
    layer = _layer(r=4, alpha=1.5)
    _randomise(layer, score=score)
    adapter, gate = layer.adapter, float(score >= 0.1)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    dy = torch.randn(N, D_OUT, dtype=torch.float64)
    a, b = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
    ref = _formula(x, layer.weight, layer.bias, a, b, gate, 1.5 / 4)
    ha, hb, hs = _hand_grads(x, dy, a, b, gate, 1.5 / 4)
    for mode in (False, True):
        layer.train(mode)
        out = layer(x)
        assert rel(out, ref) < 1e-12
        ga, gb, gs = torch.autograd.grad(out, [adapter.lora_A, adapter.lora_B, adapter.score], dy)
        assert abs(float(hs)) > 0 and abs(float(gs - hs)) / abs(float(hs)) < 1e-10, mode
        if gate:
            assert rel(ga, ha) < 1e-10 and rel(gb, hb) < 1e-10
        else:
            assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0


@pytest.mark.parametrize("no_score_gradient", ["no_grad", "frozen_score"])
def test_gated_off_without_a_score_gradient_never_reads_the_factors(no_score_gradient):
    layer = _layer(r=4).eval()
    adapter = layer.adapter
    with torch.no_grad():
        adapter.score.fill_(-1.0)
        adapter.lora_A.fill_(float("nan"))  # any read would poison the output
        adapter.lora_B.fill_(float("nan"))
    adapter.score.requires_grad_(no_score_gradient == "no_grad")
    x = torch.randn(2, N, D_IN, dtype=torch.float64, requires_grad=True)
    with torch.set_grad_enabled(no_score_gradient != "no_grad"):
        assert adapter.gate() == 0.0 and isinstance(adapter.gate(), float)
        out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    if no_score_gradient == "no_grad":
        return
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and adapter.score.grad is None
    # merging drops the block: W is untouched even with non-finite factors
    weight = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, weight)
    layer.unmerge()
    assert torch.equal(layer.weight, weight)


def test_no_grad_and_eval_pass_a_float_gate():
    layer = _layer()
    assert isinstance(layer.adapter.gate(), torch.Tensor) and layer.adapter.gate().requires_grad
    with torch.no_grad():
        assert layer.adapter.gate() == 1.0 and isinstance(layer.adapter.gate(), float)
        assert isinstance(layer.eval().adapter.gate(), float)
    assert isinstance(layer.eval().adapter.gate(), torch.Tensor)  # eval with grad: straight-through


@pytest.mark.parametrize("normalize", [True, False])
def test_regularization_loss_is_l1_of_the_scores_over_the_gated_layers(normalize):
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Linear(D_OUT, 13), nn.Linear(13, 5)),
                            SelectiveLoraConfig(r=4, sparsity_weight=0.3, normalize_penalty=normalize))
    scores = [0.8, -0.5, 0.25]
    with torch.no_grad():
        for layer, score in zip(model, scores):
            layer.adapter.score.fill_(score)
    blocks = 3 if normalize else 1
    loss = fastlora.regularization_loss(model)
    assert abs(loss.item() - 0.3 / blocks * sum(abs(s) for s in scores)) < 1e-6
    loss.backward()
    for layer, score in zip(model, scores):
        assert float(layer.adapter.score.grad) == pytest.approx(0.3 / blocks * math.copysign(1, score))


def test_penalty_starts_after_the_warm_up():
    """SGD on task loss + penalty: the score follows the straight-through gradient alone for the
    warm-up steps, then the penalty's sparsity_weight / L * sign(score) joins it (float64 by hand)."""
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64), nn.Tanh(),
                                          nn.Linear(D_OUT, 13, dtype=torch.float64)),
                            SelectiveLoraConfig(r=3, alpha=3.0, score_init=2.0, sparsity_weight=0.4,
                                                sparsity_warmup_steps=2))
    layers = [model[0], model[2]]
    for layer in layers:
        _randomise(layer)
    lr = 1e-2
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x, target = torch.randn(N, D_IN, dtype=torch.float64), torch.randn(N, 13, dtype=torch.float64)
    for step in range(4):
        scores = [layer.adapter.score.detach().clone() for layer in layers]
        task = torch.autograd.grad(F.mse_loss(model(x), target), [layer.adapter.score for layer in layers])
        optimizer.zero_grad()
        penalty = fastlora.regularization_loss(model)
        assert penalty.item() == (0.0 if step < 2 else pytest.approx(0.4 / 2 * sum(abs(float(s)) for s in scores),
                                                                     rel=1e-15))
        assert step < 2 or penalty.dtype == torch.float64  # a float64 model's penalty (was rounded to fp32)
        (F.mse_loss(model(x), target) + penalty).backward()
        optimizer.step()
        for layer, score, grad in zip(layers, scores, task):
            pull = 0.0 if step < 2 else 0.4 / 2 * float(torch.sign(score))
            assert float(layer.adapter.score.detach()) == pytest.approx(float(score - lr * (grad + pull)), abs=1e-12)
        assert layers[0].adapter.extra_stats()["optimizer_steps"] == step + 1
    hooks.remove()


def test_forward_records_the_penalty_and_regularization_loss_hands_it_over_once():
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)),
                            SelectiveLoraConfig(r=4, sparsity_weight=0.3))
    adapter = model[0].adapter
    with torch.no_grad():
        adapter.score.fill_(-0.5)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    with torch.no_grad():
        model(x)  # a no_grad forward records nothing
    assert adapter._penalty is None
    model(x)
    recorded = adapter._penalty
    assert recorded is not None and recorded.shape == () and recorded.requires_grad
    loss = adapter.regularization_loss()
    assert loss is recorded and adapter._penalty is None and loss.item() == pytest.approx(0.15, abs=1e-15)
    again = adapter.regularization_loss()  # no forward since: computed from the score
    assert again is not recorded and again.item() == loss.item() and again.requires_grad
    (loss + again).backward()
    assert adapter.score.grad.item() == pytest.approx(-0.6, abs=1e-15)


def _trajectory(regulariser_first, steps=3):
    """Parameters after SGD steps of mse + regularization_loss, the regulariser called before
    or after the forward; layer 2 is switched off by the penalty during step 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(D_OUT, 13, dtype=torch.float64))
    fastlora.inject(model, SelectiveLoraConfig(r=4, sparsity_weight=0.02))
    with torch.no_grad():
        model[2].adapter.score.fill_(0.15)
        model[2].adapter.sparsity_weight = 20.0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x, target = torch.randn(7, D_IN, dtype=torch.float64), torch.randn(7, 13, dtype=torch.float64)
    for _ in range(steps):
        optimizer.zero_grad()
        if regulariser_first:
            penalty = fastlora.regularization_loss(model)
            loss = F.mse_loss(model(x), target) + penalty
        else:
            loss = F.mse_loss(model(x), target) + fastlora.regularization_loss(model)
        loss.backward()
        optimizer.step()
    hooks.remove()
    assert not model[2].adapter.active
    return [p.detach().clone() for p in params]


def test_regularization_loss_before_the_forward_gives_the_same_training():
    """The forward's record is stale after the step: called first, the term is computed anew."""
    for got, ref in zip(_trajectory(True), _trajectory(False)):
        assert torch.equal(got, ref)


def test_copies_leave_the_recorded_penalty_behind():
    layer = _layer()
    layer(torch.randn(N, D_IN, dtype=torch.float64))
    assert layer.adapter._penalty is not None
    copied = copy.deepcopy(layer)  # a non-leaf tensor would refuse deepcopy
    assert copied.adapter._penalty is None and layer.adapter._penalty is not None


def test_checkpoint_with_a_0_dim_score_loads():
    layer = _layer()
    state = {**layer.adapter.state_dict(), "score": torch.tensor(0.42, dtype=torch.float64)}
    fresh = _layer()
    fresh.adapter.load_state_dict(state)
    assert fresh.adapter.score.shape == (1,) and fresh.adapter.score.item() == 0.42


def test_sgd_step_follows_task_gradient_plus_l1():
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)),
                            SelectiveLoraConfig(r=3, alpha=6.0, score_init=1.0, sparsity_weight=0.2))
    layer = model[0]
    _randomise(layer)
    lr, scale = 1e-3, 6.0 / 3
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    for _ in range(2):
        adapter = layer.adapter
        a, b, score = (t.detach().clone() for t in (adapter.lora_A, adapter.lora_B, adapter.score))
        optimizer.zero_grad()
        loss = model(x).square().mean() + fastlora.regularization_loss(model)
        loss.backward()
        optimizer.step()
        assert float(score) >= 0.1  # the block is on
        y = _formula(x, layer.weight, layer.bias, a, b, 1.0, scale)
        ha, hb, hs = _hand_grads(x, 2 * y / y.numel(), a, b, 1.0, scale)
        assert rel(adapter.lora_A.detach(), a - lr * ha) < 1e-12
        assert rel(adapter.lora_B.detach(), b - lr * hb) < 1e-12
        expected = score - lr * (hs + 0.2 * torch.sign(score))
        assert abs((adapter.score - expected).item()) < 1e-12
    hooks.remove()


def _train_two_layer_model(sparsity_weight, steps=10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(D_OUT, 13, dtype=torch.float64))
    fastlora.inject(model, SelectiveLoraConfig(r=4, sparsity_weight=sparsity_weight))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x, target = torch.randn(32, D_IN, dtype=torch.float64), torch.randn(32, 13, dtype=torch.float64)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target) + fastlora.regularization_loss(model)
        loss.backward()
        optimizer.step()
    hooks.remove()
    return model, optimizer, x, target


def test_l1_training_with_large_sparsity_weight_switches_blocks_off():
    control, _, _, _ = _train_two_layer_model(0.0)
    assert [layer.adapter.extra_stats()["active"] for _, layer in fastlora.adapter_layers(control)] == [1.0, 1.0]
    model, optimizer, x, target = _train_two_layer_model(5.0)
    layers = [layer for _, layer in fastlora.adapter_layers(model)]
    assert [layer.adapter.extra_stats()["active"] for layer in layers] == [0.0, 0.0]
    assert all(layer.adapter.score.item() < 0.1 for layer in layers)
    assert all(torch.count_nonzero(layer.adapter.lora_B) > 0 for layer in layers)  # they had learned
    # switched off, the model is the base model again, and the factors stay where they are
    fastlora.set_adapters_enabled(model, False)
    base = model(x)
    fastlora.set_adapters_enabled(model, True)
    assert torch.equal(model(x), base)
    factors = [t for layer in layers for t in (layer.adapter.lora_A, layer.adapter.lora_B)]
    before = [t.detach().clone() for t in factors]
    optimizer.zero_grad()
    F.mse_loss(model(x), target).backward()
    optimizer.step()
    assert all(torch.equal(t, f) for t, f in zip(factors, before))


def test_merge_unmerge_round_trip():
    layer = _layer(r=5, alpha=0.9)
    _randomise(layer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    layer.eval()
    before, weight = layer(x), layer.weight.detach().clone()
    delta = 0.9 / 5 * layer.adapter.lora_B.detach() @ layer.adapter.lora_A.detach()
    layer.merge()
    assert layer.merged and rel(layer.weight, weight + delta) < 1e-14
    assert rel(layer(x), before) < 1e-12
    layer.unmerge()
    assert rel(layer.weight, weight) < 1e-14 and rel(layer(x), before) < 1e-12
    merged = fastlora.merge_and_unload(nn.Sequential(layer))[0]
    assert type(merged) is nn.Linear and rel(merged(x), before) < 1e-12


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    def make():
        return nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64), nn.Tanh(),
                                     nn.Linear(D_OUT, 13, dtype=torch.float64))
    model = make()
    fresh = make()
    fresh.load_state_dict(model.state_dict())
    config = SelectiveLoraConfig(r=4, alpha=5.0, threshold=0.3, score_init=0.9, sparsity_weight=0.01)
    fastlora.inject(model, config)
    _randomise(model[0], score=0.6)
    _randomise(model[2], score=0.1)  # switched off
    x = torch.randn(N, D_IN, dtype=torch.float64)
    fastlora.save_adapter(model, tmp_path / "ckpt")
    assert fastlora.read_adapter_config(tmp_path / "ckpt") == config
    loaded = fastlora.load_adapter(fresh, tmp_path / "ckpt")
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].adapter.score.item() == 0.6 and loaded[2].adapter.extra_stats()["active"] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity_weight": -1.0}, "sparsity_weight must be a finite number >= 0, got -1.0"),
    ({"sparsity_weight": float("inf")}, "sparsity_weight"),
    ({"threshold": float("nan")}, "threshold must be a finite number, got nan"),
    ({"score_init": float("inf")}, "score_init must be a finite number, got inf"),
    ({"score_init": 0.05}, r"score_init=0.05 must be >= threshold=0.1"),
    ({"alpha": 0.0}, "alpha must be a finite number > 0"),
    ({"r": 0}, "r must be a positive int"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectiveLoraConfig(**kwargs)


def test_rank_larger_than_layer_raises():
    with pytest.raises(ValueError, match="r=30 exceeds min"):
        AdapterLinear(D_IN, D_OUT, config=SelectiveLoraConfig(r=30))



def _train_step_reads(layer, x) -> int:
    """Host reads of one forward + backward."""
    with HostReads() as reads:
        layer(x).sum().backward()
    return reads.count


def test_the_score_is_read_once_per_change_not_per_forward():
    layer = _layer()
    _randomise(layer)
    x = torch.randn(N, D_IN, dtype=torch.float64, requires_grad=True)
    assert _train_step_reads(layer, x) == 1  # the first forward reads the score
    assert _train_step_reads(layer, x) == 0
    assert _train_step_reads(layer.eval(), x) == 0
    layer.train()
    with torch.no_grad():
        layer.adapter.score.add_(0.5)  # an in-place change bumps the score's version
    assert _train_step_reads(layer, x) == 1 and _train_step_reads(layer, x) == 0


def _off_by_sgd_step(layer, x, hooks: bool):
    """One SGD step on the L1 penalty alone that drives the score from 0.15 below 0.1."""
    optimizer = torch.optim.SGD([layer.adapter.score], lr=1.0)
    if hooks:
        fastlora.attach_training_hooks(layer, optimizer)
    layer(x)
    fastlora.regularization_loss(layer).backward()
    optimizer.step()


@pytest.mark.parametrize("hooks", [False, True])
def test_an_optimizer_step_that_switches_the_block_off_is_seen(hooks):
    layer = _layer(score_init=0.15, sparsity_weight=0.1)
    _randomise(layer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert not torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    _off_by_sgd_step(layer, x, hooks)
    assert float(layer.adapter.score.detach()) == pytest.approx(0.05)
    for mode in (True, False):
        assert torch.equal(layer.train(mode)(x), F.linear(x, layer.weight, layer.bias))


class DataWritingSGD(torch.optim.SGD):
    """SGD that writes through .data, which the version counter does not see (as optimizers
    whose kernels write raw pointers)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.sub_(group["lr"] * p.grad)


def test_writes_the_version_counter_misses_need_the_hooks_or_refresh_gate():
    x = torch.randn(N, D_IN, dtype=torch.float64)
    layer = _layer(score_init=0.15, sparsity_weight=0.1)
    _randomise(layer)
    optimizer = DataWritingSGD([layer.adapter.score], lr=1.0)
    hooks = fastlora.attach_training_hooks(layer, optimizer)
    layer(x)
    fastlora.regularization_loss(layer).backward()
    optimizer.step()  # the hooks run after it and refresh the gate
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    hooks.remove()
    layer.adapter.score.data.fill_(1.0)
    layer.adapter.refresh_gate()
    a, b = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
    assert rel(layer(x), _formula(x, layer.weight, layer.bias, a, b, 1.0, 3.0 / 5)) < 1e-12


def test_load_state_dict_and_copies_see_the_new_score():
    layer = _layer()
    _randomise(layer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    on = layer(x)
    state = {k: v.clone() for k, v in layer.adapter.state_dict().items()}
    state["score"].fill_(-1.0)
    twin = copy.deepcopy(layer)
    layer.adapter.load_state_dict(state)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert torch.equal(twin(x), on)

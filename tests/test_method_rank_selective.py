"""CoDyRA (rank-selective LoRA) as the paper and the authors' code define it: per-rank importance w,
a proximal soft-threshold with an absolute, scheduled kappa after each optimizer step (dense phase,
then a staircase up to kappa_max), pruned ranks that revive until the schedule ends, then are dropped
while the kept ones train on without a threshold."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
import fastlora.layer
from fastlora import AdapterLinear, RankSelectiveLoraConfig

from utils import rel

D_IN, D_OUT, N = 37, 29, 11


def _layer(r=6, alpha=3.0, bias=True, **kwargs):
    torch.manual_seed(1)
    return AdapterLinear(D_IN, D_OUT, bias=bias, config=RankSelectiveLoraConfig(r=r, alpha=alpha, **kwargs),
                         dtype=torch.float64)


def _set(layer, importance):
    """Random A and B, the given w, active ranks refreshed."""
    adapter = layer.adapter
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn_like(adapter.lora_A))
        adapter.lora_B.copy_(torch.randn_like(adapter.lora_B))
        adapter.importance.copy_(torch.as_tensor(importance, dtype=adapter.importance.dtype))
    adapter.refresh_active_ranks()


def _formula(x, weight, bias, a, b, w, scale):
    """y = x W^T + b + s ((x A^T) ⊙ w) B^T (float64)."""
    y = x @ weight.T + scale * ((x @ a.T) * w) @ b.T
    return y if bias is None else y + bias


def _hand_grads(x, dy, a, b, w, scale):
    """(dA, dB, dw) of the formula: the full gradient, nonzero for a rank at w = 0 too."""
    t, dp = x @ a.T, dy @ b
    return scale * (dp * w).T @ x, scale * dy.T @ (t * w), scale * (dp * t).sum(0)


def _kappa(step, total, dense_fraction, levels, kappa_max):
    """The paper's schedule: 0 in the dense phase (at least one sparse step), then `levels` equal steps up
    to kappa_max at step `total`; 0 after it (the pruned set is final)."""
    dense = round(dense_fraction * total)
    if dense == total:
        dense -= 1
    if step <= dense or step > total:
        return 0.0
    for level in range(1, levels + 1):  # the first level whose share of the sparse steps reaches the step
        if (step - dense) * levels <= level * (total - dense):
            return kappa_max * level / levels
    raise AssertionError(step)


def _prox(w, kappa):
    """T_kappa(x) = 1(|x| > kappa) (x - sign(x) kappa), elementwise, float64."""
    return torch.tensor([0.0 if abs(v) <= kappa else v - math.copysign(kappa, v) for v in w.tolist()],
                        dtype=torch.float64)


def test_defaults_are_the_authors():
    config = RankSelectiveLoraConfig()
    assert (config.r, config.alpha, config.scale) == (16, None, 1.0)
    assert (config.total_steps, config.dense_fraction, config.threshold_levels, config.kappa_max) == \
        (None, 0.5, 50, 0.005)  # None: the run's length; kappa_max is the authors' peak over their 500 steps
    assert config.REFERENCE_STEPS == 500 and config.kappa(500, 500) == 0.005
    assert config.kappa(48, 48) == pytest.approx(0.005 * 500 / 48, rel=1e-15)
    assert RankSelectiveLoraConfig(r=4, alpha=2.0).scale == 0.5
    assert RankSelectiveLoraConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("total, fraction, levels, kappa_max", [(500, 0.5, 50, 0.005), (10, 0.5, 2, 0.1),
                                                                  (7, 0.0, 3, 0.3), (9, 0.3, 4, 1e-3),
                                                                  (2, 0.75, 1, 0.1), (1, 0.7, 3, 0.3)])
def test_threshold_schedule(total, fraction, levels, kappa_max):
    config = RankSelectiveLoraConfig(total_steps=total, dense_fraction=fraction, threshold_levels=levels,
                                     kappa_max=kappa_max)
    for step in range(0, total + 5):
        assert config.kappa(step) == pytest.approx(_kappa(step, total, fraction, levels, kappa_max), abs=1e-15)
    assert config.kappa(total) == kappa_max  # the last step of the schedule always thresholds by kappa_max
    assert config.kappa(total + 1) == 0.0 and config.kappa(total + 100) == 0.0  # then the pruned set is final
    if total == 10:  # by hand: 5 dense steps, 0.05 for steps 6-7, 0.1 for steps 8-10, then 0
        assert [config.kappa(t) for t in range(1, 13)] == [0.0] * 5 + [0.05] * 2 + [0.1] * 3 + [0.0] * 2
    if total == 2:  # round(0.75 * 2) = 2 dense steps would leave no sparse one: 1 dense step, then kappa_max
        assert config.dense_steps == 1 and [config.kappa(t) for t in range(1, 4)] == [0.0, 0.1, 0.0]
    if total == 1:  # round(0.7) = 1 dense step of 1: none, step 1 thresholds by kappa_max
        assert config.dense_steps == 0 and [config.kappa(t) for t in range(1, 3)] == [0.3, 0.0]


def test_initialisation_and_zero_b_reproduces_base_exactly():
    layer = _layer(r=5, importance_init=0.7)
    adapter = layer.adapter
    assert torch.equal(adapter.importance, torch.full((5,), 0.7, dtype=torch.float64))
    assert adapter.lora_A.shape == (5, D_IN) and adapter.lora_A.abs().max() > 0
    assert adapter.lora_B.shape == (D_OUT, 5) and torch.count_nonzero(adapter.lora_B) == 0
    assert torch.equal(adapter.active_index, torch.arange(5)) and adapter.extra_stats()["active_ranks"] == 5.0
    assert set(adapter.state_dict()) == {"importance", "lora_A", "lora_B", "optimizer_steps", "run_steps",
                                         "tasks_done"}
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_randn_importance_init_draws_from_the_default_generator():
    torch.manual_seed(3)
    layer = AdapterLinear(D_IN, D_OUT, config=RankSelectiveLoraConfig(importance_init="randn"), dtype=torch.float64)
    torch.manual_seed(3)
    nn.Linear(D_IN, D_OUT, dtype=torch.float64)  # the base layer's init
    nn.init.kaiming_uniform_(torch.empty(16, D_IN, dtype=torch.float64), a=math.sqrt(5))  # A
    expected = torch.randn(16, dtype=torch.float64)
    assert torch.equal(layer.adapter.importance.detach(), expected)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("importance", [[0.5, -1.2, 0.8, 2.0, -0.3, 1.1], [0.5, 0.0, 0.8, 0.0, 0.0, -1.1]])
def test_forward_and_full_grads_match_float64_formula(bias, importance):
    layer = _layer(r=6, alpha=2.0, bias=bias)
    _set(layer, importance)
    adapter, scale = layer.adapter, 2.0 / 6
    w = torch.tensor(importance, dtype=torch.float64)
    x = torch.randn(3, N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    ref = _formula(xr, layer.weight, layer.bias, a, b, w, scale)
    assert rel(out, ref) < 1e-10
    dy = torch.randn_like(out)
    gx, ga, gb, gw = torch.autograd.grad(out, [x, adapter.lora_A, adapter.lora_B, adapter.importance], dy)
    (rx,) = torch.autograd.grad(ref, [xr], dy)
    ha, hb, hw = _hand_grads(x.detach().reshape(-1, D_IN), dy.reshape(-1, D_OUT), a, b, w, scale)
    assert rel(gx, rx) < 1e-10 and rel(ga, ha) < 1e-10 and rel(gb, hb) < 1e-10 and rel(gw, hw) < 1e-10
    pruned = w == 0
    if pruned.any():  # a rank at 0 gets its gradient (it can revive); its A row and B column none
        assert gw[pruned].abs().min() > 0
        assert torch.count_nonzero(ga[pruned]) == 0 and torch.count_nonzero(gb[:, pruned]) == 0
    assert rel(layer.reference_forward(x), ref) < 1e-10


def _poisoned(layer, pruned):
    with torch.no_grad():  # any read of a pruned rank's factors would poison the output
        layer.adapter.lora_A[pruned] = float("nan")
        layer.adapter.lora_B[:, pruned] = float("nan")


def test_forwards_without_a_gradient_for_w_skip_pruned_ranks(monkeypatch):
    layer = _layer(r=6)
    _set(layer, [0.0, 1.5, 0.0, -0.7, 0.0, 0.0])
    adapter = layer.adapter
    keep, x = [1, 3], torch.randn(N, D_IN, dtype=torch.float64)
    ref = _formula(x, layer.weight, layer.bias, adapter.lora_A.detach()[keep], adapter.lora_B.detach()[:, keep],
                   adapter.importance.detach()[keep], 3.0 / 6)
    _poisoned(layer, [0, 2, 4, 5])
    seen = []
    op = fastlora.layer.adapted_linear
    monkeypatch.setattr(fastlora.layer, "adapted_linear",
                        lambda *args, **kwargs: seen.append(kwargs) or op(*args, **kwargs))
    with torch.no_grad():
        out = layer(x)
    assert seen[0]["lora_a"].shape == (2, D_IN) and seen[0]["rank_weights"].shape == (2,)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-10
    adapter.importance.requires_grad_(False)  # w frozen: no revival possible, compacted with grad on
    out = layer(x)
    out.sum().backward()
    assert rel(out, ref) < 1e-10 and torch.isfinite(adapter.lora_A.grad).all()


def test_after_the_schedule_pruned_ranks_are_dropped_and_never_computed():
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)),
                            RankSelectiveLoraConfig(r=4, alpha=4.0, total_steps=2, kappa_max=0.0))
    layer, adapter = model[0], model[0].adapter
    _set(layer, [0.3, 0.5, -0.4, 0.5])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(N, D_IN, dtype=torch.float64)

    def step():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    step()
    step()
    assert adapter.schedule_done
    with torch.no_grad():  # ranks 0 and 2 end the schedule at 0
        adapter.importance[[0, 2]] = 0.0
    adapter.refresh_active_ranks()
    assert torch.count_nonzero(optimizer.state[adapter.importance]["exp_avg"][[0, 2]]) == 2  # Adam would move them
    for _ in range(3):
        step()
        assert torch.equal(adapter.importance[[0, 2]].detach(), torch.zeros(2, dtype=torch.float64))
        assert adapter.active_index.tolist() == [1, 3]
        assert torch.count_nonzero(adapter.importance.grad[[0, 2]]) == 0  # never computed
    hooks.remove()


def test_no_active_rank_skips_the_low_rank_path():
    layer = _layer(r=4)
    _set(layer, [0.0] * 4)
    _poisoned(layer, slice(None))
    adapter = layer.adapter
    with torch.no_grad():
        assert adapter.op_arguments(layer.weight)["gate"] == 0.0 and adapter.extra_stats()["active_ranks"] == 0.0
    adapter.set_run_steps(5)  # a 5-step run (total_steps None: the run's length)
    adapter.optimizer_steps.fill_(5)  # schedule over: no revival, nothing computed with grad on
    adapter.refresh_host_copies()
    x = torch.randn(N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    dy = torch.randn_like(out)
    out.backward(dy)
    assert torch.equal(x.grad, dy @ layer.weight)
    for p in (adapter.lora_A, adapter.lora_B, adapter.importance):
        assert torch.equal(p.grad, torch.zeros_like(p))
    weight = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, weight)


def _train(config, importance, lr, steps, momentum=0.0, x=None):
    """Train a one-layer model with the hooks under SGD (with momentum); per step check A, B, w against the
    float64 paper update: the optimizer step from the full gradient, then the soft-threshold by the
    schedule's kappa; past total_steps the ranks at 0 after step total_steps get no gradient and stay 0
    (momentum would move them), the others are not thresholded.
    Returns per step (w before, w from the optimizer step alone, full gradient of w, expected w after)."""
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)), config)
    layer = model[0]
    _set(layer, importance)
    adapter = layer.adapter
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(N, D_IN, dtype=torch.float64) if x is None else x
    history, buffers, dropped = [], None, torch.zeros(config.r, dtype=torch.bool)
    for step in range(1, steps + 1):
        a, b, w = (t.detach().clone() for t in (adapter.lora_A, adapter.lora_B, adapter.importance))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        y = _formula(x, layer.weight, layer.bias, a, b, w, config.scale)
        ha, hb, hw = _hand_grads(x, 2 * y / y.numel(), a, b, w, config.scale)
        grads = (ha, hb, hw.masked_fill(dropped, 0.0))  # a dropped rank is not computed: no gradient
        buffers = grads if buffers is None else tuple(momentum * m + g for m, g in zip(buffers, grads))
        assert rel(adapter.lora_A.detach(), a - lr * buffers[0]) < 1e-12
        assert rel(adapter.lora_B.detach(), b - lr * buffers[1]) < 1e-12
        kappa = _kappa(step, config.total_steps, config.dense_fraction, config.threshold_levels, config.kappa_max)
        stepped = w - lr * buffers[2]
        expected = _prox(stepped, kappa).masked_fill(dropped, 0.0)
        assert torch.allclose(adapter.importance.detach(), expected, rtol=1e-12, atol=1e-15), step
        assert adapter.active_index.tolist() == torch.nonzero(expected).flatten().tolist()
        if step == config.total_steps:
            dropped = expected == 0
        history.append((w, stepped, hw, expected))
    hooks.remove()
    return history


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_steps_apply_the_scheduled_proximal_step_then_keep_the_pruned_set(momentum):
    """Twice total_steps: dense phase, staircase, then the ranks pruned at step 6 stay 0 although their
    full gradient (and momentum) would revive them, and the kept ones move by the optimizer alone."""
    config = RankSelectiveLoraConfig(r=5, total_steps=6, dense_fraction=0.5, threshold_levels=3, kappa_max=0.06)
    torch.manual_seed(4)
    history = _train(config, [0.9, 0.004, -0.6, -0.015, 0.3], lr=1e-2, steps=12, momentum=momentum,
                     x=torch.randn(N, D_IN, dtype=torch.float64) * 0.05)
    assert all(torch.count_nonzero(after) == 5 for *_, after in history[:3])  # dense phase: nothing pruned
    end = history[config.total_steps - 1][3]
    pruned = end == 0
    assert 1 <= int(pruned.sum()) <= 3  # kappa_max prunes the small ranks, keeps the large ones
    for w, stepped, grad, after in history[config.total_steps:]:
        assert torch.equal(after[pruned], torch.zeros(int(pruned.sum()), dtype=torch.float64))
        assert grad[pruned].abs().min() > 0  # its full gradient would move it off 0 (no threshold now)
        assert torch.all(after[~pruned] != 0) and torch.equal(after[~pruned], stepped[~pruned])  # no threshold
        assert torch.all(after[~pruned] != w[~pruned])  # still trained
    if momentum:  # the pruned ranks' momentum would move them each step: they are reset to 0
        assert all(torch.all(stepped[pruned] != 0) for _, stepped, _, _ in history[config.total_steps:])


def test_a_pruned_rank_revives_from_its_full_gradient():
    """A rank at 0 whose gradient step beats kappa comes back, in the dense phase and in the sparse one."""
    config = RankSelectiveLoraConfig(r=4, alpha=4.0, total_steps=4, dense_fraction=0.5, threshold_levels=2,
                                     kappa_max=1e-3)
    history = _train(config, [0.0, 0.8, 0.0, -0.5], lr=0.5, steps=4)
    before, *_, after = history[0]
    assert torch.equal(before[[0, 2]], torch.zeros(2, dtype=torch.float64))
    assert after[0] != 0 and after[2] != 0  # revived on step 1


def test_revival_after_a_prune_in_the_sparse_phase():
    config = RankSelectiveLoraConfig(r=3, alpha=3.0, total_steps=10, dense_fraction=0.0, threshold_levels=1,
                                     kappa_max=0.05)
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)), config)
    layer, adapter = model[0], model[0].adapter
    _set(layer, [0.01, 0.9, -0.7])
    optimizer = torch.optim.SGD([adapter.importance], lr=0.5)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    target = torch.randn(N, D_OUT, dtype=torch.float64)
    optimizer.zero_grad()
    adapter.importance.grad = torch.zeros(3, dtype=torch.float64)
    optimizer.step()  # zero gradient: only the proximal step acts; kappa 0.05 prunes rank 0
    assert adapter.importance[0] == 0 and adapter.active_index.tolist() == [1, 2]
    w = adapter.importance.detach().clone()
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    optimizer.zero_grad()
    F.mse_loss(model(x), target, reduction="sum").backward()
    y = _formula(x, layer.weight, layer.bias, a, b, w, 1.0)
    hw = _hand_grads(x, 2 * (y - target), a, b, w, 1.0)[2]
    assert abs(0.5 * hw[0]) > 0.05
    optimizer.step()
    assert torch.allclose(adapter.importance.detach(), _prox(w - 0.5 * hw, 0.05), rtol=1e-12, atol=0)
    assert adapter.importance[0] != 0 and adapter.active_index.tolist() == [0, 1, 2]
    hooks.remove()


def test_threshold_ignores_the_learning_rate_and_none_is_accepted():
    class NoLrSGD(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                group["lr"] = None
            return None

    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)),
                            RankSelectiveLoraConfig(r=3, importance_init=1.0, total_steps=1, dense_fraction=0.0,
                                                    threshold_levels=1, kappa_max=0.25))
    adapter = model[0].adapter
    optimizer = NoLrSGD([adapter.importance], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    optimizer.step()
    hooks.remove()
    assert torch.equal(adapter.importance.detach(), torch.full((3,), 0.75, dtype=torch.float64))


def test_merge_unmerge_round_trip():
    layer = _layer(r=5, alpha=0.9)
    _set(layer, [0.4, 0.0, -1.3, 0.7, 0.0])
    adapter = layer.adapter
    x = torch.randn(N, D_IN, dtype=torch.float64)
    before, weight = layer(x), layer.weight.detach().clone()
    delta = 0.9 / 5 * adapter.lora_B.detach() @ torch.diag(adapter.importance.detach()) @ adapter.lora_A.detach()
    layer.merge()
    assert layer.merged and rel(layer.weight, weight + delta) < 1e-14
    assert rel(layer(x), before) < 1e-12
    layer.unmerge()
    assert rel(layer.weight, weight) < 1e-14 and rel(layer(x), before) < 1e-12
    merged = fastlora.merge_and_unload(nn.Sequential(layer))[0]
    assert type(merged) is nn.Linear and rel(merged(x), before) < 1e-12


def test_save_load_round_trip_resumes_the_schedule(tmp_path):
    torch.manual_seed(0)
    def make():
        return nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64), nn.Tanh(),
                                     nn.Linear(D_OUT, 13, dtype=torch.float64))
    model, fresh = make(), make()
    fresh.load_state_dict(model.state_dict())
    config = RankSelectiveLoraConfig(r=4, alpha=5.0, importance_init=0.5, total_steps=4)
    fastlora.inject(model, config)
    _set(model[0], [0.3, 0.0, -0.2, 0.0])
    _set(model[2], [0.0, 0.0, 0.0, 0.0])
    model[0].adapter.optimizer_steps.fill_(4)
    model[0].adapter.refresh_active_ranks()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    fastlora.save_adapter(model, tmp_path / "ckpt")
    assert fastlora.read_adapter_config(tmp_path / "ckpt") == config
    loaded = fastlora.load_adapter(fresh, tmp_path / "ckpt")
    assert torch.equal(loaded[0].adapter.active_index, torch.tensor([0, 2]))
    assert loaded[0].adapter.schedule_done and not loaded[2].adapter.schedule_done
    assert loaded[2].adapter.extra_stats()["active_ranks"] == 0.0
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"kappa_max": -1e-3}, "kappa_max must be a finite number >= 0, got -0.001"),
    ({"kappa_max": float("nan")}, "kappa_max"),
    ({"total_steps": 0}, "total_steps must be an int > 0, got 0"),
    ({"threshold_levels": 2.0}, "threshold_levels must be an int > 0, got 2.0"),
    ({"dense_fraction": 1.0}, r"dense_fraction must be a number in \[0, 1\), got 1.0"),
    ({"importance_init": 0.0}, "importance_init must be a finite nonzero number or 'randn' .*got 0.0"),
    ({"importance_init": "normal"}, "importance_init must be a finite nonzero number or 'randn' .*got 'normal'"),
    ({"importance_init": float("inf")}, "importance_init must be a finite nonzero number .*got inf"),
    ({"alpha": -2.0}, "alpha must be a finite number > 0"),
    ({"use_rslora": 1}, "use_rslora must be True or False, got 1"),
    ({"r": 0}, "r must be a positive int"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankSelectiveLoraConfig(**kwargs)


def test_rank_larger_than_layer_raises():
    with pytest.raises(ValueError, match="r=30 exceeds min"):
        AdapterLinear(D_IN, D_OUT, config=RankSelectiveLoraConfig(r=30))


def test_past_the_schedule_the_pruned_set_is_final_and_nothing_is_thresholded():
    """A 2-step schedule of kappa 0.25 (no dense step), w moved by hand as an optimizer would between the
    proximal steps. During the schedule a rank at 0 revives; after it the ranks at 0 at step 2 are reset
    to 0 whatever the optimizer did and the kept ones keep exactly the optimizer's value. No warning."""
    config = RankSelectiveLoraConfig(r=3, importance_init=1.0, total_steps=2, dense_fraction=0.0, threshold_levels=1,
                                     kappa_max=0.25)
    adapter = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)), config)[0].adapter

    def optimizer_moves_w_to(values):
        with torch.no_grad():  # in place, as optimizer.step() does (active ranks not refreshed)
            adapter.importance.copy_(torch.tensor(values, dtype=torch.float64))

    def w():
        return adapter.importance.detach().tolist()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer_moves_w_to([1.0, 0.375, -0.125])
        adapter.after_optimizer_step(0.1)
        assert w() == [0.75, 0.125, 0.0] and adapter.active_index.tolist() == [0, 1]
        optimizer_moves_w_to([0.75, 0.125, -0.5])  # rank 2 revived by its gradient: the schedule still runs
        adapter.after_optimizer_step(0.1)
        assert w() == [0.5, 0.0, -0.25] and adapter.active_index.tolist() == [0, 2] and adapter.schedule_done
        for step, values in enumerate([[0.6, 0.9, -0.3], [0.1, -0.4, -0.01], [2.0, 1e-3, 0.2]], start=3):
            optimizer_moves_w_to(values)  # rank 1 pushed off 0 (momentum, weight decay, a revival)
            adapter.after_optimizer_step(0.1)
            assert w() == [values[0], 0.0, values[2]]  # kept ranks not thresholded, rank 1 stays dropped
            assert adapter.active_index.tolist() == [0, 2] and int(adapter.optimizer_steps) == step
            assert adapter.extra_stats() == {"active_ranks": 2.0, "kappa": 0.0, "optimizer_steps": float(step),
                                               "total_steps": 2.0}

"""CoDyRA (rank-selective LoRA) against METHODS.md: per-rank importance lambda, proximal
soft-threshold after each optimizer step, pruned ranks never computed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
import fastlora.layer
from fastlora import AdapterLinear, RankSelectiveLoraConfig

D_IN, D_OUT, N = 37, 29, 11


def _rel(out, ref):
    return float((out - ref).detach().norm() / ref.detach().norm())


def _layer(r=6, alpha=3.0, bias=True, **kwargs):
    torch.manual_seed(1)
    return AdapterLinear(D_IN, D_OUT, bias=bias, config=RankSelectiveLoraConfig(r=r, alpha=alpha, **kwargs),
                         dtype=torch.float64)


def _set(layer, importance):
    """Random A and B, the given lambda, active ranks refreshed."""
    adapter = layer.adapter
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn_like(adapter.lora_A))
        adapter.lora_B.copy_(torch.randn_like(adapter.lora_B))
        adapter.importance.copy_(torch.as_tensor(importance, dtype=adapter.importance.dtype))
    adapter.refresh_active_ranks()


def _formula(x, weight, bias, a, b, lam, scale):
    """y = x W^T + b + s ((x A^T) ⊙ lambda) B^T (float64)."""
    y = x @ weight.T + scale * ((x @ a.T) * lam) @ b.T
    return y if bias is None else y + bias


def _hand_grads(x, dy, a, b, lam, scale):
    """(dA, dB, dlambda) of the formula, zeroed on pruned ranks (lambda == 0)."""
    t, dp = x @ a.T, dy @ b
    active = (lam != 0).to(x.dtype)
    return (scale * (dp * lam).T @ x, scale * dy.T @ (t * lam), scale * (dp * t).sum(0) * active)


def _soft_threshold(lam, threshold):
    return torch.tensor([0.0 if abs(v) <= threshold else (v - threshold if v > 0 else v + threshold)
                         for v in lam.tolist()], dtype=lam.dtype)


def test_initialisation_and_zero_b_reproduces_base_exactly():
    layer = _layer(r=5, importance_init=0.7)
    adapter = layer.adapter
    assert torch.equal(adapter.importance, torch.full((5,), 0.7, dtype=torch.float64))
    assert adapter.lora_A.shape == (5, D_IN) and adapter.lora_A.abs().max() > 0
    assert adapter.lora_B.shape == (D_OUT, 5) and torch.count_nonzero(adapter.lora_B) == 0
    assert torch.equal(adapter.active_index, torch.arange(5)) and adapter.extra_stats() == {"active_ranks": 5.0}
    assert set(adapter.state_dict()) == {"importance", "lora_A", "lora_B"}
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("importance", [[0.5, -1.2, 0.8, 2.0, -0.3, 1.1], [0.5, 0.0, 0.8, 0.0, 0.0, -1.1]])
def test_forward_and_grads_match_float64_formula(bias, importance):
    layer = _layer(r=6, alpha=2.0, bias=bias)
    _set(layer, importance)
    adapter, scale = layer.adapter, 2.0 / 6
    lam = torch.tensor(importance, dtype=torch.float64)
    x = torch.randn(3, N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    ref = _formula(xr, layer.weight, layer.bias, a, b, lam, scale)
    base = F.linear(x, layer.weight, layer.bias).detach()
    assert _rel(out, ref) < 1e-10 and _rel(out - base, ref - base) < 1e-10
    dy = torch.randn_like(out)
    gx, ga, gb, gl = torch.autograd.grad(out, [x, adapter.lora_A, adapter.lora_B, adapter.importance], dy)
    (rx,) = torch.autograd.grad(ref, [xr], dy)
    ha, hb, hl = _hand_grads(x.detach().reshape(-1, D_IN), dy.reshape(-1, D_OUT), a, b, lam, scale)
    assert _rel(gx, rx) < 1e-10 and _rel(ga, ha) < 1e-10 and _rel(gb, hb) < 1e-10 and _rel(gl, hl) < 1e-10
    pruned = lam == 0
    # pruned ranks: exact zeros (not None) for their lambda, A rows and B columns
    assert torch.equal(gl[pruned], torch.zeros(int(pruned.sum()), dtype=torch.float64))
    assert torch.count_nonzero(ga[pruned]) == 0 and torch.count_nonzero(gb[:, pruned]) == 0
    assert _rel(layer.reference_forward(x), ref) < 1e-10


def test_pruned_ranks_are_never_computed(monkeypatch):
    layer = _layer(r=6)
    _set(layer, [0.0, 1.5, 0.0, -0.7, 0.0, 0.0])
    adapter = layer.adapter
    with torch.no_grad():  # any read of a pruned rank's factors would poison the output
        adapter.lora_A[[0, 2, 4, 5]] = float("nan")
        adapter.lora_B[:, [0, 2, 4, 5]] = float("nan")
    seen = []
    op = fastlora.layer.adapted_linear
    monkeypatch.setattr(fastlora.layer, "adapted_linear",
                        lambda *args, **kwargs: seen.append(kwargs) or op(*args, **kwargs))
    x = torch.randn(N, D_IN, dtype=torch.float64)
    out = layer(x)
    assert seen[0]["lora_a"].shape == (2, D_IN) and seen[0]["lora_b"].shape == (D_OUT, 2)
    assert seen[0]["rank_weights"].shape == (2,) and adapter.extra_stats() == {"active_ranks": 2.0}
    keep = [1, 3]
    ref = _formula(x, layer.weight, layer.bias, adapter.lora_A.detach()[keep], adapter.lora_B.detach()[:, keep],
                   adapter.importance.detach()[keep], 3.0 / 6)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-10
    out.sum().backward()
    assert torch.isfinite(adapter.lora_A.grad).all() and torch.isfinite(adapter.lora_B.grad).all()


def test_no_active_rank_skips_the_low_rank_path():
    layer = _layer(r=4)
    _set(layer, [0.0] * 4)
    adapter = layer.adapter
    with torch.no_grad():
        adapter.lora_A.fill_(float("nan"))
        adapter.lora_B.fill_(float("nan"))
    assert adapter.op_arguments(layer.weight)["gate"] == 0.0 and adapter.extra_stats() == {"active_ranks": 0.0}
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


def test_sgd_steps_apply_the_proximal_soft_threshold():
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)),
                            RankSelectiveLoraConfig(r=5, alpha=5.0, sparsity_strength=2.0))
    layer = model[0]
    _set(layer, [0.9, 0.004, -0.6, -0.015, 0.3])
    adapter, scale = layer.adapter, 1.0
    lr = 1e-2  # threshold lr * mu = 0.02 prunes ranks 1 and 3 on the first step
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(N, D_IN, dtype=torch.float64) * 0.05
    for step in range(3):
        a, b, lam = (t.detach().clone() for t in (adapter.lora_A, adapter.lora_B, adapter.importance))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        y = _formula(x, layer.weight, layer.bias, a, b, lam, scale)
        ha, hb, hl = _hand_grads(x, 2 * y / y.numel(), a, b, lam, scale)
        assert _rel(adapter.lora_A.detach(), a - lr * ha) < 1e-12
        assert _rel(adapter.lora_B.detach(), b - lr * hb) < 1e-12
        expected = _soft_threshold(lam - lr * hl, lr * 2.0)
        assert _rel(adapter.importance.detach(), expected) < 1e-12
        assert torch.equal(adapter.importance[[1, 3]].detach(), torch.zeros(2, dtype=torch.float64))
        assert torch.equal(adapter.active_index, torch.tensor([0, 2, 4]))
        assert adapter.extra_stats() == {"active_ranks": 3.0}
        if step:  # pruned ranks get no gradient, so their A rows and B columns stay put
            assert torch.equal(adapter.lora_A[[1, 3]], a[[1, 3]])
            assert torch.equal(adapter.lora_B[:, [1, 3]], b[:, [1, 3]])
    hooks.remove()


def test_threshold_uses_lambdas_own_learning_rate():
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)),
                            RankSelectiveLoraConfig(r=3, sparsity_strength=1.0))
    adapter = model[0].adapter
    optimizer = torch.optim.SGD([{"params": [adapter.lora_A, adapter.lora_B], "lr": 0.5},
                                 {"params": [adapter.importance], "lr": 0.1}])
    hooks = fastlora.attach_training_hooks(model, optimizer)
    optimizer.zero_grad()
    model(torch.randn(N, D_IN, dtype=torch.float64)).sum().backward()
    assert torch.count_nonzero(adapter.importance.grad) == 0  # B = 0 at start
    optimizer.step()
    hooks.remove()
    assert torch.allclose(adapter.importance.detach(), torch.full((3,), 0.9, dtype=torch.float64), atol=1e-15)


def test_pruned_ranks_never_revive_under_adam():
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64)),
                            RankSelectiveLoraConfig(r=4, sparsity_strength=0.0))
    adapter = model[0].adapter
    _set(model[0], [0.3, 0.5, -0.4, 0.5])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(N, D_IN, dtype=torch.float64)

    def step():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    step()
    step()
    with torch.no_grad():  # prune ranks 0 and 2, as a proximal step would
        adapter.importance[[0, 2]] = 0.0
    adapter.refresh_active_ranks()
    momentum = optimizer.state[adapter.importance]["exp_avg"]
    assert torch.count_nonzero(momentum[[0, 2]]) == 2  # Adam alone would move them off 0
    for _ in range(3):
        step()
        assert torch.equal(adapter.importance[[0, 2]].detach(), torch.zeros(2, dtype=torch.float64))
        assert adapter.active_index.tolist() == [1, 3]
    hooks.remove()


def test_merge_unmerge_round_trip():
    layer = _layer(r=5, alpha=0.9)
    _set(layer, [0.4, 0.0, -1.3, 0.7, 0.0])
    adapter = layer.adapter
    x = torch.randn(N, D_IN, dtype=torch.float64)
    before, weight = layer(x), layer.weight.detach().clone()
    delta = 0.9 / 5 * adapter.lora_B.detach() @ torch.diag(adapter.importance.detach()) @ adapter.lora_A.detach()
    layer.merge()
    assert layer.merged and _rel(layer.weight, weight + delta) < 1e-14
    assert _rel(layer(x), before) < 1e-12
    layer.unmerge()
    assert _rel(layer.weight, weight) < 1e-14 and _rel(layer(x), before) < 1e-12
    merged = fastlora.merge_and_unload(nn.Sequential(layer))[0]
    assert type(merged) is nn.Linear and _rel(merged(x), before) < 1e-12


def test_save_load_round_trip_recomputes_active_ranks(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(D_IN, D_OUT, dtype=torch.float64), nn.Tanh(),
                                 nn.Linear(D_OUT, 13, dtype=torch.float64))
    model, fresh = make(), make()
    fresh.load_state_dict(model.state_dict())
    config = RankSelectiveLoraConfig(r=4, alpha=5.0, importance_init=0.5, sparsity_strength=0.01)
    fastlora.inject(model, config)
    _set(model[0], [0.3, 0.0, -0.2, 0.0])
    _set(model[2], [0.0, 0.0, 0.0, 0.0])
    x = torch.randn(N, D_IN, dtype=torch.float64)
    fastlora.save_adapter(model, tmp_path / "ckpt")
    assert fastlora.read_adapter_config(tmp_path / "ckpt") == config
    loaded = fastlora.load_adapter(fresh, tmp_path / "ckpt")
    assert torch.equal(loaded[0].adapter.active_index, torch.tensor([0, 2]))
    assert loaded[2].adapter.extra_stats() == {"active_ranks": 0.0}
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity_strength": -1e-3}, "sparsity_strength must be a finite number >= 0, got -0.001"),
    ({"sparsity_strength": float("nan")}, "sparsity_strength"),
    ({"importance_init": 0.0}, "importance_init must be a finite nonzero number .*got 0.0"),
    ({"importance_init": float("inf")}, "importance_init must be a finite nonzero number .*got inf"),
    ({"alpha": -2.0}, "alpha must be a finite number > 0"),
    ({"r": 0}, "r must be a positive int"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RankSelectiveLoraConfig(**kwargs)


def test_rank_larger_than_layer_raises():
    with pytest.raises(ValueError, match="r=30 exceeds min"):
        AdapterLinear(D_IN, D_OUT, config=RankSelectiveLoraConfig(r=30))

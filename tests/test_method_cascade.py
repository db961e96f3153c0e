"""LoRASC (slow cascaded LoRA) against METHODS.md: stacked cascade forward, cascade schedule
driven by real optimizer steps, slow-fast update, noisy fresh pairs, capacity recompression,
merge/unmerge, save/load mid-cascade."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import AdapterLinear, CascadeLoraConfig

D_IN, D_OUT, N = 37, 29, 11


def _rel(out, ref):
    return float((out - ref).detach().norm() / ref.detach().norm())


def _layer(r=4, alpha=3.0, bias=True, d_in=D_IN, d_out=D_OUT, **kwargs):
    torch.manual_seed(1)
    return AdapterLinear(d_in, d_out, bias=bias, config=CascadeLoraConfig(r=r, alpha=alpha, **kwargs),
                         dtype=torch.float64)


def _randomise_pair(adapter):
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn_like(adapter.lora_A))
        adapter.lora_B.copy_(torch.randn_like(adapter.lora_B))


def _fold_random_pairs(layer, count):
    """Randomise the fast pair and run a cascade step, ``count`` times; returns the pairs
    (A_j, B_j) as they were when folded."""
    history = []
    for _ in range(count):
        _randomise_pair(layer.adapter)
        history.append((layer.adapter.lora_A.detach().clone(), layer.adapter.lora_B.detach().clone()))
        layer.adapter.cascade_step()
    return history


def _tiny_model(config):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(D_IN, D_OUT, dtype=torch.float64))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(D_OUT, 7, bias=False, dtype=torch.float64))
    base = copy.deepcopy(model)
    return fastlora.inject(model, config), base


def test_initialisation_and_zero_noise_reproduces_base_exactly():
    layer = _layer(r=4, max_cascades=3)
    adapter = layer.adapter
    assert adapter.lora_A.shape == (4, D_IN) and adapter.lora_B.shape == (D_OUT, 4)
    assert adapter.folded_A.shape == (12, D_IN) and adapter.folded_B.shape == (D_OUT, 12)
    assert torch.count_nonzero(adapter.folded_A) == 0 and torch.count_nonzero(adapter.folded_B) == 0
    bound = 1.0 / math.sqrt(D_IN)  # kaiming_uniform(a=sqrt 5)
    assert 0.5 * bound < adapter.lora_A.abs().max() <= bound
    assert torch.count_nonzero(adapter.lora_B) == 0
    assert set(adapter.state_dict()) == {"lora_A", "lora_B", "folded_A", "folded_B", "optimizer_steps", "cascades"}
    assert [n for n, _ in adapter.named_parameters()] == ["lora_A", "lora_B"]
    assert adapter.extra_stats() == {"cascades": 0.0, "folded_rank": 0.0, "optimizer_steps": 0.0}
    assert CascadeLoraConfig().slow_momentum == 0.5 and CascadeLoraConfig().noise_std == 0.0
    x = torch.randn(N, D_IN, dtype=torch.float64)
    for mode in (True, False):
        layer.train(mode)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_after_cascades_match_float64_formula(bias):
    layer = _layer(r=3, alpha=5.0, bias=bias, slow_momentum=0.3, max_cascades=4)
    adapter, scale, keep = layer.adapter, 5.0 / 3, 0.7
    history = _fold_random_pairs(layer, 3)
    _randomise_pair(adapter)
    assert adapter.folded_rank == 9
    x = torch.randn(2, N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    a = adapter.lora_A.detach().clone().requires_grad_(True)
    b = adapter.lora_B.detach().clone().requires_grad_(True)
    # y = x W^T + b + s sum_j (1 - m) (x A_j^T) B_j^T + s (x A^T) B^T
    ref = xr @ layer.weight.T + scale * (xr @ a.T) @ b.T
    for a_j, b_j in history:
        ref = ref + scale * keep * (xr @ a_j.T) @ b_j.T
    if bias:
        ref = ref + layer.bias
    assert _rel(out, ref) < 1e-10
    base = F.linear(x, layer.weight, layer.bias).detach()
    assert _rel(out - base, ref - base) < 1e-10
    dy = torch.randn_like(out)
    gx, ga, gb = torch.autograd.grad(out, [x, adapter.lora_A, adapter.lora_B], dy)
    rx, ra, rb = torch.autograd.grad(ref, [xr, a, b], dy)
    assert _rel(gx, rx) < 1e-10 and _rel(ga, ra) < 1e-10 and _rel(gb, rb) < 1e-10
    assert not adapter.folded_A.requires_grad and not adapter.folded_B.requires_grad


def test_folded_pairs_are_stacked_into_one_fused_call():
    layer = _layer(r=3, max_cascades=4)
    args = layer.adapter.op_arguments(layer.weight)
    assert args["lora_a"] is layer.adapter.lora_A  # nothing folded: the fast pair alone
    _fold_random_pairs(layer, 2)
    args = layer.adapter.op_arguments(layer.weight)
    assert args["lora_a"].shape == (9, D_IN) and args["lora_b"].shape == (D_OUT, 9)  # unused slots not computed
    assert torch.equal(args["lora_a"][6:], layer.adapter.lora_A)
    assert torch.equal(args["lora_b"][:, :6], layer.adapter.folded_B[:, :6])


def test_triton_backend_serves_the_stacked_cascade():
    """fp32 through the Triton kernels (interpreter on CPU) against the float64 formula."""
    pytest.importorskip("triton")
    torch.manual_seed(2)
    layer = AdapterLinear(D_IN, D_OUT, config=CascadeLoraConfig(r=3, backend="triton", max_cascades=2))
    _fold_random_pairs(layer, 3)  # one recompression included
    _randomise_pair(layer.adapter)
    x = torch.randn(N, D_IN, requires_grad=True)
    out = layer(x)
    dy = torch.randn_like(out)
    gx, ga, gb = torch.autograd.grad(out, [x, layer.adapter.lora_A, layer.adapter.lora_B], dy)
    f64 = {k: v.detach().double() for k, v in layer.adapter.state_dict().items()}
    a, b = f64["lora_A"].requires_grad_(True), f64["lora_B"].requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    scale = layer.adapter.scale
    ref = xr @ layer.weight.double().T + layer.bias.double() + scale * (
        (xr @ f64["folded_A"].T) @ f64["folded_B"].T + (xr @ a.T) @ b.T)
    rx, ra, rb = torch.autograd.grad(ref, [xr, a, b], dy.double())
    assert _rel(out.double(), ref) < 1e-5
    assert _rel(gx.double(), rx) < 1e-5 and _rel(ga.double(), ra) < 1e-5 and _rel(gb.double(), rb) < 1e-5


@pytest.mark.parametrize("momentum", [0.0, 0.35, 0.8])
def test_slow_fast_update_by_hand(momentum):
    """slow = W + s B_f A_f, fast = slow + s B A; a cascade step gives slow <- m slow + (1 - m) fast,
    and the fast weights restart from it (fresh B = 0)."""
    layer = _layer(r=3, alpha=2.0, slow_momentum=momentum, max_cascades=5)
    adapter, scale = layer.adapter, 2.0 / 3
    _fold_random_pairs(layer, 2)
    _randomise_pair(adapter)
    with torch.no_grad():
        k = adapter.folded_rank
        slow = layer.weight + scale * adapter.folded_B[:, :k] @ adapter.folded_A[:k]
        fast = slow + scale * adapter.lora_B @ adapter.lora_A
        old_a = adapter.lora_A.clone()
    adapter.cascade_step()
    with torch.no_grad():
        k = adapter.folded_rank
        new_slow = layer.weight + scale * adapter.folded_B[:, :k] @ adapter.folded_A[:k]
    expected = momentum * slow + (1 - momentum) * fast
    assert _rel(new_slow, expected) < 1e-13
    assert _rel(layer.weight + adapter.delta_weight(layer.weight), expected) < 1e-13
    assert torch.count_nonzero(adapter.lora_B) == 0
    assert not torch.equal(adapter.lora_A, old_a) and adapter.lora_A.abs().max() <= 1.0 / math.sqrt(D_IN)


def test_cascade_schedule_with_real_optimizer_and_hooks():
    """interval 3: cascade steps exactly after optimizer steps 3, 6, 9; in between the pair
    follows plain SGD and the folded pairs do not move."""
    config = CascadeLoraConfig(r=4, alpha=4.0, cascade_interval=3, slow_momentum=0.25, max_cascades=3)
    model, _ = _tiny_model(config)
    lr = 0.05
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    torch.manual_seed(3)
    x, target = torch.randn(N, D_IN, dtype=torch.float64), torch.randn(N, 7, dtype=torch.float64)
    layers = [layer for _, layer in fastlora.adapter_layers(model)]
    for step in range(1, 11):
        before = [(layer.adapter.folded_A.clone(), layer.adapter.folded_B.clone(), layer.adapter.folded_rank)
                  for layer in layers]
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        stepped = [(layer.adapter.lora_A - lr * layer.adapter.lora_A.grad,
                    layer.adapter.lora_B - lr * layer.adapter.lora_B.grad) for layer in layers]
        assert all(torch.count_nonzero(layer.adapter.lora_B.grad) > 0 for layer in layers)
        optimizer.step()
        for layer, (fa, fb, k), (a, b) in zip(layers, before, stepped):
            adapter = layer.adapter
            assert adapter.extra_stats()["optimizer_steps"] == step
            assert int(adapter.optimizer_steps) == step and int(adapter.cascades) == step // 3
            if step % 3:
                assert adapter.folded_rank == k
                assert torch.equal(adapter.folded_A, fa) and torch.equal(adapter.folded_B, fb)
                assert _rel(adapter.lora_A, a) < 1e-14 and _rel(adapter.lora_B, b) < 1e-14
            else:
                assert adapter.folded_rank == k + 4
                assert torch.equal(adapter.folded_A[:k], fa[:k]) and torch.equal(adapter.folded_B[:, :k], fb[:, :k])
                assert _rel(adapter.folded_A[k:k + 4], a) < 1e-14
                assert _rel(adapter.folded_B[:, k:k + 4], 0.75 * b) < 1e-14
                assert torch.count_nonzero(adapter.lora_B) == 0
    assert [layer.adapter.extra_stats()["cascades"] for layer in layers] == [3.0, 3.0]
    hooks.remove()


def test_noise_of_fresh_pairs_has_the_configured_std():
    std, r, d_in, d_out = 0.3, 8, 64, 400
    layer = _layer(r=r, alpha=8.0, d_in=d_in, d_out=d_out, noise_std=std, max_cascades=3)
    adapter = layer.adapter
    x = torch.randn(N, d_in, dtype=torch.float64)
    # the first pair starts noisy too, and the noise is part of the forward
    ref = F.linear(x, layer.weight, layer.bias) + 1.0 * (x @ adapter.lora_A.T) @ adapter.lora_B.T
    assert _rel(layer(x), ref) < 1e-12
    draws = []
    for _ in range(3):
        b = adapter.lora_B.detach().clone()
        assert abs(float(b.mean())) < 5 * std / math.sqrt(b.numel())
        assert abs(float(b.std()) / std - 1) < 0.06
        draws.append(b)
        adapter.cascade_step()
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert adapter.lora_A.abs().max() <= 1.0 / math.sqrt(d_in)
    # the noise of a folded pair is kept with weight (1 - m), like any fast update
    assert torch.equal(adapter.folded_B[:, :r], 0.5 * draws[0])


def _truncate(delta, rank):
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_beyond_max_cascades_the_fold_is_recompressed_to_best_rank():
    layer = _layer(r=3, alpha=3.0, slow_momentum=0.2, max_cascades=2)
    adapter = layer.adapter
    history = _fold_random_pairs(layer, 4)
    assert adapter.folded_rank == 6 and adapter.extra_stats()["cascades"] == 4.0
    folded = adapter.folded_B @ adapter.folded_A
    pairs = [0.8 * b @ a for a, b in history]
    expected = _truncate(_truncate(pairs[0] + pairs[1] + pairs[2], 6) + pairs[3], 6)
    assert _rel(folded, expected) < 1e-12
    # the folded update keeps rank r * max_cascades: more than any single pair
    assert torch.linalg.matrix_rank(folded) == 6


def test_recompression_is_exact_when_capacity_covers_the_layer():
    layer = _layer(r=3, alpha=3.0, d_in=7, d_out=5, slow_momentum=0.0, max_cascades=2)
    history = _fold_random_pairs(layer, 5)
    folded = layer.adapter.folded_B @ layer.adapter.folded_A
    assert _rel(folded, sum(b @ a for a, b in history)) < 1e-12


def test_merge_unmerge_round_trip():
    layer = _layer(r=3, alpha=2.0, max_cascades=2)
    _fold_random_pairs(layer, 3)
    _randomise_pair(layer.adapter)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    before = layer(x).detach()
    weight = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and _rel(layer(x), before) < 1e-12
    layer.unmerge()
    assert not layer.merged and _rel(layer.weight, weight) < 1e-14 and _rel(layer(x), before) < 1e-12
    merged = fastlora.merge_and_unload(nn.Sequential(layer))[0]
    assert type(merged) is nn.Linear and _rel(merged(x), before) < 1e-12


def _train(model, steps, seed):
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    for _ in range(steps):
        x, target = torch.randn(N, D_IN, dtype=torch.float64), torch.randn(N, 7, dtype=torch.float64)
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    hooks.remove()


def test_save_load_mid_cascade_resumes_the_schedule(tmp_path):
    config = CascadeLoraConfig(r=3, alpha=3.0, cascade_interval=3, slow_momentum=0.4, noise_std=0.05,
                               max_cascades=2)
    model, base = _tiny_model(config)
    _train(model, 8, seed=5)  # cascades after steps 3 and 6; 2 steps into the third stage
    assert model.up.adapter.extra_stats() == {"cascades": 2.0, "folded_rank": 6.0, "optimizer_steps": 8.0}
    fastlora.save_adapter(model, tmp_path / "ckpt")
    fresh = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ckpt")
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    for name in ("up", "down"):
        original, loaded = model.get_submodule(name).adapter, fresh.get_submodule(name).adapter
        assert loaded.extra_stats() == original.extra_stats()
        for key, tensor in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), key
    # both continue identically: the next cascade comes after step 9, then 12 (recompressed)
    _train(model, 5, seed=6)
    _train(fresh, 5, seed=6)
    assert fresh.up.adapter.extra_stats() == {"cascades": 4.0, "folded_rank": 6.0, "optimizer_steps": 13.0}
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("kwargs", [
    {"r": 0}, {"cascade_interval": 0}, {"cascade_interval": -2}, {"cascade_interval": 2.5},
    {"cascade_interval": True}, {"slow_momentum": 1.0}, {"slow_momentum": -0.1},
    {"slow_momentum": "0.5"}, {"slow_momentum": float("nan")}, {"noise_std": -0.1},
    {"noise_std": float("inf")}, {"max_cascades": 0}, {"max_cascades": 1.5}, {"max_cascades": False},
])
def test_bad_config_values_raise_clear_errors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        CascadeLoraConfig(**kwargs)


def test_config_round_trip_and_rank_check():
    config = CascadeLoraConfig(r=2, cascade_interval=7, slow_momentum=0.1, noise_std=0.01, max_cascades=3)
    assert fastlora.AdapterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="r=6"):
        AdapterLinear(5, 40, config=CascadeLoraConfig(r=6))


def test_cascade_step_drops_the_optimizer_state_of_the_fresh_pair():
    model, _ = _tiny_model(CascadeLoraConfig(r=2, cascade_interval=2))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(5, D_IN, dtype=torch.float64)
    for step in (1, 2):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
        has_state = [p in optimizer.state for p in params]
        assert all(has_state) if step == 1 else not any(has_state)
    hooks.remove()

"""LoRASC (slow cascaded LoRA) as the paper reads: each stage folds (1 - m) s B A into W in place
(rank grows without limit, forward stays rank r), NoisyTune noise on W at each stage's first training
forward (per-matrix std, seeded), dropout on the fast pair only, stages driven by optimizer steps, merge/unmerge,
save/load mid-stage. The record, checkpoints and undo: tests/test_cascade_fold.py."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
import fastlora.layer
from fastlora import AdapterLinear, CascadeLoraConfig

from utils import rel

D_IN, D_OUT, N = 37, 29, 11
MIX = 1_000_003


def _layer(r=4, alpha=3.0, bias=True, d_in=D_IN, d_out=D_OUT, dtype=torch.float64, **kwargs):
    torch.manual_seed(1)
    return AdapterLinear(d_in, d_out, bias=bias, config=CascadeLoraConfig(r=r, alpha=alpha, **kwargs), dtype=dtype)


def _pretrained(bias=True, d_in=D_IN, d_out=D_OUT, dtype=torch.float64):
    """The W ``_layer`` starts from (the same seeded nn.Linear), before its stage-0 noise."""
    torch.manual_seed(1)
    return nn.Linear(d_in, d_out, bias=bias, dtype=dtype).weight.detach()


def _randomise_pair(adapter):
    with torch.no_grad():
        adapter.lora_A.copy_(torch.randn_like(adapter.lora_A))
        adapter.lora_B.copy_(torch.randn_like(adapter.lora_B))


def _noise(w, intensity, seed, layer_index, stage):
    """NoisyTune: (U - 1/2) * lambda * std(W), U ~ U[0,1) float32 from the documented seed (float64)."""
    g = torch.Generator().manual_seed(((seed * MIX + layer_index) * MIX + stage) % 2**63)
    u = torch.rand(w.shape, generator=g, dtype=torch.float32).double()
    return (u - 0.5) * intensity * float(w.detach().double().std())


def _start(layer):
    """One forward in training mode: the current stage starts training (its noise goes into W)."""
    with torch.no_grad():
        layer.train()(torch.zeros(1, layer.in_features, dtype=layer.weight.dtype))


def _stages(layer, count, intensity, seed=0, layer_index=0, momentum=0.5, pretrained=None):
    """Run ``count`` stages with random fast pairs, each started by a training forward, then start the
    next; returns the float64 W the paper gives from the pretrained W (``_pretrained()`` unless given):
    W_0 = W + noise_0, W_{k+1} = W_k + (1 - m) s B_k A_k + noise_{k+1}."""
    config = layer.adapter.config
    scale = config.alpha / config.r  # LoRA's s from the config's values, not the adapter's own scale
    w = (_pretrained() if pretrained is None else pretrained).double().clone()
    if intensity:
        w = w + _noise(w, intensity, seed, layer_index, 0)
    for k in range(count):
        _start(layer)
        _randomise_pair(layer.adapter)
        a, b = layer.adapter.lora_A.detach().double().clone(), layer.adapter.lora_B.detach().double().clone()
        layer.adapter.cascade_step()
        w = w + (1 - momentum) * scale * b @ a
        if intensity:
            w = w + _noise(w, intensity, seed, layer_index, k + 1)
    _start(layer)
    return w


def test_defaults_are_documented():
    config = CascadeLoraConfig()
    assert (config.cascade_interval, config.slow_momentum, config.noise_intensity, config.noise_seed) == \
        ("epoch", 0.5, 0.15, 0)  # one stage per epoch: a fresh fast pair every epoch
    assert fastlora.AdapterConfig.from_dict(config.to_dict()) == config


def test_stage_0_noise_enters_w_at_the_first_training_forward_and_zero_noise_reproduces_base_exactly():
    layer = _layer(noise_intensity=0.0)
    adapter = layer.adapter
    assert adapter.lora_A.shape == (4, D_IN) and adapter.lora_A.abs().max() > 0
    assert torch.count_nonzero(adapter.lora_B) == 0 and torch.equal(layer.weight, _pretrained())
    assert set(adapter.state_dict()) == {"lora_A", "lora_B", "optimizer_steps", "cascades", "run_steps", "epoch_steps",
                                         "run_start", "tasks_done", "folded_A", "folded_B", "noise_seeds", "noise_stds"}
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not adapter.pending_start and torch.equal(layer.weight, _pretrained())
    noisy = _layer(noise_intensity=0.2, noise_seed=7)
    assert torch.equal(noisy.weight, _pretrained()) and noisy.adapter.pending_start  # building writes nothing
    assert noisy.adapter.noise_stds.tolist() == [0.0]
    with torch.no_grad():
        noisy.eval()(x)  # an eval forward does not start the stage
    assert torch.equal(noisy.weight, _pretrained())
    expected = _pretrained().double() + _noise(_pretrained(), 0.2, 7, 0, 0)
    out = noisy.train()(x)  # the first training forward adds the noise before it computes
    assert rel(noisy.weight, expected) < 1e-12 and not noisy.adapter.pending_start
    assert noisy.adapter.noise_stds.tolist() == [pytest.approx(float(_pretrained().std()), rel=1e-12)]
    assert rel(out, F.linear(x, expected, noisy.bias)) < 1e-12
    noisy(x)  # later forwards add nothing
    assert rel(noisy.weight, expected) < 1e-12
    fastlora.set_adapters_enabled(nn.Sequential(noisy), False)  # disabled: the fast pair off, the noise stays
    assert rel(noisy(x), F.linear(x, expected, noisy.bias)) < 1e-12


@pytest.mark.parametrize("intensity", [0.0, 0.15])
@pytest.mark.parametrize("momentum", [0.0, 0.35])
def test_effective_weight_after_several_stages_matches_float64(intensity, momentum):
    """The backbone after 5 stages (noise on), forward and gradients against the float64 formula."""
    layer = _layer(r=3, alpha=2.0, noise_intensity=intensity, noise_seed=3, slow_momentum=momentum)
    expected = _stages(layer, 5, intensity, seed=3, momentum=momentum)
    adapter = layer.adapter
    assert adapter.extra_stats()["cascades"] == 5.0 and torch.count_nonzero(adapter.lora_B) == 0
    assert rel(layer.weight, expected) < 1e-12
    assert len(adapter.noise_stds) == 6 and (adapter.noise_stds > 0).all() == bool(intensity)
    _randomise_pair(adapter)
    x = torch.randn(2, N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    a = adapter.lora_A.detach().clone().requires_grad_(True)
    b = adapter.lora_B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = xr @ expected.T + layer.bias + (2.0 / 3) * (xr @ a.T) @ b.T
    assert rel(out, ref) < 1e-12
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, adapter.lora_A, adapter.lora_B], dy)
    refs = torch.autograd.grad(ref, [xr, a, b], dy)
    assert all(rel(g, r) < 1e-12 for g, r in zip(grads, refs))
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_a_functional_call_on_other_tensors_cannot_start_a_stage():
    """torch.func.functional_call with other tensors: the pending noise is not added to them (refused, nothing
    changed); on the layer's own parameters it starts the stage as a forward does; once started, other
    tensors are read only."""
    layer = _layer(noise_intensity=0.1).train()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    others = {name: p.detach().clone() for name, p in layer.named_parameters()}
    with pytest.raises(RuntimeError, match=r"stage 0: a stage's noise goes into the layer's own W .* runs on a W that "
                                           r"is not a parameter \(Tensor: torch.func.functional_call"):
        torch.func.functional_call(layer, others, (x,))
    assert torch.equal(others["weight"], _pretrained()) and torch.equal(layer.weight, _pretrained())
    assert layer.adapter.pending_start and layer.adapter.noise_stds.tolist() == [0.0]
    own = torch.func.functional_call(layer, dict(layer.named_parameters()), (x,))
    noisy = _pretrained() + _noise(_pretrained(), 0.1, 0, 0, 0)
    assert not layer.adapter.pending_start and rel(layer.weight, noisy) < 1e-12
    assert rel(own, F.linear(x, noisy, layer.bias)) < 1e-12
    torch.func.functional_call(layer, others, (x,))
    assert torch.equal(others["weight"], _pretrained())


def test_the_forward_stays_rank_r_whatever_the_stage(monkeypatch):
    layer = _layer(r=3)
    _stages(layer, 4, 0.15)
    seen = []
    op = fastlora.layer.adapted_linear
    monkeypatch.setattr(fastlora.layer, "adapted_linear",
                        lambda *args, **kwargs: seen.append((args, kwargs)) or op(*args, **kwargs))
    layer(torch.randn(N, D_IN, dtype=torch.float64))
    (args, kwargs), = seen
    assert args[1] is layer.weight
    assert kwargs["lora_a"] is layer.adapter.lora_A and kwargs["lora_b"].shape == (D_OUT, 3)


def test_dropout_acts_on_the_fast_pair_only():
    """Dropout p = 0.5 in training: the folded stages (in W) see the clean input."""
    layer = _layer(r=3, dropout=0.5, noise_intensity=0.1)
    weight = _stages(layer, 2, 0.1)
    with torch.no_grad():
        layer.adapter.lora_B.zero_()  # no fast term: the output must be exactly the clean W's
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert rel(layer.train()(x), F.linear(x, weight, layer.bias)) < 1e-12


def test_triton_backend_serves_the_folded_weight():
    """fp32 through the Triton kernels (interpreter on CPU) against the float64 formula."""
    pytest.importorskip("triton")
    torch.manual_seed(2)
    pretrained = nn.Linear(D_IN, D_OUT).weight.detach()
    torch.manual_seed(2)
    layer = AdapterLinear(D_IN, D_OUT, config=CascadeLoraConfig(r=3, backend="triton", noise_intensity=0.15))
    expected = _stages(layer, 3, 0.15, pretrained=pretrained)
    _randomise_pair(layer.adapter)
    x = torch.randn(N, D_IN, requires_grad=True)
    out = layer(x)
    dy = torch.randn_like(out)
    gx, ga, gb = torch.autograd.grad(out, [x, layer.adapter.lora_A, layer.adapter.lora_B], dy)
    a = layer.adapter.lora_A.detach().double().requires_grad_(True)
    b = layer.adapter.lora_B.detach().double().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    ref = xr @ expected.T + layer.bias.double() + (8.0 / 3) * (xr @ a.T) @ b.T  # s = alpha / r, default alpha 8
    rx, ra, rb = torch.autograd.grad(ref, [xr, a, b], dy.double())
    assert rel(out.double(), ref) < 1e-5
    assert rel(gx.double(), rx) < 1e-5 and rel(ga.double(), ra) < 1e-5 and rel(gb.double(), rb) < 1e-5


def _tiny_model(config):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(D_IN, D_OUT, dtype=torch.float64))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(D_OUT, 7, bias=False, dtype=torch.float64))
    base = copy.deepcopy(model)
    return fastlora.inject(model, config), base


def test_stage_schedule_with_real_optimizer_and_hooks():
    """interval 3: stages end exactly after optimizer steps 3, 6, 9; in between the pair follows
    plain SGD and W does not move; at a stage end it gains (1 - m) s B A, and the next stage's noise
    (seeded per layer) at that stage's first forward."""
    config = CascadeLoraConfig(r=4, alpha=4.0, cascade_interval=3, slow_momentum=0.25, noise_intensity=0.1,
                               noise_seed=11)
    model, base = _tiny_model(config)
    lr = 0.05
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    torch.manual_seed(3)
    x, target = torch.randn(N, D_IN, dtype=torch.float64), torch.randn(N, 7, dtype=torch.float64)
    layers = [model.up, model.down]
    weights = [b.weight.detach().double().clone() for b in [base.up, base.down]]
    for step in range(1, 11):
        if step % 3 == 1:  # a stage starts training: its noise before the forward
            weights = [w + _noise(w, 0.1, 11, i, step // 3) for i, w in enumerate(weights)]
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        stepped = [(layer.adapter.lora_A - lr * layer.adapter.lora_A.grad,
                    layer.adapter.lora_B - lr * layer.adapter.lora_B.grad) for layer in layers]
        assert all(torch.count_nonzero(layer.adapter.lora_B.grad) > 0 for layer in layers)
        optimizer.step()
        for i, (layer, (a, b)) in enumerate(zip(layers, stepped)):
            adapter = layer.adapter
            assert int(adapter.optimizer_steps) == step and int(adapter.cascades) == step // 3
            if step % 3:
                assert rel(adapter.lora_A, a) < 1e-14 and rel(adapter.lora_B, b) < 1e-14
            else:  # the fold only: the next stage's noise waits for its first forward
                weights[i] = weights[i] + 0.75 * 1.0 * b.detach() @ a.detach()
                assert torch.count_nonzero(adapter.lora_B) == 0 and adapter.pending_start
            assert rel(layer.weight, weights[i]) < 1e-12, (step, i)
    assert [layer.adapter.extra_stats()["cascades"] for layer in layers] == [3.0, 3.0]
    hooks.remove()


def test_no_interval_means_stages_only_where_the_loop_calls_them():
    model, _ = _tiny_model(CascadeLoraConfig(r=2, cascade_interval=None))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(5, D_IN, dtype=torch.float64)
    for _ in range(4):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    assert model.up.adapter.extra_stats() == {"cascades": 0.0, "optimizer_steps": 4.0}
    model.up.adapter.cascade_step()  # e.g. at the end of an epoch
    assert model.up.adapter.extra_stats()["cascades"] == 1.0
    hooks.remove()


def test_noise_has_the_noisytune_distribution():
    layer = _layer(r=2, d_in=300, d_out=200, noise_intensity=0.4, dtype=torch.float32)
    _start(layer)
    pretrained = _pretrained(d_in=300, d_out=200, dtype=torch.float32)
    noise = (layer.weight - pretrained).double()
    std = float(pretrained.std())
    assert noise.abs().max() <= 0.2 * std * (1 + 1e-5)  # U(-lambda/2, lambda/2) * std
    assert abs(float(noise.std()) - 0.4 * std / math.sqrt(12)) < 0.02 * 0.4 * std / math.sqrt(12)
    linear = nn.Linear(300, 200)
    other_pretrained = linear.weight.detach().clone()
    other = AdapterLinear.from_linear(linear, CascadeLoraConfig(r=2, noise_intensity=0.4), layer_index=1)
    _start(other)
    other_noise = (other.weight - other_pretrained).double() / float(other_pretrained.std())
    assert not torch.allclose(other_noise, noise / std)


def test_merge_unmerge_and_disable_concern_the_fast_pair():
    """W holds the stages: merge adds s B A, unmerge restores the staged W bit for bit, a disabled layer
    computes x W^T + b with the stages, and no stage ends while merged."""
    layer = _layer(r=3, alpha=2.0)
    expected = _stages(layer, 3, 0.15)
    _randomise_pair(layer.adapter)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    before = layer(x).detach()
    weight = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and rel(layer(x), before) < 1e-12
    assert rel(layer.weight, expected + (2.0 / 3) * layer.adapter.lora_B.double() @ layer.adapter.lora_A.double()) \
        < 1e-12
    with pytest.raises(ValueError, match="merged"):
        layer.adapter.cascade_step()
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight, weight) and rel(layer(x), before) < 1e-12
    layer.adapter_enabled = False
    assert torch.equal(layer(x), F.linear(x, weight, layer.bias))
    layer.adapter_enabled = True
    merged = fastlora.merge_and_unload(nn.Sequential(layer))[0]
    assert type(merged) is nn.Linear and rel(merged(x), before) < 1e-12


def test_bf16_weight_folds_rounding_once():
    layer = _layer(r=3, dtype=torch.bfloat16, noise_intensity=0.0)
    assert layer.weight.dtype == torch.bfloat16 and layer.adapter.lora_A.dtype == torch.float32
    _randomise_pair(layer.adapter)
    a, b = layer.adapter.lora_A.detach().clone(), layer.adapter.lora_B.detach().clone()
    weight = layer.weight.detach().clone()
    scale = 3.0 / 3  # alpha / r
    expected = (weight.float() + 0.5 * scale * b @ a).bfloat16()  # the sum in fp32, rounded to bf16 once
    layer.adapter.cascade_step()
    assert torch.equal(layer.weight, expected)
    assert not torch.equal(expected, weight + (0.5 * scale * b @ a).bfloat16())  # rounding twice differs here
    assert layer.adapter.folded_A.dtype == torch.float32 and torch.equal(layer.adapter.folded_A[0], a)


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


def test_save_load_mid_stage_resumes_the_schedule(tmp_path):
    config = CascadeLoraConfig(r=3, alpha=3.0, cascade_interval=3, slow_momentum=0.4, noise_intensity=0.05)
    model, base = _tiny_model(config)
    _train(model, 8, seed=5)  # stages end after steps 3 and 6; 2 steps into the third stage
    assert model.up.adapter.extra_stats() == {"cascades": 2.0, "optimizer_steps": 8.0}
    fastlora.save_adapter(model, tmp_path / "ckpt")
    fresh = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "ckpt")
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    for name in ("up", "down"):
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight), name
        original, loaded = model.get_submodule(name).adapter, fresh.get_submodule(name).adapter
        assert loaded.extra_stats() == original.extra_stats()
        for key, tensor in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), key
    _train(model, 5, seed=6)  # both continue identically: stages end after steps 9 and 12
    _train(fresh, 5, seed=6)
    assert fresh.up.adapter.extra_stats() == {"cascades": 4.0, "optimizer_steps": 13.0}
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("kwargs", [
    {"r": 0}, {"cascade_interval": 0}, {"cascade_interval": -2}, {"cascade_interval": 2.5},
    {"cascade_interval": True}, {"slow_momentum": 1.0}, {"slow_momentum": -0.1},
    {"slow_momentum": "0.5"}, {"slow_momentum": float("nan")}, {"noise_intensity": -0.1},
    {"noise_intensity": float("inf")}, {"noise_intensity": True}, {"noise_seed": -1}, {"noise_seed": 2**31},
    {"noise_seed": 1.0}, {"cascade_interval": "Epoch"}, {"cascade_interval": "100"}, {"cascade_interval": 2.0},
])
def test_bad_config_values_raise_clear_errors(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=rf"CascadeLoraConfig\.{name} must .*got {re.escape(repr(value))}"):
        CascadeLoraConfig(**kwargs)


def test_config_round_trip_and_rank_check():
    config = CascadeLoraConfig(r=2, cascade_interval=None, slow_momentum=0.1, noise_intensity=0.01, noise_seed=4)
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

"""NEAT / PEANuT against its float64 formula (the paper's definition) and against HF peft's PEANuT layer."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
import fastlora.methods.neat as neat_module
from fastlora import AdapterLinear, NeatConfig

from utils import rel

D_IN, D_OUT, N = 37, 29, 11
ACTS = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}


def _delta_formula(weight, a_n, b_n, encoders, decoders, act, scale):
    """ΔW = scale * B_n H'^T (d_out, d_in), H' = f(act(W^T A_n^T)), U-Net residual order."""
    act = ACTS[act]
    h = act(weight.T @ a_n.T)
    skips = []
    for e in encoders:
        skips.append(h)
        h = act(h @ e.T)
    for d in decoders:
        h = act(h @ d.T) + skips.pop()
    return scale * b_n @ h.T


class _TinyModel(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(D_IN, D_OUT, dtype=dtype)
        self.down = nn.Linear(D_OUT, 13, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _layer(r=5, depth=0, act="relu", scale=1.0, dtype=torch.float64):
    torch.manual_seed(1)
    return AdapterLinear(D_IN, D_OUT, config=NeatConfig(r=r, depth=depth, activation=act, scale=scale), dtype=dtype)


def _randomise(adapter):
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))


def _factors(adapter):
    return ([adapter.neat_A, adapter.neat_B] + [e.weight for e in adapter.encoders]
            + [d.weight for d in adapter.decoders])


def _delta_of(weight, factors, depth, act, scale):
    """The formula's ΔW for factors laid out as _factors gives them; act and scale come from the test's own
    config values, never from the adapter under test."""
    return _delta_formula(weight, factors[0], factors[1], factors[2:2 + depth], factors[2 + depth:], act, scale)


def test_shapes_names_and_initialisation():
    layer = _layer(r=6, depth=2)
    adapter = layer.adapter
    assert adapter.neat_A.shape == (6, D_OUT) and adapter.neat_B.shape == (D_OUT, 6)
    assert set(adapter.state_dict()) == {"neat_A", "neat_B", "encoders.0.weight", "encoders.1.weight",
                                         "decoders.0.weight", "decoders.1.weight", "tasks_done"}
    assert all(e.bias is None and e.weight.shape == (6, 6) for e in (*adapter.encoders, *adapter.decoders))
    bound = 1.0 / math.sqrt(D_OUT)  # kaiming_uniform(a=sqrt 5) on fan_in = d_out
    assert bound * 0.5 < adapter.neat_A.abs().max() <= bound
    assert torch.count_nonzero(adapter.neat_B) == 0
    for e in (*adapter.encoders, *adapter.decoders):
        assert 0.5 / math.sqrt(6) < e.weight.abs().max() <= 1.0 / math.sqrt(6)


def test_projection_of_a_layer_wider_than_256():
    """Dimensions past CPython's small-int cache (every real layer): the shape checks compare values."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 260, generator=g, dtype=torch.float64) / math.sqrt(300)
    a_n = torch.randn(4, 300, generator=g, dtype=torch.float64)
    h = fastlora.kernels.neat_projection(weight, a_n, "gelu", backend="torch")
    assert rel(h, F.gelu(weight.T @ a_n.T)) < 1e-12


def test_initialisation_reaches_kaimings_bound_with_a_sqrt5():
    """kaiming_uniform(a=sqrt 5) (PEFT's PEANuT init): bound 1/sqrt(fan_in); with this many draws each factor's
    largest entry comes within 1% of it, which another gain would miss."""
    torch.manual_seed(2)
    adapter = AdapterLinear(80, 400, config=NeatConfig(r=64, depth=1), dtype=torch.float64).adapter
    for weight, fan_in in ((adapter.neat_A, 400), (adapter.encoders[0].weight, 64), (adapter.decoders[0].weight, 64)):
        bound = 1.0 / math.sqrt(fan_in)
        assert 0.99 * bound < weight.abs().max() <= bound


@pytest.mark.parametrize("depth", [0, 2])
def test_zero_initialised_adapter_reproduces_base(depth):
    layer = _layer(depth=depth)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_forward_and_grads_match_float64_formula(depth, act):
    layer = _layer(r=5, depth=depth, act=act, scale=0.7)
    adapter = layer.adapter
    _randomise(adapter)
    x = torch.randn(2, N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    leaves = [x] + _factors(adapter)
    copies = [t.detach().clone().requires_grad_(True) for t in leaves]
    delta = _delta_of(layer.weight, copies[1:], depth, act, 0.7)
    ref = F.linear(copies[0], layer.weight, layer.bias) + copies[0] @ delta.T
    assert rel(out, ref) < 1e-10
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_grads = torch.autograd.grad(ref, copies, dy)
    for name, g, rg in zip(["x", "A_n", "B_n"] + [f"layer{i}" for i in range(2 * depth)], grads, ref_grads):
        assert rg.norm() > 0 and rel(g, rg) < 1e-10, name


@pytest.mark.parametrize("depth", [0, 1])
def test_merge_is_w_plus_s_bn_f_act_an_w_and_unmerge_restores_w_exactly(depth):
    layer = _layer(r=4, depth=depth, act="gelu", scale=1.3)
    adapter = layer.adapter
    _randomise(adapter)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    before, weight = layer(x), layer.weight.detach().clone()
    delta = _delta_of(weight, [t.detach() for t in _factors(adapter)], depth, "gelu", 1.3)
    if depth == 0:  # orientation: ΔW = s B_n act(A_n W), (d_out, r) @ (r, d_in)
        assert rel(delta, 1.3 * adapter.neat_B.detach() @ F.gelu(adapter.neat_A.detach() @ weight)) < 1e-14
    layer.merge()
    assert rel(layer.weight, weight + delta) < 1e-13
    assert rel(layer(x), before) < 1e-12
    layer.unmerge()
    assert torch.equal(layer.weight, weight)
    assert rel(layer(x), before) < 1e-14


def _peft_pair(dtype, r, depth, act):
    """A peft PEANuT model and a fastlora NEAT model holding the same (random) weights."""
    from peft import PeanutConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_TinyModel(dtype), PeanutConfig(r=r, depth=depth, act_fn=act, scaling=0.8,
                                                                    target_modules=["up", "down"]),
                                    autocast_adapter_dtype=False)
    ours = fastlora.inject(_TinyModel(dtype), NeatConfig(r=r, depth=depth, activation=act, scale=0.8,
                                                         target_modules=["up", "down"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name in ("up", "down"):
            theirs, mine = getattr(peft_model.base_model.model, name), getattr(ours, name).adapter
            assert torch.equal(theirs.base_layer.weight, getattr(ours, name).weight)
            pairs = [(theirs.peanut_A["default"].weight, mine.neat_A), (theirs.peanut_B["default"].weight, mine.neat_B)]
            pairs += [(t.weight, m.weight) for t, m in zip(theirs.peanut_encoders["default"], mine.encoders)]
            pairs += [(t.weight, m.weight) for t, m in zip(theirs.peanut_decoders["default"], mine.decoders)]
            assert len(pairs) == 2 + 2 * depth
            for t, m in pairs:
                assert t.shape == m.shape and t.dtype == m.dtype == dtype
                t.copy_(torch.randn_like(t) / math.sqrt(t.shape[-1]))
                m.copy_(t)
    return peft_model, ours


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("depth, act", [(0, "relu"), (2, "relu"), (2, "gelu")])
def test_matches_peft_peanut_outputs_grads_and_delta(dtype, tol, depth, act):
    peft_model, ours = _peft_pair(dtype, r=4, depth=depth, act=act)
    x = torch.randn(3, N, D_IN, dtype=dtype)
    ref, out = peft_model(x), ours(x)
    assert rel(out, ref) < tol
    dy = torch.randn_like(out)
    theirs = peft_model.base_model.model.up
    their_params = [theirs.peanut_A["default"].weight, theirs.peanut_B["default"].weight]
    their_params += [m.weight for m in (*theirs.peanut_encoders["default"], *theirs.peanut_decoders["default"])]
    ref_grads = torch.autograd.grad(ref, their_params, dy)
    grads = torch.autograd.grad(out, _factors(ours.up.adapter), dy)
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < 10 * tol
    assert rel(ours.up.adapter.delta_weight(ours.up.weight), theirs.get_delta_weight("default")) < tol


def _count_projections(monkeypatch):
    calls = []
    real = neat_module.neat_projection

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(neat_module, "neat_projection", counting)
    return calls


def test_eval_cache_reuses_h_and_is_invalidated_by_updates(monkeypatch):
    layer = _layer(r=5, depth=1, act="gelu", scale=0.9)
    adapter = layer.adapter
    _randomise(adapter)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    calls = _count_projections(monkeypatch)

    def expected():
        delta = _delta_of(layer.weight, [t.detach() for t in _factors(adapter)], 1, "gelu", 0.9)
        return F.linear(x, layer.weight, layer.bias) + x @ delta.T

    layer.eval()
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(calls) == 1
    assert rel(first, expected()) < 1e-12
    assert torch.equal(layer(x), first) and len(calls) == 2  # grad enabled: no cache
    with torch.no_grad():
        for update in (lambda: adapter.neat_A.add_(0.1), lambda: adapter.decoders[0].weight.mul_(1.5),
                       lambda: adapter.neat_B.sub_(0.2), lambda: layer.weight.add_(0.05)):
            update()
            count = len(calls)
            out = layer(x)
            assert len(calls) == count + 1 and rel(out, expected()) < 1e-12
            assert torch.equal(layer(x), out) and len(calls) == count + 1
        # edits through .data bypass version counters; train()/eval() drop the cache
        adapter.neat_A.data.mul_(2.0)
        layer.eval()
        assert rel(layer(x), expected()) < 1e-12
    layer.train()
    with torch.no_grad():
        count = len(calls)
        layer(x), layer(x)
        assert len(calls) == count + 2  # training mode: never cached
    assert adapter._cache is None


def test_optimizer_steps_update_every_factor_and_eval_sees_them():
    model = fastlora.inject(_TinyModel(), NeatConfig(r=4, depth=1))
    _randomise(model.up.adapter)
    _randomise(model.down.adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{layer}.adapter.{name}" for layer in ("up", "down")
        for name in ("neat_A", "neat_B", "encoders.0.weight", "decoders.0.weight")}
    optimizer = torch.optim.SGD(params, lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        stale = model(x)
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(x).square().mean() + fastlora.regularization_loss(model)
        loss.backward()
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        for p, b, g in zip(params, before, grads):
            assert g.norm() > 0 and rel(p.detach(), b - 0.1 * g) < 1e-14
    hooks.remove()
    with torch.no_grad():
        cached = model(x)
    assert rel(cached, stale) > 1e-6 and torch.equal(cached, model(x).detach())


def test_bf16_weight_with_fp32_adapter():
    layer = _layer(r=4, depth=1, dtype=torch.bfloat16)
    adapter = layer.adapter
    assert adapter.neat_A.dtype == torch.float32
    _randomise(adapter)
    x = torch.randn(N, D_IN).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    weight = layer.weight.double()
    copies = [t.detach().double().requires_grad_(True) for t in _factors(adapter)]
    delta = _delta_of(weight, copies, 1, "relu", 1.0)
    ref = F.linear(x.double(), weight, layer.bias.double()) + x.double() @ delta.T
    assert rel(out.double(), ref) < 1e-2
    dy = torch.randn(out.shape, dtype=torch.float64)
    out.backward(dy.bfloat16())
    ref_grads = torch.autograd.grad(ref, copies, dy)
    for index, (factor, expected) in enumerate(zip(_factors(adapter), ref_grads)):
        assert factor.grad.dtype == torch.float32 and expected.norm() > 0
        assert rel(factor.grad.double(), expected) < 1.5e-2, index


@pytest.mark.parametrize("kwargs, match", [
    ({"depth": -1}, "depth must be an int >= 0"),
    ({"depth": True}, "depth must be an int >= 0"),
    ({"depth": 1.0}, "depth must be an int >= 0"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"scale": float("inf")}, "scale must be finite"),
    ({"r": -3}, "r must be a positive int"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeatConfig(**kwargs)


def test_rank_above_layer_size_raises():
    with pytest.raises(ValueError, match="exceeds min"):
        fastlora.inject(_TinyModel(), NeatConfig(r=14, target_modules=["down"]))

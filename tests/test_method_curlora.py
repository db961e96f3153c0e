"""CURLoRA against its paper and its authors' code: inverted-probability sampling, U-only training, float64 formulas."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import AdapterLinear, CurLoraConfig
from fastlora.methods.curlora import CurLoraAdapter, inverted_probabilities, sample_cur_indices

from utils import rel

D_IN, D_OUT, N = 37, 29, 11


def _tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(D_IN, D_OUT, dtype=dtype))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(D_OUT, 13, bias=False, dtype=dtype))
    return model


def _layer(r=5, alpha=1.0, bias=True, layer_index=0, **kwargs):
    torch.manual_seed(1)
    return AdapterLinear(D_IN, D_OUT, bias=bias, config=CurLoraConfig(r=r, alpha=alpha, **kwargs),
                         dtype=torch.float64, layer_index=layer_index)


def _randomise_u(layer):
    with torch.no_grad():
        layer.adapter.U.copy_(torch.randn_like(layer.adapter.U))


def _formula(x, weight, bias, rows, cols, u, alpha):
    """y = x W^T + b + alpha ((x R^T) U^T) C^T with R = W[I, :], C = W[:, J] (float64)."""
    c, r = weight[:, cols], weight[rows, :]
    y = x @ weight.T + alpha * ((x @ r.T) @ u.T) @ c.T
    return y if bias is None else y + bias


def test_inverted_probabilities_follow_the_formula():
    weight = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    for dim, eps in ((0, 1e-3), (1, 1e-3), (0, 0.0), (1, 0.25)):
        q = inverted_probabilities(weight, dim, eps)
        sq = (weight ** 2).sum(dim)
        expected = 1.0 / (sq / (weight ** 2).sum() + eps)
        assert q.dtype == torch.float32 and q.shape == ((D_IN,) if dim == 0 else (D_OUT,))
        assert rel(q.double(), expected / expected.sum()) < 1e-6


def test_eps_zero_favours_low_norm_columns_and_rows():
    torch.manual_seed(2)
    col_scale = torch.linspace(0.2, 3.0, D_IN, dtype=torch.float64)[torch.randperm(D_IN)]
    weight = torch.randn(D_OUT, D_IN, dtype=torch.float64) * col_scale
    weight[7] *= 0.05  # one low-norm output row
    rows, cols = sample_cur_indices(weight, 20000, eps=0.0, seed=0)
    col_norms = weight.norm(dim=0)
    assert int(torch.bincount(cols, minlength=D_IN).argmax()) == int(col_norms.argmin())
    assert int(torch.bincount(rows, minlength=D_OUT).argmax()) == 7
    # empirical frequencies match q = (1/p) / sum(1/p)
    q = 1.0 / (col_norms ** 2)
    frequency = torch.bincount(cols, minlength=D_IN).double() / cols.numel()
    assert (frequency - q / q.sum()).abs().max() < 0.02
    # inverse-norm weighting: the low-norm half of the columns is drawn far more often
    low = col_norms < col_norms.median()
    assert frequency[low].sum() > 0.75


def test_adapter_indices_concentrate_on_a_tiny_column_with_eps_zero():
    torch.manual_seed(3)
    linear = nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    with torch.no_grad():
        linear.weight[:, 5] *= 1e-3
    layer = AdapterLinear.from_linear(linear, CurLoraConfig(r=16, eps=0.0))
    assert (layer.adapter.col_index == 5).float().mean() > 0.9
    # with the authors' eps = 1e-3 the 1/(p + eps) weights are capped, so the tiny column
    # is still the most likely one but no longer dominates
    default = AdapterLinear.from_linear(linear, CurLoraConfig(r=16))
    assert (default.adapter.col_index == 5).float().mean() < 0.9


def test_sampling_is_seeded_per_layer_and_stored_as_int64_buffers():
    weight = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    def make(seed, index):
        return CurLoraAdapter(CurLoraConfig(r=8, seed=seed), D_IN, D_OUT, weight, layer_index=index)
    a, b, c, d = make(0, 0), make(0, 0), make(0, 1), make(1, 0)
    assert torch.equal(a.row_index, b.row_index) and torch.equal(a.col_index, b.col_index)
    assert not torch.equal(torch.cat([a.row_index, a.col_index]), torch.cat([c.row_index, c.col_index]))
    # seed = config.seed + layer_index
    assert torch.equal(c.row_index, d.row_index) and torch.equal(c.col_index, d.col_index)
    assert a.row_index.dtype == a.col_index.dtype == torch.int64
    assert 0 <= int(a.row_index.min()) and int(a.row_index.max()) < D_OUT
    assert 0 <= int(a.col_index.min()) and int(a.col_index.max()) < D_IN
    assert set(a.state_dict()) == {"U", "row_index", "col_index", "tasks_done"}
    assert [n for n, _ in a.named_parameters()] == ["U"]
    # global RNG state does not affect the draw
    torch.manual_seed(123)
    assert torch.equal(make(0, 0).col_index, a.col_index)


def test_inject_gives_each_layer_its_own_sample():
    model = fastlora.inject(_tiny_model(), CurLoraConfig(r=6, seed=4))
    up = CurLoraAdapter(CurLoraConfig(r=6, seed=4), D_IN, D_OUT, model.up.weight, layer_index=0)
    down = CurLoraAdapter(CurLoraConfig(r=6, seed=4), D_OUT, 13, model.down.weight, layer_index=1)
    assert torch.equal(model.up.adapter.col_index, up.col_index)
    assert torch.equal(model.down.adapter.row_index, down.row_index)
    assert fastlora.trainable_parameter_count(model) == 2 * 36


def test_zero_u_reproduces_base_exactly():
    layer = _layer()
    assert torch.count_nonzero(layer.adapter.U) == 0 and layer.adapter.U.shape == (5, 5)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_du_at_zero_is_nonzero_and_matches_formula(bias):
    layer = _layer(alpha=1.7, bias=bias)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    dy = torch.randn(N, D_OUT, dtype=torch.float64)
    layer(x).backward(dy)
    w, rows, cols = layer.weight, layer.adapter.row_index, layer.adapter.col_index
    expected = 1.7 * (dy @ w[:, cols]).T @ (x @ w[rows, :].T)
    grad = layer.adapter.U.grad
    assert grad.norm() > 0 and rel(grad, expected) < 1e-12


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_with_nonzero_u_match_float64_formula(bias):
    layer = _layer(r=6, alpha=0.6, bias=bias)
    _randomise_u(layer)
    x = torch.randn(3, N, D_IN, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    adapter = layer.adapter
    u = adapter.U.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = _formula(xr, layer.weight, layer.bias, adapter.row_index, adapter.col_index, u, 0.6)
    assert rel(out, ref) < 1e-10
    assert rel(out - F.linear(x, layer.weight, layer.bias), ref - F.linear(xr, layer.weight, layer.bias)) < 1e-10
    dy = torch.randn_like(out)
    gx, gu = torch.autograd.grad(out, [x, adapter.U], dy)
    rx, ru = torch.autograd.grad(ref, [xr, u], dy)
    assert rel(gx, rx) < 1e-10 and rel(gu, ru) < 1e-10
    assert rel(layer.reference_forward(x), ref) < 1e-10


def test_sgd_steps_update_only_u_by_its_gradient():
    model = fastlora.inject(_tiny_model(), CurLoraConfig(r=4, alpha=2.0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".U")}
    x = torch.randn(N, D_IN, dtype=torch.float64)
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(x).square().mean() + fastlora.regularization_loss(model)
        loss.backward()
        up = model.up
        before = up.adapter.U.detach().clone()
        # hand gradient of the first layer's U from the float64 formula
        u = before.clone().requires_grad_(True)
        h = torch.tanh(_formula(x, up.weight, up.bias, up.adapter.row_index, up.adapter.col_index, u, 2.0))
        down = model.down
        y = _formula(h, down.weight, None, down.adapter.row_index, down.adapter.col_index, down.adapter.U.detach(), 2.0)
        (hand,) = torch.autograd.grad(y.square().mean(), [u])
        optimizer.step()
        assert hand.norm() > 0 and rel(up.adapter.U.detach(), before - 0.05 * hand) < 1e-12
    hooks.remove()
    assert float(fastlora.regularization_loss(model)) == 0.0
    for key, value in model.state_dict().items():
        if not key.endswith(".U"):
            assert torch.equal(value, frozen[key]), key


def test_merge_unmerge_round_trip_restores_w_exactly():
    layer = _layer(r=5, alpha=0.9)
    _randomise_u(layer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    before, weight = layer(x), layer.weight.detach().clone()
    adapter = layer.adapter
    delta = 0.9 * weight[:, adapter.col_index] @ adapter.U.detach() @ weight[adapter.row_index, :]
    layer.merge()
    assert layer.merged and rel(layer.weight, weight + delta) < 1e-14
    assert rel(layer(x), before) < 1e-12
    layer.unmerge()
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer(x), before)


def test_save_load_reproduces_indices_and_outputs(tmp_path):
    model = fastlora.inject(_tiny_model(), CurLoraConfig(r=4, alpha=1.5, seed=7))
    for _, layer in fastlora.adapter_layers(model):
        _randomise_u(layer)
    x = torch.randn(N, D_IN, dtype=torch.float64)
    fastlora.save_adapter(model, tmp_path / "ckpt")
    assert fastlora.read_adapter_config(tmp_path / "ckpt") == model.up.config
    assert torch.equal(fastlora.load_adapter(_tiny_model(), tmp_path / "ckpt")(x), model(x))
    # a model sampled with another seed takes the stored indices, not its own
    other = fastlora.inject(_tiny_model(), CurLoraConfig(r=4, alpha=1.5, seed=99))
    assert not torch.equal(other.up.adapter.col_index, model.up.adapter.col_index)
    fastlora.load_adapter(other, tmp_path / "ckpt")
    assert torch.equal(other.up.adapter.col_index, model.up.adapter.col_index)
    assert torch.equal(other.down.adapter.row_index, model.down.adapter.row_index)
    assert torch.equal(other(x), model(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": -1e-3}, "eps must be a finite number >= 0"),
    ({"eps": float("nan")}, "eps"),
    ({"alpha": float("inf")}, "alpha must be finite"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"seed": 1.5}, "seed must be an int >= 0"),
    ({"r": 0}, "r must be a positive int"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurLoraConfig(**kwargs)


def test_bad_weights_and_ranks_raise_clear_errors():
    weight = torch.randn(D_OUT, D_IN)
    weight[:, 3] = 0.0
    with pytest.raises(ValueError, match="W column 3 is all zeros.*eps=0.0"):
        CurLoraAdapter(CurLoraConfig(r=4, eps=0.0), D_IN, D_OUT, weight)
    CurLoraAdapter(CurLoraConfig(r=4), D_IN, D_OUT, weight)  # eps > 0 copes with it
    with pytest.raises(ValueError, match="nonzero weight"):
        CurLoraAdapter(CurLoraConfig(r=4), D_IN, D_OUT, torch.zeros(D_OUT, D_IN))
    with pytest.raises(ValueError, match="exceeds min"):
        fastlora.inject(_tiny_model(), CurLoraConfig(r=14, target_modules=["down"]))


def test_pretrained_weights_loaded_after_inject_warn_that_the_indices_are_from_the_old_w():
    """CURLoRA samples its indices from W at inject: weights loaded afterwards (strict=False, without the
    indices) leave them drawn from the random W; a state dict with the indices loads quietly."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(D_IN, D_OUT))
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT)), CurLoraConfig(r=3))
    with pytest.warns(RuntimeWarning, match=r"a load replaced the W of CURLoRA layers but not their row and column "
                                            r"indices, which were drawn .* inject after loading") as caught:
        model.load_state_dict(pretrained.state_dict(), strict=False)
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(model.state_dict())
        model[0].adapter.load_state_dict(model[0].adapter.state_dict())

"""torch.func transforms over adapted models (functional_call under grad and vmap, as per-sample gradients
and meta-learning loops use them): every method's gradients are autograd's, a Selective LoRA gate switched
off still passes its straight-through gradient to the score, and the host caches that spare the device a
read per forward (Selective LoRA's gate, NEAT's eval projection) follow the tensors a call is given."""
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import fastlora
from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)

from utils import randomize_adapters, rel

F64 = torch.float64
CONFIGS = [LoraConfig(r=3), SelectiveLoraConfig(r=3), RankSelectiveLoraConfig(r=3), CurLoraConfig(r=3),
           NeatConfig(r=3, depth=1), CascadeLoraConfig(r=3, noise_intensity=0.0)]


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 6, dtype=F64), nn.Tanh(), nn.Linear(6, 5, dtype=F64))
    return randomize_adapters(fastlora.inject(model, config))


def _split(model):
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def _loss(model, frozen, x, target):
    def loss(trainable):
        out = functional_call(model, {**frozen, **trainable}, (x,))
        return F.mse_loss(out, target) + fastlora.regularization_loss(model)
    return loss


GRAD_CASES = [*((config, True) for config in CONFIGS), (SelectiveLoraConfig(r=3), False)]


@pytest.mark.parametrize("config, gate_on", GRAD_CASES, ids=[*(c.method for c in CONFIGS), "selective_lora-block-off"])
def test_grad_of_a_functional_call_is_autograds(config, gate_on):
    model = _model(config)
    if not gate_on:
        with torch.no_grad():
            model[0].adapter.score.fill_(-0.5)  # below the threshold: the block is off
    x, target = torch.randn(4, 7, dtype=F64), torch.randn(4, 5, dtype=F64)
    trainable, frozen = _split(model)
    grads = grad(_loss(model, frozen, x, target))(trainable)
    model.zero_grad()
    (F.mse_loss(model(x), target) + fastlora.regularization_loss(model)).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel(grads[name], p.grad, zero_ref_ok=True) < 1e-12, name
    if config.method == "selective_lora":
        assert grads["0.adapter.score"].abs() > 0  # the straight-through gradient, the block on or off
        grad(lambda t: functional_call(model, {**frozen, **t}, (x,)).sum())(trainable)  # records a penalty
        assert fastlora.regularization_loss(model).grad_fn is not None  # outside: the model's score's, not it


@pytest.mark.parametrize("backend", ["triton", "cublas", "onepass"])
def test_grad_runs_every_plan_as_recorded_torch_ops(backend):
    """The Triton plans' autograd.Function is not differentiable by torch.func: under a transform every plan
    computes with torch's recorded ops, the same formula with the kernels' dropout mask, so its gradients
    are those the plan's own backward gives for the same random state (Triton interpreter, float32)."""
    model = _model(LoraConfig(r=3, dropout=0.2, backend=backend)).float().train()
    x, target = torch.randn(4, 7), torch.randn(4, 5)
    trainable, frozen = _split(model)
    torch.manual_seed(7)
    grads = grad(_loss(model, frozen, x, target))(trainable)
    model.zero_grad()
    torch.manual_seed(7)
    F.mse_loss(model(x), target).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel(grads[name], p.grad) < 1e-5, name


@pytest.mark.parametrize("backend", ["cublas", "torch"])
def test_grad_of_a_half_precision_model_with_fp32_adapters(backend):
    """fp32 factors over an fp16 W (the adapters of a half-precision model): inside a transform the recorded ops
    cast them as the torch plan does, whichever plan the layer names (the cublas plan's kernels read them
    uncast; recorded torch ops cannot)."""
    model = _model(LoraConfig(r=3, backend=backend)).float()
    for _, layer in fastlora.adapter_layers(model):
        layer.weight.data = layer.weight.data.half()
        layer.bias.data = layer.bias.data.half()
    x, target = torch.randn(4, 7, dtype=torch.float16), torch.randn(4, 5, dtype=torch.float16)
    trainable, frozen = _split(model)
    grads = grad(_loss(model, frozen, x, target))(trainable)
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads.values())


def test_per_sample_gradients_by_vmap_of_grad():
    model = _model(LoraConfig(r=3))
    x, target = torch.randn(5, 7, dtype=F64), torch.randn(5, 5, dtype=F64)
    trainable, frozen = _split(model)

    def sample_loss(params, xi, ti):
        return F.mse_loss(functional_call(model, {**frozen, **params}, (xi[None],)), ti[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(trainable, x, target)
    for i in range(5):
        model.zero_grad()
        F.mse_loss(model(x[i:i + 1]), target[i:i + 1]).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert rel(per_sample[name][i], p.grad, zero_ref_ok=True) < 1e-12, (name, i)


@pytest.mark.parametrize("config", [SelectiveLoraConfig(r=3), NeatConfig(r=3, depth=1)], ids=lambda c: c.method)
def test_cached_host_values_follow_the_tensors_of_each_call(config):
    """Eval forwards of functional_call with fresh tensors every time (a freed tensor's address and id may come
    back): each call's output is the one its own tensors give."""
    model = _model(config).eval()
    x = torch.randn(3, 7, dtype=F64)
    for step in range(12):
        reference = _model(config, seed=step)
        if config.method == "selective_lora":
            with torch.no_grad():
                reference[0].adapter.score.fill_(0.5 if step % 2 else -0.5)  # the gate flips call to call
        params = {n: p.detach().clone() for n, p in reference.named_parameters()}
        with torch.no_grad():
            out = functional_call(model, params, (x,))
            assert torch.equal(out, reference.eval()(x)), step
        del params, reference


@pytest.mark.parametrize("config", [SelectiveLoraConfig(r=3), NeatConfig(r=3, depth=1)], ids=lambda c: c.method)
def test_an_adapter_with_a_filled_cache_pickles(config):
    model = _model(config).eval()
    x = torch.randn(3, 7, dtype=F64)
    with torch.no_grad():
        out = model(x)
    copy = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(copy(x), out)


def test_vmap_over_the_adapters_of_a_half_precision_layer():
    """vmap over stacked adapter factors (an ensemble of adapters on one frozen W): the fp16 update is added out
    of place (in place, the batched update would not fit the unbatched base output)."""
    model = _model(LoraConfig(r=3)).half()
    x = torch.randn(4, 7, dtype=torch.float16)
    trainable, frozen = _split(model)
    stacked = {name: torch.stack([p, 2 * p]) for name, p in trainable.items()}
    outputs = vmap(lambda params: functional_call(model, {**frozen, **params}, (x,)))(stacked)
    for i, factor in enumerate((1, 2)):
        with torch.no_grad():
            expected = functional_call(model, {**frozen, **{n: factor * p for n, p in trainable.items()}}, (x,))
        assert rel(outputs[i].float(), expected.float()) < 2e-3  # fp16: batched and plain GEMMs round apart

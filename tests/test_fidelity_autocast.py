"""Training every method under torch.autocast (CPU, bf16 and fp16, torch backend): forward, backward and
an optimizer step with the training hooks run, and values and gradients match the same layer in float64
without autocast within half-precision tolerance."""
import copy

import pytest
import torch
from torch import nn

import fastlora
from fastlora import (AdapterLinear, CascadeLoraConfig, CurLoraConfig, LoraConfig, NeatConfig,
                      RankSelectiveLoraConfig, SelectiveLoraConfig)

D_IN, D_OUT, N = 24, 20, 9
CONFIGS = [LoraConfig(r=4, alpha=8.0), SelectiveLoraConfig(r=4, alpha=8.0), RankSelectiveLoraConfig(r=4),
           CurLoraConfig(r=4, alpha=2.0), NeatConfig(r=4), NeatConfig(r=4, depth=1, activation="gelu"),
           CascadeLoraConfig(r=4, alpha=8.0, cascade_interval=1)]
IDS = ["lora", "selective", "codyra", "curlora", "neat", "neat-depth1", "lorasc"]


def _rel(out, ref):
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


def _model(config):
    torch.manual_seed(0)
    model = nn.Sequential(AdapterLinear(D_IN, D_OUT, config=type(config)(**{**config.__dict__, "backend": "torch"})))
    with torch.no_grad():
        for p in model[0].adapter.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    if hasattr(model[0].adapter, "refresh_active_ranks"):
        model[0].adapter.refresh_active_ranks()
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_training_under_autocast_matches_float64(config, dtype):
    model = _model(config)
    reference = copy.deepcopy(model).double()
    x = torch.randn(N, D_IN)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    ref = reference(x.double())
    assert _rel(out, ref) < 2e-2
    dy = torch.randn(N, D_OUT)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.float(), params, dy)
    ref_grads = torch.autograd.grad(ref, ref_params, dy.double())
    for grad, ref_grad, param in zip(grads, ref_grads, params):
        assert grad.dtype == param.dtype == torch.float32
        if ref_grad.norm() > 0:
            assert _rel(grad, ref_grad) < 3e-2
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = model(x).float().square().mean() + fastlora.regularization_loss(model)
        loss.backward()
        optimizer.step()
    hooks.remove()
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""AdapterLinear and inject with plain LoRA against float64 formulas, and their misuse. The round trips every
method keeps (disable, merge/unmerge, save/load, reference parity) are in tests/test_contract.py."""
import math
import os

import pytest
import torch
from torch import nn

import fastlora
from fastlora import AdapterLinear, LoraConfig

from utils import rel


def _tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(37, 29, dtype=dtype))
    model.add_module("act", nn.Tanh())
    model.add_module("down", nn.Linear(29, 11, bias=False, dtype=dtype))
    return model


def _randomise_adapters(model):
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            for p in layer.adapter.parameters():
                p.copy_(torch.randn_like(p))


def test_drop_in_attributes_and_frozen_base():
    layer = AdapterLinear(37, 29, config=LoraConfig(r=4), dtype=torch.float64)
    assert (layer.in_features, layer.out_features) == (37, 29)
    assert layer.weight.shape == (29, 37) and layer.bias.shape == (29,)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.adapter.lora_A.shape == (4, 37) and layer.adapter.lora_B.shape == (29, 4)
    x = torch.randn(3, 5, 37, dtype=torch.float64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_from_linear_shares_tensors_and_init_follows_peft():
    linear = nn.Linear(40, 24)
    layer = AdapterLinear.from_linear(linear, LoraConfig(r=8, alpha=16))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    bound = 1.0 / math.sqrt(40)  # kaiming_uniform(a=sqrt 5) on fan_in=40
    a = layer.adapter.lora_A
    assert a.abs().max() <= bound and a.abs().max() > 0.5 * bound
    assert torch.count_nonzero(layer.adapter.lora_B) == 0
    assert layer.adapter.scale == pytest.approx(2.0)
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale == pytest.approx(2.0)


def test_lora_forward_and_grads_match_float64_formula():
    model = fastlora.inject(_tiny_model(), LoraConfig(r=5, alpha=7.0))
    _randomise_adapters(model)
    x = torch.randn(2, 6, 37, dtype=torch.float64, requires_grad=True)
    up, down = model.up, model.down
    leaves = [x, up.adapter.lora_A, up.adapter.lora_B, down.adapter.lora_A, down.adapter.lora_B]

    def formula(x, a1, b1, a2, b2):
        s = 7.0 / 5
        h = torch.tanh(x @ up.weight.T + up.bias + s * (x @ a1.T) @ b1.T)
        return h @ down.weight.T + s * (h @ a2.T) @ b2.T

    out = model(x)
    ref = formula(*[t.detach().clone().requires_grad_(True) for t in leaves])
    assert rel(out, ref) < 1e-12
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    copies = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref_grads = torch.autograd.grad(formula(*copies), copies, dy)
    for g, rg in zip(grads, ref_grads):
        assert rg.norm() > 0 and rel(g, rg) < 1e-12


def test_inject_targets_and_freezes():
    model = fastlora.inject(_tiny_model(), LoraConfig(r=3, target_modules=["down"]))
    assert isinstance(model.down, AdapterLinear) and type(model.up) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"down.adapter.lora_A", "down.adapter.lora_B"}
    assert fastlora.trainable_parameter_count(model) == 3 * 29 + 11 * 3
    regex_model = fastlora.inject(_tiny_model(), LoraConfig(r=3, target_modules=r"u.*"))
    assert isinstance(regex_model.up, AdapterLinear) and type(regex_model.down) is nn.Linear


@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": 0}, ValueError, "r must be a positive int"),
    ({"r": -2}, ValueError, "r must be a positive int"),
    ({"r": 4, "alpha": 0.0}, ValueError, "alpha"),
    ({"r": 4, "dropout": 1.0}, ValueError, "dropout"),
    ({"r": 4, "backend": "cuda"}, ValueError, "backend"),
])
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(**kwargs)


def test_bad_inject_and_forward_inputs():
    with pytest.raises(ValueError, match=r"\['nope'\] match no nn.Linear"):
        fastlora.inject(_tiny_model(), LoraConfig(r=2, target_modules=["down", "nope"]))
    with pytest.raises(ValueError, match="exceeds min"):
        fastlora.inject(_tiny_model(), LoraConfig(r=12, target_modules=["down"]))
    model = fastlora.inject(_tiny_model(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has fastlora adapters"):
        fastlora.inject(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="last dimension d_in=37"):
        model(torch.randn(4, 36, dtype=torch.float64))
    with pytest.raises(TypeError, match="does not match weight dtype"):
        model(torch.randn(4, 37, dtype=torch.float32))
    with pytest.raises(TypeError, match="AdapterConfig"):
        fastlora.inject(_tiny_model(), {"r": 2})


def test_dropout_only_in_training():
    model = fastlora.inject(_tiny_model(), LoraConfig(r=4, dropout=0.5))
    _randomise_adapters(model)
    x = torch.randn(8, 37, dtype=torch.float64)
    model.eval()
    clean = model(x)
    model.train()
    noisy = model(x)
    assert rel(noisy, clean) > 1e-3
    model.eval()
    assert torch.equal(model(x), clean)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = fastlora.inject(_tiny_model(), LoraConfig(r=4))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    before = sorted(p.read_bytes() for p in (tmp_path / "ckpt").iterdir())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fastlora.atomic_files, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fastlora.save_adapter(model, tmp_path / "ckpt")
    assert sorted(p.read_bytes() for p in (tmp_path / "ckpt").iterdir()) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_load_rejects_mismatched_checkpoint(tmp_path):
    model = fastlora.inject(_tiny_model(), LoraConfig(r=4))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    other = fastlora.inject(_tiny_model(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="checkpoint shape"):
        fastlora.load_adapter(other, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastlora.load_adapter(_tiny_model(), tmp_path / "missing")


def test_autocast_bf16_keeps_fp32_adapter_grads():
    model = fastlora.inject(_tiny_model(torch.float32), LoraConfig(r=4))
    _randomise_adapters(model)
    x = torch.randn(6, 37)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), reference) < 3e-2
    out.float().sum().backward()
    assert model.up.adapter.lora_A.grad.dtype == torch.float32


def test_inject_keeps_the_replaced_layers_mode():
    model = fastlora.inject(_tiny_model().eval(), LoraConfig(r=3, dropout=0.3))
    assert not model.up.training and not model.down.training

"""inject is all or nothing, refuses a root nn.Linear and meta tensors, and adapts a shared module under every name."""
import pytest
import torch
from torch import nn

import fastlora
from fastlora import AdapterLinear, CurLoraConfig, LoraConfig, NeatConfig


def _model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(16, 12, dtype=torch.float64))
    model.add_module("act", nn.Tanh())
    model.add_module("mid", nn.Linear(12, 12, dtype=torch.float64))
    model.add_module("down", nn.Linear(12, 3, dtype=torch.float64))
    return model


def _snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_untouched(model, snapshot):
    modules, params = snapshot
    assert {n: type(m) for n, m in model.named_modules()} == modules
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for name, (value, requires_grad) in params.items():
        assert torch.equal(now[name], value) and now[name].requires_grad == requires_grad, name


def test_root_linear_is_refused_and_from_linear_is_the_way():
    linear = nn.Linear(8, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model is itself an nn.Linear.*AdapterLinear.from_linear\(model, config\)"):
        fastlora.inject(linear, LoraConfig(r=2))
    assert dict(linear.named_children()) == {} and linear.weight.requires_grad  # nothing attached, nothing frozen
    layer = AdapterLinear.from_linear(linear, LoraConfig(r=2))
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    x = torch.randn(4, 8, dtype=torch.float64)
    a, b = layer.adapter.lora_A, layer.adapter.lora_B
    assert torch.allclose(layer(x), linear(x) + (x @ a.T @ b.T) * layer.config.scale, rtol=1e-12, atol=1e-12)


def test_rank_error_names_the_layer_and_leaves_the_model_untouched():
    model = _model()
    model.mid.weight.requires_grad_(False)  # the user's own flag must survive the failure
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'down': r=4 exceeds min\(d_in=12, d_out=3\)=3"):
        fastlora.inject(model, LoraConfig(r=4))
    _assert_untouched(model, snapshot)
    fastlora.inject(model, LoraConfig(r=3))  # the retry works
    assert all(isinstance(getattr(model, n), AdapterLinear) for n in ("up", "mid", "down"))


def test_failure_while_building_a_later_layer_leaves_the_model_untouched():
    """CURLoRA with eps=0 fails on the all-zero column of the last layer, after the first two were built."""
    model = _model()
    with torch.no_grad():
        model.down.weight[:, 5] = 0.0
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'down': W column 5 is all zeros"):
        fastlora.inject(model, CurLoraConfig(r=2, eps=0.0))
    _assert_untouched(model, snapshot)
    fastlora.inject(model, CurLoraConfig(r=2, eps=1e-3))
    assert isinstance(model.down, AdapterLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.adapter.U" for n in ("up", "mid", "down")}


def test_interrupt_while_building_restores_every_flag(monkeypatch):
    model = _model()
    snapshot = _snapshot(model)
    real = AdapterLinear.from_linear
    built = []

    def flaky(linear, config, layer_index=0, **kwargs):
        if layer_index == 2:
            raise KeyboardInterrupt
        built.append(layer_index)
        return real(linear, config, layer_index=layer_index, **kwargs)

    monkeypatch.setattr(AdapterLinear, "from_linear", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        fastlora.inject(model, LoraConfig(r=2))
    assert built == [0, 1]  # two layers were built (and froze their bases) before the interrupt
    _assert_untouched(model, snapshot)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(10, 10, dtype=torch.float64))
        self.decoder = nn.Sequential(self.encoder[0])  # the same module under a second name
        self.head = nn.Linear(10, 4, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.decoder(torch.tanh(self.encoder(x))))


def test_module_registered_twice_is_adapted_once_under_both_names():
    model = _Shared()
    x = torch.randn(5, 10, dtype=torch.float64)
    fastlora.inject(model, LoraConfig(r=2, target_modules=["0"]))
    assert isinstance(model.encoder[0], AdapterLinear) and model.decoder[0] is model.encoder[0]
    layer = model.encoder[0]
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    w, b = layer.weight, layer.bias
    delta = layer.config.scale * layer.adapter.lora_B @ layer.adapter.lora_A

    def adapted(v):
        return v @ (w + delta).T + b
    expected = model.head(adapted(torch.tanh(adapted(x))))
    assert torch.allclose(model(x), expected, rtol=1e-12, atol=1e-12)
    assert [n for n, _ in fastlora.adapter_layers(model)] == ["encoder.0"]  # one layer, one adapter


def test_module_matched_under_one_of_its_names_only_is_refused():
    model = _Shared()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"nn.Linear 'encoder.0' is also registered as \['decoder.0'\], which "
                                         r"target_modules \('encoder.0',\) does not match"):
        fastlora.inject(model, LoraConfig(r=2, target_modules=["encoder.0"]))
    _assert_untouched(model, snapshot)
    with pytest.raises(ValueError, match="'encoder.0' is also registered"):
        fastlora.inject(model, LoraConfig(r=2, target_modules=r"encoder\.0|head"))


def test_meta_device_model_is_refused_clearly():
    with torch.device("meta"):
        model = _model()
    with pytest.raises(ValueError, match=r"layer 'up' is on the meta device.*materialise the model"):
        fastlora.inject(model, NeatConfig(r=2))
    assert all(type(m) is not AdapterLinear for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())

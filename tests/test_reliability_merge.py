"""merge/unmerge restore W bit for bit; shared weights are refused; disabled merged layers give the base."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import (AdapterLinear, CascadeLoraConfig, CurLoraConfig, LoraConfig, NeatConfig,
                      RankSelectiveLoraConfig, SelectiveLoraConfig)

D_IN, D_OUT = 12, 9
CONFIGS = [LoraConfig(r=3, alpha=2.0), SelectiveLoraConfig(r=3), RankSelectiveLoraConfig(r=3),
           CurLoraConfig(r=3, alpha=1.5), NeatConfig(r=3, depth=1), CascadeLoraConfig(r=3, cascade_interval=1)]
IDS = [c.method for c in CONFIGS]


def _layer(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = AdapterLinear(D_IN, D_OUT, config=config, dtype=dtype)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn_like(p))
    return layer


def _perturb(layer):
    """Change every adapter tensor the way training, a rule or a hand edit would while merged."""
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.add_(torch.randn_like(p))
        if isinstance(layer.config, SelectiveLoraConfig):
            layer.adapter.score.fill_(-1.0)  # gate flip
        if isinstance(layer.config, CascadeLoraConfig):
            layer.adapter.cascade_step()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_unmerge_restores_w_bit_for_bit_whatever_changed_while_merged(config):
    layer = _layer(config)
    weight = layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.weight, weight)
    merged = layer.weight.detach().clone()
    layer.merge()  # a second merge adds nothing
    assert torch.equal(layer.weight, merged)
    assert torch.equal(layer.to_linear().weight, merged)  # nor does to_linear of a merged layer
    _perturb(layer)
    layer.unmerge()
    assert torch.equal(layer.weight, weight) and not layer.merged and layer.weight_before_merge is None
    layer.unmerge()
    assert torch.equal(layer.weight, weight)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_disabled_merged_model_computes_the_base_model(config):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh(), nn.Linear(D_OUT, 5))
    x = torch.randn(6, D_IN)
    expected = base(x).detach()
    model = fastlora.inject(base, config)
    with torch.no_grad():
        for p in (p for _, layer in fastlora.adapter_layers(model) for p in layer.adapter.parameters()):
            p.copy_(torch.randn_like(p))
    fastlora.merge(model)
    assert not torch.equal(model(x), expected)
    fastlora.set_adapters_enabled(model, False)
    assert torch.equal(model(x), expected)
    assert torch.equal(model[0].reference_forward(x), F.linear(x, model[0].weight_before_merge, model[0].bias))
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastlora.set_adapters_enabled(model, "no")


def _tied_model():
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(11, D_IN)
    model.lm_head = nn.Linear(D_IN, 11, bias=False)
    model.lm_head.weight = model.embed.weight
    return model


def test_merge_refuses_a_weight_tied_to_an_embedding():
    model = fastlora.inject(_tied_model(), LoraConfig(r=2, target_modules=["lm_head"]))
    with torch.no_grad():
        model.lm_head.adapter.lora_B.normal_()
    embedding = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer 'lm_head'.*\['embed.weight'\]"):
        fastlora.merge(model)
    assert not model.lm_head.merged and torch.equal(model.embed.weight, embedding)
    # merge_and_unload builds a new weight: the embedding keeps its values
    x = torch.randn(3, D_IN)
    adapted = model.lm_head(x)
    fastlora.merge_and_unload(model)
    assert torch.equal(model.embed.weight, embedding) and torch.allclose(model.lm_head(x), adapted, atol=1e-5)


def test_merge_refuses_one_weight_in_two_layers_and_unmerge_undoes_layer_merges_in_reverse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_IN))
    model[1].weight = model[0].weight
    fastlora.inject(model, NeatConfig(r=2))
    for _, layer in fastlora.adapter_layers(model):
        with torch.no_grad():
            layer.adapter.neat_B.normal_()
    weight = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '0'.*\['1.weight'\]"):
        fastlora.merge(model)
    assert torch.equal(model[0].weight, weight)
    model[0].merge()  # layer by layer, the model-level check is bypassed
    model[1].merge()
    fastlora.unmerge(model)  # latest merge first: the W before both comes back
    assert torch.equal(model[0].weight, weight)


def test_merge_and_unload_replaces_a_layer_under_every_name():
    layer = _layer(LoraConfig(r=2))
    model = nn.Module()
    model.a = layer
    model.b = layer
    x = torch.randn(4, D_IN)
    expected = layer(x).detach()
    fastlora.merge_and_unload(model)
    assert type(model.a) is nn.Linear and model.a is model.b and torch.allclose(model.a(x), expected, atol=1e-5)


def test_merged_layers_refuse_a_load(tmp_path):
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT)), LoraConfig(r=2))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    fastlora.merge(model)
    with pytest.raises(ValueError, match="merged; unmerge before loading"):
        fastlora.load_adapter(model, tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_reference_forward_of_a_half_precision_layer_matches_float64(config, dtype):
    layer = _layer(config, dtype=dtype).eval()
    x = torch.randn(5, D_IN, dtype=dtype)
    out = layer.reference_forward(x)
    assert out.dtype == dtype
    with torch.no_grad():
        delta = layer.adapter.delta_weight(layer.weight.double())
    reference = x.double() @ (layer.weight.double() + delta).T + layer.bias.double()
    assert float((out.detach().double() - reference).norm() / reference.norm()) < 1e-2

"""Merging with shared weights: tied or shared W is refused, unmerge undoes layer merges in reverse, merge_and_unload
replaces a layer under every name, merged layers refuse a load. The per-method merge, unmerge and disable round
trips are in tests/test_contract.py."""
import pytest
import torch
from torch import nn

import fastlora
from fastlora import AdapterLinear, LoraConfig, NeatConfig

D_IN, D_OUT = 12, 9


def _layer(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = AdapterLinear(D_IN, D_OUT, config=config, dtype=dtype)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn_like(p))
    return layer


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

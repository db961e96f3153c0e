"""State dicts and merged layers: a merged layer's state dict holds W + ΔW (what a reader of ``weight`` expects
of a merged model) and the W the merge replaced (``weight_before_merge``), so it loads exactly into merged and
unmerged layers; a state dict loaded into a merged layer is loaded unmerged and merged again with the loaded
adapter. Every method, float64, the loaded layer checked against the layer that saved it."""
import dataclasses

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastlora
from fastlora import (
    AdapterLinear,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)

from utils import randomize_adapters

CONFIGS = [LoraConfig(r=2, alpha=3.0), SelectiveLoraConfig(r=2), RankSelectiveLoraConfig(r=2), CurLoraConfig(r=2),
           NeatConfig(r=2), CascadeLoraConfig(r=2)]
IDS = [type(c).__name__ for c in CONFIGS]


def _model(config, seed: int, conv1d: bool = False) -> nn.Module:
    """Two layers of float64 (a Conv1D pair with ``conv1d``), adapted, every adapter tensor drawn at random."""
    torch.manual_seed(seed)
    layers = [Conv1D(7, 6), Conv1D(5, 7)] if conv1d else [nn.Linear(6, 7), nn.Linear(7, 5)]
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1]).double()
    fastlora.inject(model, dataclasses.replace(config, target_modules=["0", "2"]))
    return randomize_adapters(model, seed=seed + 10).eval()


def _saved(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("source_merged", [False, True])
@pytest.mark.parametrize("target_merged", [False, True])
def test_a_state_dict_loads_exactly_whether_source_and_target_are_merged(config, source_merged, target_merged):
    source, target = _model(config, seed=0), _model(config, seed=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    want, base_weights = source(x), [layer.weight.clone() for _, layer in fastlora.adapter_layers(source)]
    if source_merged:
        fastlora.merge(source)
    if target_merged:
        fastlora.merge(target)
    target.load_state_dict(_saved(source))
    assert all(layer.merged == target_merged for _, layer in fastlora.adapter_layers(target))
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)
    fastlora.unmerge(target)
    for (_, layer), weight in zip(fastlora.adapter_layers(target), base_weights):
        assert torch.equal(layer.weight, weight)  # the source's W before its merge, exactly
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)


def test_a_merged_layer_saves_the_merged_weight_and_the_weight_it_replaced():
    model = _model(LoraConfig(r=2), seed=0)
    layer = model[0]
    x = torch.randn(3, 6, dtype=torch.float64)
    keys, weight, want = list(layer.state_dict()), layer.weight.clone(), layer(x)
    layer.merge()
    state = layer.state_dict()
    assert sorted(state) == sorted(keys + ["weight_before_merge"])
    torch.testing.assert_close(x @ state["weight"].t() + state["bias"], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(state["weight_before_merge"], weight)
    layer.unmerge()
    assert list(layer.state_dict()) == keys


def test_a_conv1d_layers_merged_state_dict_keeps_conv1ds_layout_for_both_weights():
    source, target = _model(LoraConfig(r=2), seed=0, conv1d=True), _model(LoraConfig(r=2), seed=1, conv1d=True)
    x = torch.randn(4, 6, dtype=torch.float64)
    want, weight = source(x), source[0].weight.clone()
    fastlora.merge(source)
    state = _saved(source)
    assert state["0.weight"].shape == state["0.weight_before_merge"].shape == (6, 7)
    assert torch.equal(state["0.weight_before_merge"], weight.t())
    target.load_state_dict(state)
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(target[0].weight, weight) and not target[0].merged


def test_an_adapter_only_state_dict_loaded_into_a_merged_layer_is_merged_with_the_loaded_adapter():
    source, target = _model(LoraConfig(r=2), seed=0), _model(LoraConfig(r=2), seed=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    weights = [layer.weight.clone() for _, layer in fastlora.adapter_layers(target)]
    adapter_only = {k: v for k, v in _saved(source).items() if ".adapter." in k}
    fastlora.merge(target)
    missing, unexpected = target.load_state_dict(adapter_only, strict=False)
    assert not unexpected and sorted(missing) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    pairs = zip(fastlora.adapter_layers(target), fastlora.adapter_layers(source), weights)
    for (_, layer), (_, saved), weight in pairs:
        assert torch.equal(layer.weight_before_merge, weight)
        loaded = layer.adapter.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in saved.adapter.state_dict().items())
    merged_out = target(x)
    fastlora.unmerge(target)
    torch.testing.assert_close(merged_out, target(x), rtol=1e-12, atol=1e-12)  # W + the loaded ΔW


def test_an_attention_in_projections_merged_state_dict_loads_into_an_unmerged_attention():
    torch.manual_seed(0)
    source = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)).double()
    target = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)).double()
    for seed, model in enumerate((source, target)):
        fastlora.inject(model, LoraConfig(r=2, target_modules=["0"]))
        randomize_adapters(model, seed=seed).eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    want = source[0](x, x, x)[0]
    fastlora.merge(source)
    state = _saved(source)
    assert "0.in_proj.weight_before_merge" in state and "0.in_proj_weight" in state
    target.load_state_dict(state)
    torch.testing.assert_close(target[0](x, x, x)[0], want, rtol=1e-12, atol=1e-12)
    assert not any(layer.merged for _, layer in fastlora.adapter_layers(target))


def test_a_state_dict_with_a_shape_error_leaves_a_merged_layer_merged_as_it_was():
    layer = AdapterLinear(6, 5, config=LoraConfig(r=2)).double()
    randomize_adapters(layer)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer.merge(backup_device="cpu")
    want = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight_before_merge"] = torch.zeros(5, 7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(state)
    assert layer.merged and layer.weight_before_merge.device == torch.device("cpu")
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_a_state_dict_assigned_into_a_merged_layer_is_not_merged_in_place_into_the_callers_tensors():
    source, target = _model(LoraConfig(r=2), seed=0), _model(LoraConfig(r=2), seed=1)
    x = torch.randn(4, 6, dtype=torch.float64)
    want, state = source(x), _saved(source)
    given = {key: value.clone() for key, value in state.items()}
    fastlora.merge(target)
    target.load_state_dict(state, assign=True)
    assert all(torch.equal(state[key], value) for key, value in given.items())
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)
    assert target[0].merged


def test_a_load_that_raises_in_the_adapters_checks_leaves_the_layer_unmerged_with_the_same_outputs():
    """LoRASC's record refuses a W of another base model while the adapter's tensors load (after the layer's
    own): the layer stays unmerged (no post-hook ran), and a later load does not merge it behind the user."""
    torch.manual_seed(0)
    source = AdapterLinear(16, 12, config=CascadeLoraConfig(r=2, cascade_interval=None)).double().train()
    source(torch.randn(3, 16, dtype=torch.float64))  # stage 0's noise into W
    source.adapter.cascade_step()
    adapter_only = {k: v.clone() for k, v in source.state_dict().items() if k.startswith("adapter.")}
    torch.manual_seed(1)
    target = AdapterLinear(16, 12, config=CascadeLoraConfig(r=2, cascade_interval=None)).double()
    with torch.no_grad():
        target.weight.mul_(3.0)  # another base model: another std(W)
    target.eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    want = target(x)
    target.merge()
    with pytest.raises(ValueError, match=r"stage 0's noise was drawn with std\(W\)"):
        target.load_state_dict(adapter_only, strict=False)
    assert not target.merged
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)
    target.load_state_dict({k: v.clone() for k, v in target.state_dict().items()})
    assert not target.merged


def test_a_merged_meta_layer_filled_by_an_assigning_load_is_merged_with_its_kept_w_beside_the_new_w():
    source = _model(LoraConfig(r=2), seed=0)[0]
    x = torch.randn(3, 6, dtype=torch.float64)
    want = source(x)
    layer = AdapterLinear(6, 7, config=LoraConfig(r=2), device="meta", dtype=torch.float64)
    layer.merge()
    layer.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
    assert layer.merged and layer.weight.device.type == layer.weight_before_merge.device.type == "cpu"
    torch.testing.assert_close(layer.eval()(x), want, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    assert torch.equal(layer.weight, source.weight)

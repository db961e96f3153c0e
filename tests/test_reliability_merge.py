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


def test_merge_and_unload_keeps_the_frozen_tensors_frozen():
    """As PEFT's: the merged layers' W and b stay frozen as inject left them (an optimizer over the trainable
    parameters would otherwise pick up the merged layers alone), attention's packed projections too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 8), nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    fastlora.inject(model, LoraConfig(r=2, target_modules=["0", "2"]))
    fastlora.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.MultiheadAttention
    assert not [name for name, p in model.named_parameters() if p.requires_grad]


def test_merged_layers_refuse_a_load(tmp_path):
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT)), LoraConfig(r=2))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    fastlora.merge(model)
    with pytest.raises(ValueError, match="merged; unmerge before loading"):
        fastlora.load_adapter(model, tmp_path / "ckpt")


def _backup_round_trip(layer, device):
    """merge(backup_device=device) then unmerge: the kept W on ``device``, the disabled forward, W restored."""
    weight = layer.weight.detach().clone()
    x = torch.randn(5, D_IN, device=layer.weight.device, dtype=layer.weight.dtype)
    base = torch.nn.functional.linear(x, weight, layer.bias)
    layer.merge(backup_device=device)
    assert layer.weight_before_merge.device == torch.device(device)
    assert torch.equal(layer.weight_before_merge.cpu(), weight.cpu())
    assert layer.weight_before_merge.data_ptr() != layer.weight.data_ptr()
    assert not torch.equal(layer.weight, weight)  # ΔW is in W
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base)
    layer.adapter_enabled = True
    layer.unmerge()
    assert torch.equal(layer.weight, weight) and layer.weight_before_merge is None


def test_merge_keeps_the_pre_merge_weight_on_the_backup_device():
    _backup_round_trip(_layer(LoraConfig(r=3, alpha=6.0)), "cpu")
    model = fastlora.inject(nn.Sequential(nn.Linear(D_IN, D_OUT)), LoraConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    fastlora.merge(model, backup_device=torch.device("cpu"))
    assert model[0].merged and model[0].weight_before_merge.device.type == "cpu"
    fastlora.unmerge(model)
    for device, message in (("nowhere", "backup_device 'nowhere' is not a device this process can allocate on"),
                            ("meta", "backup_device 'meta' holds no values, so unmerge could not restore W")):
        with pytest.raises(ValueError, match=message):  # meta was accepted and the layer could never unmerge
            fastlora.merge(model, backup_device=device)
        assert not model[0].merged and model[0].weight_before_merge is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU W kept in host memory)")
def test_merge_with_a_host_backup_keeps_gpu_memory_free():
    layer = _layer(LoraConfig(r=3, alpha=6.0)).cuda()
    before = torch.cuda.memory_allocated()
    layer.merge(backup_device="cpu")
    assert torch.cuda.memory_allocated() - before < layer.weight.numel() * layer.weight.element_size()
    layer.unmerge()
    _backup_round_trip(layer, "cpu")


def _bf16_half_ulp(values: torch.Tensor) -> torch.Tensor:
    """Half a bf16 unit in the last place of each value (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(values.abs())) - 8)


@pytest.mark.parametrize("way", ["merge", "merge_and_unload"])
def test_a_bf16_weight_merges_fp32_factors_rounding_once(way):
    """W + ΔW formed in fp32 and rounded to bf16 once (as PEFT merges): every entry within half a bf16
    ulp of the float64 sum; ΔW rounded to bf16 before the add was off by up to 2.4 half-ulps."""
    torch.manual_seed(3)
    layer = AdapterLinear(64, 48, config=LoraConfig(r=8, alpha=16), dtype=torch.bfloat16)
    assert layer.adapter.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.adapter.lora_A.normal_(std=0.3)
        layer.adapter.lora_B.normal_(std=0.3)
    a, b = layer.adapter.lora_A.double(), layer.adapter.lora_B.double()
    exact = layer.weight.double() + 2.0 * b @ a
    merged = layer.weight if way == "merge" else layer.to_linear().weight
    if way == "merge":
        layer.merge()
    assert merged.dtype == torch.bfloat16
    assert ((merged.double() - exact).abs() <= _bf16_half_ulp(exact) * 1.001).all()


@pytest.mark.parametrize("way", ["merge", "merge_and_unload"])
def test_a_bf16_weight_merges_neat_rounding_once(way):
    """NEAT's ΔW = s B_n act(A_n W) depends on W: H is formed from W in fp32 for the merge (as PEFT merges), so
    the merged bf16 W is one rounding of the float64 value; H formed in bf16 left half the entries off."""
    torch.manual_seed(4)
    layer = AdapterLinear(64, 48, config=NeatConfig(r=8, scale=0.7), dtype=torch.bfloat16)
    with torch.no_grad():
        layer.adapter.neat_B.normal_(std=0.3)
    w, a, b = layer.weight.double(), layer.adapter.neat_A.double(), layer.adapter.neat_B.double()
    exact = w + 0.7 * b @ torch.relu(w.t() @ a.t()).t()
    merged = layer.weight if way == "merge" else layer.to_linear().weight
    if way == "merge":
        layer.merge()
    assert merged.dtype == torch.bfloat16
    assert ((merged.double() - exact).abs() <= _bf16_half_ulp(exact) * 1.001).all()

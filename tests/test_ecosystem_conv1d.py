"""GPT-2's Conv1D layers (weight stored (d_in, d_out), y = x W + b) as inject targets: PEFT with
fan_in_fan_out=True is the reference for outputs, gradients and merging (float64); the weight is
adapted as a transposed view (no copy), state dicts keep Conv1D's layout, the Triton plans take the view."""
import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import fastlora
from fastlora import AdapterLinear, LoraConfig

from utils import assert_close

GPT2 = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=30, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
IDS = torch.randint(0, 30, (3, 8), generator=torch.Generator().manual_seed(1))
TARGETS = ["c_attn", "c_proj"]


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).double().eval()


def injected(seed=0, **fields):
    """A tiny GPT-2 with LoRA on c_attn and both c_proj layers, its B factors random (not zero)."""
    model = fastlora.inject(gpt2(seed), LoraConfig(r=4, alpha=8, target_modules=TARGETS, **fields))
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            layer.adapter.lora_B.copy_(torch.randn(layer.adapter.lora_B.shape, generator=generator, dtype=torch.double))
    return model


def peft_twin(model):
    """PEFT's LoRA (fan_in_fan_out=True) on the same GPT-2 weights with the same factors."""
    twin = peft.get_peft_model(gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                        fan_in_fan_out=True, lora_dropout=0.0)).double().eval()
    base = twin.base_model.model
    with torch.no_grad():
        for name, layer in fastlora.adapter_layers(model):
            module = base.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.adapter.lora_A)
            module.lora_B["default"].weight.copy_(layer.adapter.lora_B)
    return twin


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_every_conv1d_target_is_adapted_on_a_view_of_its_weight():
    base = gpt2()
    weights = {n: m.weight for n, m in base.named_modules() if isinstance(m, Conv1D)}
    model = fastlora.inject(base, LoraConfig(r=4, target_modules=TARGETS))
    layers = dict(fastlora.adapter_layers(model))
    assert sorted(layers) == sorted(n for n in weights if not n.endswith("c_fc"))
    for name, layer in layers.items():
        assert layer.fan_in_fan_out and layer.weight.shape == weights[name].shape[::-1]
        assert layer.weight.data_ptr() == weights[name].data_ptr() and torch.equal(layer.weight, weights[name].t())
    assert (layers["transformer.h.0.attn.c_attn"].in_features, layers["transformer.h.0.attn.c_attn"].out_features) \
        == (16, 48)
    assert len(list(fastlora.adapter_layers(fastlora.inject(gpt2(), LoraConfig(r=2, target_modules="all-linear"))))) \
        == 8  # every Conv1D, not the lm_head


def test_outputs_and_gradients_equal_peft_fan_in_fan_out():
    model = injected()
    twin = peft_twin(model)
    assert_close(logits(model), logits(twin), 1e-12, "logits")
    model(input_ids=IDS).logits.square().sum().backward()
    twin(input_ids=IDS).logits.square().sum().backward()
    base = twin.base_model.model
    for name, layer in fastlora.adapter_layers(model):
        module = base.get_submodule(name)
        assert_close(layer.adapter.lora_A.grad, module.lora_A["default"].weight.grad, 1e-10, f"{name} dA")
        assert_close(layer.adapter.lora_B.grad, module.lora_B["default"].weight.grad, 1e-10, f"{name} dB")


def test_merge_unmerge_and_merge_and_unload_match_peft():
    model = injected()
    twin = peft_twin(model)
    before = {n: layer.weight.clone() for n, layer in fastlora.adapter_layers(model)}
    fastlora.merge(model)
    merged_peft = twin.merge_and_unload()
    assert_close(logits(model), logits(merged_peft), 1e-12, "merged logits")
    for name, layer in fastlora.adapter_layers(model):
        assert_close(layer.weight.t(), merged_peft.get_submodule(name).weight, 1e-13, f"{name} merged W")
    fastlora.unmerge(model)
    assert all(torch.equal(layer.weight, before[n]) for n, layer in fastlora.adapter_layers(model))
    unloaded = fastlora.merge_and_unload(model)
    conv = unloaded.transformer.h[1].attn.c_attn
    assert type(conv) is Conv1D and conv.weight.shape == (16, 48) and conv.weight.is_contiguous()
    assert_close(logits(unloaded), logits(merged_peft), 1e-12, "merge_and_unload logits")


def test_unload_puts_back_conv1d_on_the_same_memory():
    base = gpt2()
    pointer, reference = base.transformer.h[0].attn.c_attn.weight.data_ptr(), logits(base)
    model = fastlora.unload(fastlora.inject(base, LoraConfig(r=4, target_modules=TARGETS)))
    conv = model.transformer.h[0].attn.c_attn
    assert type(conv) is Conv1D and conv.weight.shape == (16, 48) and conv.weight.is_contiguous()
    assert conv.weight.data_ptr() == pointer and torch.equal(logits(model), reference)


@pytest.mark.parametrize("config", [fastlora.LoraConfig, fastlora.SelectiveLoraConfig,
                                    fastlora.RankSelectiveLoraConfig, fastlora.CurLoraConfig, fastlora.NeatConfig,
                                    fastlora.CascadeLoraConfig])
def test_every_method_on_a_conv1d_equals_it_on_the_linear_of_the_same_weight(config):
    torch.manual_seed(0)
    conv = Conv1D(12, 8).double()
    linear = torch.nn.Linear(8, 12).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    layer, twin = (AdapterLinear.from_linear(m, config(r=2)) for m in (conv, linear))
    with torch.no_grad():
        for param in layer.adapter.parameters():
            param.normal_()
    twin.adapter.load_state_dict(layer.adapter.state_dict())
    x = torch.randn(3, 8, dtype=torch.double)
    assert_close(layer(x), twin(x), 1e-14)
    layer.merge()
    twin.merge()
    assert_close(conv.weight.t(), twin.weight, 1e-14, "merged W")
    assert_close(layer(x), twin(x), 1e-14, "merged output")


def test_adapter_checkpoint_loads_into_a_fresh_gpt2(tmp_path):
    model = injected()
    fastlora.save_adapter(model, tmp_path)
    fresh = fastlora.load_adapter(gpt2(), tmp_path)
    assert all(layer.fan_in_fan_out for _, layer in fastlora.adapter_layers(fresh))
    assert torch.equal(logits(fresh), logits(model))


def test_whole_model_state_dict_keeps_conv1d_layout():
    model = injected()
    state = model.state_dict()
    plain = gpt2().state_dict()
    for key, tensor in plain.items():
        assert state[key].shape == tensor.shape and state[key].is_contiguous(), key
    assert torch.equal(state["transformer.h.0.attn.c_attn.weight"], plain["transformer.h.0.attn.c_attn.weight"])
    other = injected(seed=3)
    other.load_state_dict(state)
    assert torch.equal(logits(other), logits(model))
    fresh = gpt2(seed=5)
    fresh.load_state_dict({k: v for k, v in state.items() if ".adapter." not in k})
    assert torch.equal(logits(fresh), logits(gpt2()))


@pytest.mark.parametrize("backend", ["triton", "cublas", "onepass"])
def test_triton_plans_take_the_transposed_view(backend):
    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    layer = AdapterLinear.from_linear(conv, LoraConfig(r=4, alpha=8, backend=backend))
    assert not layer.weight.is_contiguous()
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (layer.adapter.lora_A, layer.adapter.lora_B))
    ref = x64 @ conv.weight.double() + conv.bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    ref.backward(dy.double())
    assert_close(y, ref, 1e-5, "y")
    assert_close(x.grad, x64.grad, 1e-5, "dx")
    assert_close(layer.adapter.lora_A.grad, a64.grad, 1e-5, "dA")
    assert_close(layer.adapter.lora_B.grad, b64.grad, 1e-5, "dB")

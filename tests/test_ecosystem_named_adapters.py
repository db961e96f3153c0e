"""Several named adapters per model, one active at a time (PEFT's add_adapter / set_adapter /
delete_adapter): each adapter computes what a model injected with it alone computes, PEFT's
set_adapter is the reference for switching, and checkpoints act on one named adapter."""
import peft
import pytest
import torch
from torch import nn
from transformers import BertModel

import fastlora
from fastlora import CascadeLoraConfig, CurLoraConfig, LoraConfig

from utils import assert_close, tiny_bert

IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
CONFIG_A = LoraConfig(r=4, alpha=8, target_modules=["query", "value"])
CONFIG_B = LoraConfig(r=2, alpha=6, target_modules=["query", "value"])


def bert():
    torch.manual_seed(0)
    return BertModel(tiny_bert()).double().eval()


def randomize(model, seed, adapter_name=None):
    """Random factors (B too) in the named adapter of every layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            adapter = layer.adapter if adapter_name is None else layer.named_adapter(adapter_name)
            for param in adapter.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def alone(config, seed):
    """A model injected with one adapter, its factors as ``randomize`` draws them."""
    return randomize(fastlora.inject(bert(), config), seed)


def two_adapters():
    model = randomize(fastlora.inject(bert(), CONFIG_A), 1)
    return randomize(fastlora.add_adapter(model, "b", CONFIG_B), 2, "b")


def out(model):
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def test_switching_back_and_forth_gives_each_adapter_alone():
    model = two_adapters()
    ref_a, ref_b = out(alone(CONFIG_A, 1)), out(alone(CONFIG_B, 2))
    assert not torch.allclose(ref_a, ref_b)
    assert fastlora.active_adapter(model) == "default" and fastlora.adapter_names(model) == ["default", "b"]
    for name, ref in [("default", ref_a), ("b", ref_b), ("default", ref_a), ("b", ref_b)]:
        fastlora.set_adapter(model, name)
        assert fastlora.active_adapter(model) == name
        assert_close(out(model), ref, 1e-14, f"adapter {name}")
    with fastlora.disable_adapter(model):
        assert_close(out(model), out(bert()), 1e-14, "disabled")


def test_only_the_active_adapter_trains():
    model = two_adapters()
    fastlora.set_adapter(model, "b")
    layer = model.encoder.layer[0].attention.self.query
    assert layer.config.r == 2 and layer.adapter.lora_A.requires_grad
    assert not layer.named_adapter("default").lora_A.requires_grad
    assert fastlora.trainable_parameters(model).trainable == 4 * 2 * (32 + 32)
    model(input_ids=IDS).last_hidden_state.sum().backward()
    assert layer.adapter.lora_A.grad is not None and layer.named_adapter("default").lora_A.grad is None
    fastlora.set_adapter(model, "default")
    assert layer.adapter.lora_A.requires_grad and not layer.named_adapter("b").lora_B.requires_grad


def test_merge_acts_on_the_active_adapter_and_switching_while_merged_is_refused():
    model = two_adapters()
    fastlora.set_adapter(model, "b")
    fastlora.merge(model)
    assert_close(out(model), out(alone(CONFIG_B, 2)), 1e-12, "merged b")
    with pytest.raises(ValueError, match=r"cannot switch to adapter 'default' while adapter 'b' is merged into "
                                         r"\['encoder.layer.0.attention.self.query'"):
        fastlora.set_adapter(model, "default")
    assert fastlora.active_adapter(model) == "b"
    fastlora.unmerge(model)
    fastlora.set_adapter(model, "default")
    assert_close(out(model), out(alone(CONFIG_A, 1)), 1e-14, "default after unmerge")


def test_delete_adapter():
    model = two_adapters()
    with pytest.raises(ValueError, match="adapter 'default' is the active adapter; set_adapter another"):
        fastlora.delete_adapter(model, "default")
    with pytest.raises(ValueError, match=r"no adapter named 'c' \(adapters: \['default', 'b'\]\)"):
        fastlora.delete_adapter(model, "c")
    fastlora.delete_adapter(model, "b")
    assert fastlora.adapter_names(model) == ["default"]
    assert not any(".b." in key for key in model.state_dict())
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        fastlora.set_adapter(model, "b")
    assert_close(out(model), out(alone(CONFIG_A, 1)), 1e-14)


def test_save_and_load_per_name(tmp_path):
    model = two_adapters()
    fastlora.save_adapter(model, tmp_path / "b", adapter_name="b")  # "default" stays active
    fastlora.save_adapter(model, tmp_path / "default")
    assert fastlora.read_adapter_config(tmp_path / "b").r == 2
    fresh = fastlora.load_adapter(bert(), tmp_path / "b")
    assert fastlora.active_adapter(fresh) == "default"
    assert_close(out(fresh), out(alone(CONFIG_B, 2)), 1e-14, "b loaded alone")
    fastlora.load_adapter(fresh, tmp_path / "default", adapter_name="other")
    assert fastlora.adapter_names(fresh) == ["default", "other"]
    fastlora.set_adapter(fresh, "other")
    assert_close(out(fresh), out(alone(CONFIG_A, 1)), 1e-14, "default loaded as 'other'")
    named = fastlora.load_adapter(bert(), tmp_path / "b", adapter_name="b")
    assert fastlora.adapter_names(named) == ["b"]
    randomize(model, 9, "b")
    fastlora.load_adapter(model, tmp_path / "b", adapter_name="b")  # into the inactive adapter of that name
    fastlora.set_adapter(model, "b")
    assert_close(out(model), out(alone(CONFIG_B, 2)), 1e-14, "b reloaded")
    with pytest.raises(ValueError, match=r"lora_A: checkpoint shape \(2, 32\) != model shape \(4, 32\)"):
        fastlora.load_adapter(model, tmp_path / "b", adapter_name="default")


def test_a_refused_load_into_a_new_name_adds_nothing(tmp_path):
    fastlora.save_adapter(alone(LoraConfig(r=2, target_modules=["query"]), 3), tmp_path)
    model = two_adapters()
    with pytest.raises(ValueError, match="selects .* and leaves out adapted layers"):
        fastlora.load_adapter(model, tmp_path, adapter_name="c")
    assert fastlora.adapter_names(model) == ["default", "b"]


def test_peft_set_adapter_gives_the_same_outputs():
    model = two_adapters()
    twin = peft.get_peft_model(bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    twin.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, layer in fastlora.adapter_layers(model):
            module = twin.base_model.model.get_submodule(name)
            for adapter_name in ("default", "b"):
                module.lora_A[adapter_name].weight.copy_(layer.named_adapter(adapter_name).lora_A)
                module.lora_B[adapter_name].weight.copy_(layer.named_adapter(adapter_name).lora_B)
    twin.double().eval()
    for name in ("b", "default", "b"):
        fastlora.set_adapter(model, name)
        twin.set_adapter(name)
        assert_close(out(model), out(twin), 1e-13, f"adapter {name}")


def test_add_adapter_refusals_leave_the_model_unchanged():
    model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ("b", CONFIG_B, "the model has an adapter named 'b' already"),
        ("x.y", CONFIG_B, "adapter name must be a non-empty string without '.'"),
        ("c", LoraConfig(r=2, target_modules=["query", "key", "value"]),
         r"adapter 'c': the config selects \['encoder.layer.0.attention.self.key'.*leaves out adapted layers \[\]"),
        ("c", LoraConfig(r=40, target_modules=["query", "value"]),
         r"adapter 'c', layer 'encoder.layer.0.attention.self.query': r=40 exceeds"),
        ("c", CascadeLoraConfig(r=2, target_modules=["query", "value"]), "LoRASC writes its stages into W"),
    ]
    for name, config, match in cases:
        with pytest.raises(ValueError, match=match):
            fastlora.add_adapter(model, name, config)
    assert fastlora.adapter_names(model) == ["default", "b"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()
    with pytest.raises(ValueError, match="model has no fastlora adapters; call fastlora.inject first"):
        fastlora.add_adapter(bert(), "b", CONFIG_B)


def test_single_adapter_model_keeps_its_state_dict_keys():
    plain = fastlora.inject(bert(), CONFIG_A).state_dict().keys()
    model = two_adapters()
    fastlora.delete_adapter(model, "b")
    assert model.state_dict().keys() == plain


def test_an_adapter_added_while_merged_is_built_from_the_base_weight():
    """CURLoRA draws its indices from W's values: a second adapter added while the first is merged draws them
    from the base W, as it would unmerged, not from W + the first adapter's update."""
    def built(merged):
        torch.manual_seed(0)
        model = fastlora.inject(nn.Sequential(nn.Linear(12, 10)), CurLoraConfig(r=3))
        with torch.no_grad():
            model[0].adapter.U.normal_(std=30.0)  # a first adapter with a large update
        if merged:
            fastlora.merge(model)
        fastlora.add_adapter(model, "second", CurLoraConfig(r=3))
        other = model[0].named_adapter("second")
        return other.row_index.clone(), other.col_index.clone()
    unmerged, merged = built(False), built(True)
    assert all(torch.equal(a, b) for a, b in zip(unmerged, merged))

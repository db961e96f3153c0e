"""Edges of the adapter API and of checkpoint loading that the mutation sample showed unguarded: the
trainable-parameter percentage of an empty model, how many names a selection error lists, a method mismatch
in either alphabetical order, and the one shape exception (a 0-dim score for a (1,) tensor)."""
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fastlora
from fastlora import CurLoraConfig, LoraConfig
from fastlora.checkpoint import _check_tensor


def test_an_empty_model_has_zero_percent_trainable():
    summary = fastlora.trainable_parameters(nn.Sequential())
    assert (summary.trainable, summary.total, summary.percent) == (0, 0, 0.0)
    assert str(summary).endswith("trainable%: 0.0000")


def test_a_selection_error_lists_five_names_of_each_kind():
    torch.manual_seed(0)
    model = nn.ModuleDict({f"a{i}": nn.Linear(4, 4) for i in range(7)} | {"b": nn.Linear(4, 4)})
    fastlora.inject(model, LoraConfig(r=2, target_modules=[f"a{i}" for i in range(7)]))
    with pytest.raises(ValueError) as error:
        fastlora.add_adapter(model, "other", LoraConfig(r=2, target_modules=["b"]))
    listed = str(error.value).split("leaves out adapted layers ")[1].split("]")[0]
    assert listed == str([f"a{i}" for i in range(5)])[:-1]


@pytest.mark.parametrize("model_config, saved_config", [
    (LoraConfig(r=2, target_modules=["0"]), CurLoraConfig(r=2, target_modules=["0"])),  # "lora" > "curlora"
    (CurLoraConfig(r=2, target_modules=["0"]), LoraConfig(r=2, target_modules=["0"])),  # "curlora" < "lora"
])
def test_a_checkpoint_of_another_method_is_refused_whichever_name_sorts_first(tmp_path, model_config,
                                                                               saved_config):
    torch.manual_seed(0)
    fastlora.save_adapter(fastlora.inject(nn.Sequential(nn.Linear(6, 5)), saved_config), tmp_path)
    model = fastlora.inject(nn.Sequential(nn.Linear(6, 5)), model_config)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"layer 0 has a '{model_config.method}' adapter, checkpoint is "
                                         f"'{saved_config.method}'"):
        fastlora.load_adapter(model, tmp_path)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_0_dim_checkpoint_tensor_fits_only_a_one_element_vector():
    adapter = SimpleNamespace(variable_length_keys=())
    _check_tensor("0.adapter.score", torch.tensor(0.5), torch.zeros(1), nn.Identity(), adapter)
    for model_shape in [(0,), (2,), (1, 1)]:
        with pytest.raises(ValueError, match=re.escape(f"checkpoint shape () != model shape {model_shape}")):
            _check_tensor("0.adapter.score", torch.tensor(0.5), torch.zeros(model_shape), nn.Identity(), adapter)


def _two_adapters():
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)), LoraConfig(r=2))
    fastlora.add_adapter(model, "aaa", LoraConfig(r=2))  # sorts before the active "default"
    return model


def test_set_adapter_refuses_any_other_name_while_merged():
    model = _two_adapters()
    fastlora.merge(model)
    with pytest.raises(ValueError, match="cannot switch to adapter 'aaa' while adapter 'default' is merged"):
        fastlora.set_adapter(model, "aaa")
    fastlora.set_adapter(model, "".join(["def", "ault"]))  # the merged one itself: nothing to switch
    assert fastlora.active_adapter(model) == "default"


def test_delete_adapter_refuses_the_active_one_by_an_equal_name():
    model = _two_adapters()
    with pytest.raises(ValueError, match="adapter 'default' is the active adapter; set_adapter another one"):
        fastlora.delete_adapter(model, "".join(["def", "ault"]))  # built at run time: another string object
    fastlora.delete_adapter(model, "aaa")
    assert fastlora.adapter_names(model) == ["default"]


def test_add_adapter_all_linear_leaves_out_the_output_layer_as_inject():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=20, vocab_size=30))
    fastlora.inject(model, LoraConfig(r=2, target_modules="all-linear"))
    assert not any(name.startswith("cls.predictions.decoder") for name, _ in fastlora.adapter_layers(model))
    fastlora.add_adapter(model, "second", LoraConfig(r=2, target_modules="all-linear"))
    assert "second" in fastlora.adapter_names(model)


def test_unload_puts_a_plain_layer_under_every_name_of_a_shared_layer():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    fastlora.inject(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert model[0] is model[2] and isinstance(model[2], fastlora.AdapterLinear)
    fastlora.unload(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2]

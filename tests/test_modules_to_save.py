"""PEFT's ``modules_to_save``: modules trained in full beside the adapters (a classifier head)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastlora

from utils import HeadClassifier as Classifier
from utils import plain_head_classifier, tied_lm


def config(**kw):
    return fastlora.LoraConfig(r=4, alpha=8, target_modules=["encoder.0", "encoder.2"], **kw)


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_inject_unfreezes_the_named_modules_and_they_train():
    torch.manual_seed(0)
    model = fastlora.inject(Classifier(), config(modules_to_save=["classifier"]))
    assert trainable(model) == ["classifier.bias", "classifier.weight", "encoder.0.adapter.lora_A",
                                "encoder.0.adapter.lora_B", "encoder.2.adapter.lora_A", "encoder.2.adapter.lora_B"]
    before = model.classifier.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(5, 12)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.classifier.weight, before)


def test_without_modules_to_save_the_head_stays_frozen():
    model = fastlora.inject(Classifier(), config())
    assert not any(p.requires_grad for p in model.classifier.parameters())


def test_saved_head_loads_into_a_fresh_model(tmp_path):
    torch.manual_seed(1)
    model = fastlora.inject(Classifier(), config(modules_to_save=("classifier",)))
    with torch.no_grad():
        model.classifier.weight.normal_()
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    fastlora.save_adapter(model, tmp_path)
    fresh = fastlora.load_adapter(plain_head_classifier(model), tmp_path)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert trainable(fresh) == trainable(model)
    x = torch.randn(4, 12)
    torch.testing.assert_close(fresh(x), model(x))


def test_config_round_trip_keeps_the_names():
    cfg = config(modules_to_save=["classifier"])
    assert cfg.modules_to_save == ("classifier",)
    assert fastlora.AdapterConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_module_is_refused_by_name_and_the_model_is_unchanged():
    model = Classifier()
    with pytest.raises(ValueError, match="modules_to_save 'head' matches no module"):
        fastlora.inject(model, config(modules_to_save=["head"]))
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.encoder[0]) is nn.Linear


def test_an_adapted_module_cannot_also_be_saved_in_full():
    with pytest.raises(ValueError, match="also adapts"):
        fastlora.inject(Classifier(), config(modules_to_save=["encoder.0"]))


@pytest.mark.parametrize("value", ["classifier", [""], [3]])
def test_malformed_names_are_refused(value):
    with pytest.raises(TypeError, match="modules_to_save"):
        config(modules_to_save=value)


def test_a_module_holding_adapted_layers_cannot_be_saved_in_full():
    with pytest.raises(ValueError, match="'encoder'.*hold layers it adapts"):
        fastlora.inject(Classifier(), config(modules_to_save=["encoder"]))


def _trained_head(tmp_path):
    """A model whose head and adapters hold random values, frozen again after training, and a fresh
    model loaded from its checkpoint."""
    torch.manual_seed(2)
    model = fastlora.inject(Classifier(), config(modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_()
    model.requires_grad_(False)  # evaluation code often freezes everything
    fastlora.save_adapter(model, tmp_path / "first")
    fresh = fastlora.load_adapter(plain_head_classifier(model), tmp_path / "first")
    return model, fresh


def test_a_head_frozen_again_before_saving_is_still_saved(tmp_path):
    model, fresh = _trained_head(tmp_path)
    assert fastlora.read_adapter_config(tmp_path / "first").modules_to_save is None  # the layers' config
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    x = torch.randn(4, 12)
    torch.testing.assert_close(fresh(x), model(x))


def test_a_loaded_head_is_saved_again_after_it_is_frozen(tmp_path):
    model, fresh = _trained_head(tmp_path)
    fresh.requires_grad_(False)
    fastlora.save_adapter(fresh, tmp_path / "second")
    again = fastlora.load_adapter(plain_head_classifier(model, zeroed="bias"), tmp_path / "second")
    assert torch.equal(again.classifier.bias, model.classifier.bias)


def test_frozen_modules_outside_modules_to_save_stay_out_of_the_checkpoint(tmp_path):
    _trained_head(tmp_path)
    saved = load_file(tmp_path / "first" / "adapter_model.safetensors")
    assert sorted(k for k in saved if "adapter" not in k) == ["classifier.bias", "classifier.weight"]


def test_a_named_adapter_cannot_bring_its_own_modules_to_save():
    model = fastlora.inject(Classifier(), config(modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="adapter 'b': modules_to_save=\\['classifier'\\] is not taken by add_adapter"):
        fastlora.add_adapter(model, "b", config(modules_to_save=["classifier"]))
    assert fastlora.adapter_names(model) == ["default"]


def test_a_head_tied_to_the_input_embeddings_is_refused():
    """modules_to_save=["lm_head"] with lm_head tied to the embeddings would train the embeddings too."""
    model = tied_lm()
    with pytest.raises(ValueError, match=r"is also embed's 'weight' \(tied weights\).*save 'embed' in full too"):
        fastlora.inject(model, fastlora.LoraConfig(r=2, target_modules=["body"], modules_to_save=["lm_head"]))
    assert all(p.requires_grad for p in model.parameters()) and type(model.body) is nn.Linear
    fastlora.inject(model, fastlora.LoraConfig(r=2, target_modules=["body"], modules_to_save=["lm_head", "embed"]))
    assert model.embed.weight.requires_grad

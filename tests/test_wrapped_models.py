"""Checkpoints of a model inside torch.compile's or DataParallel's wrapper: saved and loaded under the plain
model's layer names, so that a checkpoint moves between the wrapped and the plain model (fastlora's format and
PEFT's)."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastlora

from utils import HeadClassifier, plain_head_classifier

WRAPPERS = {"compile": lambda model: torch.compile(model), "data_parallel": nn.DataParallel}


def _adapted(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = fastlora.LoraConfig(r=4, alpha=8, target_modules=["encoder.0", "encoder.2"],
                                 modules_to_save=["classifier"])
    model = fastlora.inject(HeadClassifier(), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_()
    return model


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_a_wrapped_models_checkpoint_loads_into_the_plain_model(tmp_path, wrap):
    model = _adapted(0)
    fastlora.save_adapter(WRAPPERS[wrap](model), tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(keys) == ["classifier.bias", "classifier.weight", "encoder.0.adapter.lora_A",
                            "encoder.0.adapter.lora_B", "encoder.0.adapter.tasks_done", "encoder.2.adapter.lora_A",
                            "encoder.2.adapter.lora_B", "encoder.2.adapter.tasks_done"]
    plain = fastlora.load_adapter(plain_head_classifier(model), tmp_path)
    x = torch.randn(5, 12)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_a_plain_checkpoint_loads_into_a_wrapped_model(tmp_path, wrap):
    model = _adapted(1)
    fastlora.save_adapter(model, tmp_path)
    target = plain_head_classifier(model)
    wrapper = WRAPPERS[wrap](target)
    assert fastlora.load_adapter(wrapper, tmp_path) is wrapper
    x = torch.randn(5, 12)
    torch.testing.assert_close(target(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_peft_format_round_trip_through_wrappers(tmp_path, wrap):
    model = _adapted(2)
    fastlora.save_peft_adapter(WRAPPERS[wrap](model), tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("_orig_mod" in k or ".module." in k for k in keys), sorted(keys)
    target = plain_head_classifier(model)
    wrapper = WRAPPERS[wrap](target)
    assert fastlora.load_peft_adapter(wrapper, tmp_path) is wrapper
    x = torch.randn(5, 12)
    torch.testing.assert_close(target(x), model(x))

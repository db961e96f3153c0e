"""targets' name matching and output-layer rules on their own: matches_targets for every form of
target_modules, a blank model_type, and a classification head registered under two names."""
from types import SimpleNamespace

import pytest
from torch import nn

import fastlora
from fastlora import LoraConfig
from fastlora.targets import matches_targets, model_type, output_layer_names, projection_config


@pytest.mark.parametrize("targets, name, expected", [
    (None, "encoder.layer.0.query", True),
    ("all-linear", "anything", True),
    ("".join(["all", "-linear"]), "anything", True),  # equal, not the same object
    (r"encoder\.layer\.\d+\.query", "encoder.layer.3.query", True),
    (r"encoder\.layer\.\d+\.query", "encoder.layer.3.query.x", False),  # a full match, not a search
    (r"layer\.\d+\.query", "encoder.layer.3.query", False),
    (("query", "value"), "encoder.layer.0.query", True),  # a name matches as a "." suffix
    (("query", "value"), "encoder.layer.0.my_query", False),
    (("encoder.layer.0.query",), "encoder.layer.0.query", True),  # or whole
    (("key",), "key", True),
    ((), "encoder.layer.0.query", False),
])
def test_matches_targets(targets, name, expected):
    assert matches_targets(name, targets) is expected


class Classifier(nn.Module):
    """A transformers-like model (config.model_type) with a head under two names."""

    def __init__(self, kind: str):
        super().__init__()
        self.config = SimpleNamespace(model_type=kind)
        self.body = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)
        self.head_alias = self.classifier  # the same module registered twice


def test_a_blank_model_type_is_no_model_type():
    model = Classifier("")
    assert model_type(model) is None
    fastlora.inject(model, LoraConfig(r=1))  # no default targets to look up: every nn.Linear
    assert {name for name, _ in fastlora.adapter_layers(model)} == {"body", "classifier"}
    assert isinstance(model.head_alias, fastlora.AdapterLinear) and model.head_alias is model.classifier


def test_all_linear_leaves_out_every_name_of_the_head():
    model = Classifier("bert")
    assert output_layer_names(model) == {"classifier", "head_alias"}
    fastlora.inject(model, LoraConfig(r=1, target_modules="all-linear"))
    assert {name for name, _ in fastlora.adapter_layers(model)} == {"body"}
    assert isinstance(model.classifier, nn.Linear) and model.head_alias is model.classifier


@pytest.mark.parametrize("pattern, in_r, out_r", [({"attn.in_proj": 2}, 2, 4), ({"attn.out_proj": 3}, 4, 3),
                                                  ({"attn": 5}, 5, 5), ({}, 4, 4)])
def test_an_attention_projection_takes_its_own_pattern_entry_else_the_attentions(pattern, in_r, out_r):
    config = LoraConfig(r=4, rank_pattern=pattern)
    assert projection_config(config, "attn.in_proj", "attn").r == in_r
    assert projection_config(config, "attn.out_proj", "attn").r == out_r

"""PEFT interop: PEFT checkpoints load into fastlora with PEFT's outputs, and back.

A tiny random BertModel (no downloads) is adapted by peft itself, saved with
``save_pretrained`` and loaded into a fresh copy with identical base weights.
"""
import copy
import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel

import fastlora
from fastlora import load_peft_adapter, save_peft_adapter

from utils import rel, tiny_bert

TOL = 1e-6


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return BertModel(tiny_bert()).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (3, 11), generator=generator)


def output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def save_peft(base, config, directory):
    """peft-adapted copy of ``base`` saved to ``directory``; returns it (eval mode)."""
    torch.manual_seed(2)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(str(directory))
    return model


def lora(**kwargs):
    fields = dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    return peft.LoraConfig(**{**fields, **kwargs})


def test_peft_saves_the_layout_the_loader_reads(base, tmp_path):
    save_peft(base, lora(), tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"target_modules": r".*\.(key|dense)"},
                                   {"lora_dropout": 0.1, "lora_alpha": 5}])
def test_load_lora_matches_peft(base, inputs, tmp_path, extra):
    reference = output(save_peft(base, lora(**extra), tmp_path), inputs)
    assert rel(reference, output(base, inputs)) > 1e-3  # the adapters change the output
    model = load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    assert rel(output(model, inputs), reference) < TOL
    config = next(fastlora.adapter_layers(model))[1].config
    assert type(config) is fastlora.LoraConfig and config.r == 4
    assert config.use_rslora == extra.get("use_rslora", False)
    assert config.dropout == extra.get("lora_dropout", 0.0) and config.alpha == extra.get("lora_alpha", 8)
    assert config.target_modules == extra.get("target_modules", config.target_modules)
    assert fastlora.trainable_parameter_count(model) == sum(
        t.numel() for t in load_file(str(tmp_path / "adapter_model.safetensors")).values())


def test_load_layers_subset_uses_the_checkpoint_paths(base, inputs, tmp_path):
    reference = output(save_peft(base, lora(layers_to_transform=[1], layers_pattern="layer"), tmp_path), inputs)
    model = load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    assert [n for n, _ in fastlora.adapter_layers(model)] == [
        "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value"]
    assert rel(output(model, inputs), reference) < TOL


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_lora_loads_in_peft(base, inputs, tmp_path, use_rslora):
    model = fastlora.inject(copy.deepcopy(base), fastlora.LoraConfig(
        r=3, alpha=6.0, use_rslora=use_rslora, target_modules=["query", "dense"])).eval()
    torch.manual_seed(3)
    for _, layer in fastlora.adapter_layers(model):
        torch.nn.init.normal_(layer.adapter.lora_B, std=0.5)
    expected = output(model, inputs)
    assert rel(expected, output(base, inputs)) > 1e-3
    save_peft_adapter(model, tmp_path / "out", base_model_name_or_path="tiny-bert")
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["base_model_name_or_path"] == "tiny-bert"
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    assert rel(output(loaded, inputs), expected) < TOL
    again = load_peft_adapter(copy.deepcopy(base), tmp_path / "out").eval()
    assert rel(output(again, inputs), expected) < TOL


@pytest.mark.parametrize("depth,activation", [(0, "relu"), (1, "gelu"), (2, "identity")])
def test_export_neat_loads_in_peft_as_peanut(base, inputs, tmp_path, depth, activation):
    model = fastlora.inject(copy.deepcopy(base), fastlora.NeatConfig(
        r=3, depth=depth, activation=activation, scale=0.8, target_modules=["key", "dense"])).eval()
    torch.manual_seed(4)
    for _, layer in fastlora.adapter_layers(model):
        torch.nn.init.normal_(layer.adapter.neat_B, std=0.5)
    expected = output(model, inputs)
    assert rel(expected, output(base, inputs)) > 1e-3
    save_peft_adapter(model, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "PEANUT" and meta["depth"] == depth and meta["scaling"] == 0.8
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    assert isinstance(loaded.peft_config["default"], peft.PeanutConfig)
    assert rel(output(loaded, inputs), expected) < TOL
    again = load_peft_adapter(copy.deepcopy(base), tmp_path / "out").eval()
    assert rel(output(again, inputs), expected) < TOL


def test_export_into_an_existing_directory_keeps_other_files(base, tmp_path):
    model = fastlora.inject(copy.deepcopy(base), fastlora.LoraConfig(r=2, target_modules=["query"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other.txt").write_text("old")
    save_peft_adapter(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors", "other.txt"]
    assert (tmp_path / "out" / "other.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_refuses_what_peft_lora_cannot_hold(base, tmp_path):
    with pytest.raises(ValueError, match="no fastlora adapters"):
        save_peft_adapter(copy.deepcopy(base), tmp_path / "a")
    mixed = fastlora.inject(copy.deepcopy(base), fastlora.LoraConfig(r=2, target_modules=["query"]))
    layers = [layer for _, layer in fastlora.adapter_layers(mixed)]
    layers[1].config = fastlora.LoraConfig(r=2, use_rslora=True, target_modules=["query"])
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.query has use_rslora=True"):
        save_peft_adapter(mixed, tmp_path / "b")
    for config in (fastlora.CurLoraConfig(r=2, target_modules=["query"]),
                   fastlora.SelectiveLoraConfig(r=2, target_modules=["query"])):
        other = fastlora.inject(copy.deepcopy(base), config)
        with pytest.raises(ValueError, match=rf"'{config.method}' adapter; PEFT export supports plain LoRA"):
            save_peft_adapter(other, tmp_path / "b")
    merged = fastlora.inject(copy.deepcopy(base), fastlora.LoraConfig(r=2, target_modules=["query"]))
    fastlora.merge(merged)
    with pytest.raises(ValueError, match="merged"):
        save_peft_adapter(merged, tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_export_of_layers_with_different_methods_names_the_method(base, tmp_path):
    """Of the fields two layers differ in, the error names the method first (the others follow from it)."""
    model = fastlora.inject(copy.deepcopy(base), fastlora.LoraConfig(r=2, target_modules=["query"]))
    layers = [layer for _, layer in fastlora.adapter_layers(model)]
    layers[1].config = fastlora.NeatConfig(r=2, target_modules=["query"])
    with pytest.raises(ValueError, match=r"encoder.layer.1.attention.self.query has method='neat', unlike layer "
                                         r"encoder.layer.0.attention.self.query's 'lora'"):
        save_peft_adapter(model, tmp_path / "out")


def test_export_of_neat_over_conv1d_layers_names_the_first_one(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    model = fastlora.inject(torch.nn.Sequential(Conv1D(6, 6), Conv1D(6, 6)),
                            fastlora.NeatConfig(r=2, target_modules=["0", "1"]))
    with pytest.raises(ValueError, match=r"^layer 0 wraps a Conv1D; PEFT's PEANUT adapts nn.Linear only$"):
        save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("depth, act_fn, scaling", [(0, "relu", 1.0), (1, "relu", 0.7), (2, "gelu", 1.0),
                                                     (1, "linear", 1.3)])
def test_load_peanut_matches_peft(base, inputs, tmp_path, depth, act_fn, scaling):
    config = peft.PeanutConfig(r=4, depth=depth, act_fn=act_fn, scaling=scaling,
                               target_modules=["query", "intermediate.dense"])
    model = save_peft(base, config, tmp_path / "zero")
    for name, param in model.named_parameters():
        if "peanut_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(str(tmp_path))
    reference = output(model, inputs)
    assert rel(reference, output(base, inputs)) > 1e-3
    loaded = load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    assert rel(output(loaded, inputs), reference) < TOL
    layer = loaded.get_submodule("encoder.layer.0.intermediate.dense")
    assert layer.config == fastlora.NeatConfig(r=4, depth=depth, activation={"linear": "identity"}.get(act_fn, act_fn),
                                               scale=scaling, target_modules=["intermediate.dense", "query"])
    assert layer.adapter.neat_A.shape == (4, 37)
    assert fastlora.trainable_parameter_count(loaded) == sum(
        t.numel() for t in load_file(str(tmp_path / "adapter_model.safetensors")).values())


def test_load_peanut_refuses_what_neat_cannot_represent(base, tmp_path):
    save_peft(base, peft.PeanutConfig(r=4, depth=1, target_modules=["query"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    for field, value in (("act_fn", "gelu_new"), ("depth", 2)):
        path.write_text(json.dumps({**meta, field: value}))
        message = "peanut_encoders.1.weight" if field == "depth" else f"{field}={value!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            load_peft_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("bias", "all"),
    ("lora_bias", True), ("peft_type", "IA3"),
])
def test_load_refuses_unsupported_config_fields(base, tmp_path, field, value):
    save_peft(base, lora(), tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta[field] = value
    path.write_text(json.dumps(meta))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=field if field != "peft_type" else "unsupported peft_type 'IA3'"):
        load_peft_adapter(model, tmp_path)
    assert not list(fastlora.adapter_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_load_accepts_patterns_that_repeat_the_global_values(base, inputs, tmp_path):
    reference = output(save_peft(base, lora(rank_pattern={"query": 4}, alpha_pattern={"value": 8}), tmp_path),
                       inputs)
    assert rel(output(load_peft_adapter(copy.deepcopy(base), tmp_path).eval(), inputs), reference) < TOL


def test_fan_in_fan_out_over_linear_layers_is_ignored_as_peft_ignores_it(base, inputs, tmp_path):
    reference = output(save_peft(base, lora(), tmp_path), inputs)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        assert rel(output(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)), inputs), reference) < TOL
    assert rel(output(load_peft_adapter(copy.deepcopy(base), tmp_path).eval(), inputs), reference) < TOL


def test_load_refuses_real_dora_and_non_linear_targets(base, tmp_path):
    save_peft(base, lora(use_dora=True), tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "dora")
    save_peft(base, lora(target_modules=["word_embeddings", "query"]), tmp_path / "emb")
    with pytest.raises(ValueError, match="word_embeddings.lora_embedding_A"):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "emb")
    convolutional = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8), "conv": torch.nn.Conv1d(8, 8, 1)})
    save_peft(convolutional, lora(target_modules=["proj", "conv"]), tmp_path / "conv")
    with pytest.raises(ValueError, match="'conv', a Conv1d; fastlora adapts nn.Linear, Conv1D and nn.Multihead"):
        load_peft_adapter(copy.deepcopy(convolutional), tmp_path / "conv")


def test_load_refuses_checkpoints_that_do_not_fit(base, tmp_path):
    save_peft(base, lora(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
    cases = [
        ({**state, key: torch.zeros(32, 5)}, r"lora_B.weight has shape \(32, 5\), expected \(32, 4\)"),
        ({k: v for k, v in state.items() if k != key}, r"lacks \['lora_B.weight'\]"),
        ({**state, key.replace("lora_B", "lora_magnitude_vector"): torch.zeros(32)}, "lora_magnitude_vector"),
        ({**state, key.replace("layer.0", "layer.7"): state[key].clone()}, "'encoder.layer.7.attention.self.query'"),
    ]
    for tensors, message in cases:
        save_file(tensors, str(weights))
        with pytest.raises(ValueError, match=message):
            load_peft_adapter(copy.deepcopy(base), tmp_path)
    expected = r" \(expected a PEFT save_pretrained directory\)"
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json in \S*nowhere" + expected):
        load_peft_adapter(copy.deepcopy(base), tmp_path / "nowhere")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors \(or adapter_model.bin\) in \S*" +
                       expected):
        load_peft_adapter(copy.deepcopy(base), tmp_path)
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin does not hold a dict of named tensors"):
        load_peft_adapter(copy.deepcopy(base), tmp_path)


def test_load_reads_peft_pickled_weights(base, inputs, tmp_path):
    """``save_pretrained(safe_serialization=False)`` writes adapter_model.bin: read with weights_only."""
    torch.manual_seed(2)
    reference_model = peft.get_peft_model(copy.deepcopy(base), lora()).eval()
    reference_model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    model = load_peft_adapter(copy.deepcopy(base), tmp_path).eval()
    assert rel(output(model, inputs), output(reference_model, inputs)) < TOL


def test_load_refuses_a_model_that_has_adapters(base, tmp_path):
    save_peft(base, lora(), tmp_path)
    model = fastlora.inject(copy.deepcopy(base), fastlora.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="already has fastlora adapters"):
        load_peft_adapter(model, tmp_path)


def test_fields_a_peft_config_leaves_out_take_peft_defaults():
    """adapter_config.json may omit fields at their defaults: each read as PEFT's own dataclass default; an
    exported PEANuT config states PEFT's init_weights default."""
    from fastlora.peft_formats import PEANUT_ACTIVATIONS
    from fastlora.registry import peft_methods

    formats = {name: method.peft_format for name, method in peft_methods().items()}
    lora, default = formats["LORA"].config({"peft_type": "LORA", "target_modules": ["q"]}), peft.LoraConfig()
    assert (lora.r, lora.alpha, lora.dropout, lora.use_rslora) == (default.r, default.lora_alpha,
                                                                    default.lora_dropout, default.use_rslora)
    neat, default = formats["PEANUT"].config({"peft_type": "PEANUT", "target_modules": ["q"]}), peft.PeanutConfig()
    assert (neat.r, neat.depth, neat.activation, neat.scale) == (default.r, default.depth,
                                                                  PEANUT_ACTIVATIONS[default.act_fn], default.scaling)
    assert formats["PEANUT"].peft_config(neat)["init_weights"] == default.init_weights

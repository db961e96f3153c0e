"""Configs built with PEFT's field names mean what PEFT means: the same keywords give PEFT's outputs."""
import copy
import dataclasses

import peft
import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import fastlora
from fastlora import CurLoraConfig, LoraConfig, NeatConfig, RankSelectiveLoraConfig

from utils import tiny_bert

PEFT_KWARGS = dict(r=4, lora_alpha=16, lora_dropout=0.1, task_type="FEATURE_EXTRACTION",
                   target_modules={"query", "value"})


def test_peft_keywords_give_peft_outputs():
    torch.manual_seed(0)
    bert = BertModel(tiny_bert(dropout=0.1)).double().eval()
    reference = peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(**PEFT_KWARGS, init_lora_weights=False))
    config = LoraConfig(**PEFT_KWARGS)
    assert (config.alpha, config.dropout, config.target_modules) == (16, 0.1, ("query", "value"))
    model = fastlora.inject(bert, config).eval()
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    for name, layer in fastlora.adapter_layers(model):
        layer.adapter.lora_A.data.copy_(peft_layers[name].lora_A["default"].weight)
        layer.adapter.lora_B.data.copy_(peft_layers[name].lora_B["default"].weight)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference.eval()(input_ids=ids).last_hidden_state
        got = model(input_ids=ids).last_hidden_state
    assert ((got - want).norm() / want.norm()).item() < 1e-12


def test_aliases_are_not_stored_and_survive_replace_and_json():
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1)
    assert "lora_alpha" not in config.to_dict() and config.to_dict()["task_type"] is None
    assert fastlora.AdapterConfig.from_dict(config.to_dict()) == config
    assert dataclasses.replace(config, r=8).alpha == 16
    assert RankSelectiveLoraConfig(lora_alpha=4.0).scale == 4.0 / 16
    assert NeatConfig(lora_dropout=0.2).dropout == 0.2


@pytest.mark.parametrize("task_type, trained", [("SEQ_CLS", ["classifier.bias", "classifier.weight"]),
                                                (peft.TaskType.SEQ_CLS, ["classifier.bias", "classifier.weight"]),
                                                ("FEATURE_EXTRACTION", []), (None, [])])
def test_task_type_trains_the_task_head_as_peft_does(task_type, trained):
    """SEQ_CLS trains the classifier in full (PEFT's model wrapper adds it to modules_to_save); it was ignored, so
    a new classification head stayed random and frozen. The head is saved and restored with the adapters."""
    torch.manual_seed(0)
    bert = BertForSequenceClassification(tiny_bert(num_labels=3))
    reference = peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(
        r=4, target_modules=["query", "value"], **({} if task_type is None else {"task_type": task_type})))
    config = LoraConfig(r=4, target_modules=["query", "value"], task_type=task_type)
    assert config.task_type == (None if task_type is None else str(peft.TaskType(task_type).value))
    model = fastlora.inject(bert, config)
    ours = sorted(n for n, p in model.named_parameters() if p.requires_grad and ".adapter." not in n)
    theirs = sorted(n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
                    for n, p in reference.named_parameters() if p.requires_grad and "lora_" not in n)
    assert ours == theirs == trained
    assert fastlora.AdapterConfig.from_dict(config.to_dict()) == config


def test_task_type_outside_peft_task_types_is_refused():
    with pytest.raises(ValueError, match=r"LoraConfig.task_type must be None or one of PEFT's task types .*got 'SEQ'"):
        LoraConfig(task_type="SEQ")


@pytest.mark.parametrize("make, match", [
    (lambda: LoraConfig(alpha=4.0, lora_alpha=16), "give alpha or PEFT's lora_alpha, not both"),
    (lambda: LoraConfig(dropout=0.2, lora_dropout=0.1), "give dropout or PEFT's lora_dropout, not both"),
    (lambda: LoraConfig(alpha=8.0, lora_alpha=16), "give alpha or PEFT's lora_alpha, not both"),  # alpha's default
    (lambda: LoraConfig(dropout=0.0, lora_dropout=0.1), "give dropout or PEFT's lora_dropout, not both"),
    (lambda: LoraConfig(4, None, 0.0, lora_dropout=0.1), "give dropout or PEFT's lora_dropout, not both"),
    (lambda: NeatConfig(lora_alpha=16), "NeatConfig has no lora_alpha"),
    (lambda: CurLoraConfig(lora_alpha=16), "CurLoraConfig has no lora_alpha"),
    (lambda: LoraConfig(lora_dropout=1.5), r"LoraConfig.dropout must be a number in \[0, 1\), got 1.5"),
])
def test_bad_aliases_are_refused_with_the_field_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("data", [["lora"], "lora", None])
def test_from_dict_refuses_what_is_not_a_dict_by_name(data):
    with pytest.raises(TypeError, match="from_dict takes a dict of fields"):
        fastlora.AdapterConfig.from_dict(data)


@pytest.mark.parametrize("make,named", [
    (lambda: RankSelectiveLoraConfig(sparsity_strength=1e-3), "sparsity_strength was removed.*kappa_max"),
    (lambda: fastlora.CascadeLoraConfig(noise_std=0.1), "noise_std was replaced by noise_intensity"),
    (lambda: fastlora.CascadeLoraConfig(max_cascades=4), "max_cascades was removed"),
    (lambda: fastlora.AdapterConfig.from_dict({"method": "cascade_lora", "noise_std": 0.1}), "noise_intensity"),
])
def test_keywords_of_earlier_versions_name_their_replacement(make, named):
    with pytest.raises(TypeError, match=named):
        make()


def test_configs_still_copy_replace_and_pickle():
    import pickle

    config = fastlora.CascadeLoraConfig(r=4, noise_intensity=0.1)
    assert dataclasses.replace(config, r=8).r == 8
    assert copy.deepcopy(config) == config == pickle.loads(pickle.dumps(config))


def test_task_heads_are_trained_in_full_not_adapted_under_all_linear():
    """DistilBERT's pre_classifier is a Linear that "all-linear" selects: with SEQ_CLS PEFT trains it in full (its
    modules_to_save stay out of the targets); it was adapted over its frozen random weights."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37,
                                                                 vocab_size=50, num_labels=2))
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                          task_type="SEQ_CLS"))
    fastlora.inject(model, LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS"))
    ours = {n.removesuffix(".adapter.lora_A").removesuffix(".adapter.lora_B")
            for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.").replace(".modules_to_save.default", "").split(".lora_")[0]
              for n, p in reference.named_parameters() if p.requires_grad}
    assert ours == theirs and {"pre_classifier.weight", "classifier.weight"} <= ours
    assert not isinstance(model.pre_classifier, fastlora.AdapterLinear)


def test_task_heads_and_named_adapters_and_peft_round_trips():
    """add_adapter takes the config inject took (it selected the head inject leaves out); a selection of task
    heads only is refused (inject adapted nothing); a PEFT checkpoint's task_type is read back."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37,
                                                                 vocab_size=50, num_labels=2))
    config = LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS")
    fastlora.inject(model, config)
    fastlora.add_adapter(model, "b", config)
    assert fastlora.adapter_names(model) == ["default", "b"]
    with pytest.raises(ValueError, match=r"adapts only the heads of task_type 'SEQ_CLS', which it trains in full"):
        fastlora.inject(BertForSequenceClassification(tiny_bert(num_labels=2)),
                        LoraConfig(r=2, target_modules=["classifier"], task_type="SEQ_CLS"))


def test_a_peft_checkpoints_task_type_is_kept_on_import(tmp_path):
    torch.manual_seed(0)
    bert = BertForSequenceClassification(tiny_bert(num_labels=3))
    peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
                        ).save_pretrained(tmp_path)
    model = fastlora.load_peft_adapter(copy.deepcopy(bert), tmp_path)
    assert next(fastlora.adapter_layers(model))[1].config.task_type == "SEQ_CLS"
    assert model.classifier.weight.requires_grad

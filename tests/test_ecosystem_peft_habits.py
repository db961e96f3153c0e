"""PEFT habits on fastlora models: modules_to_save in checkpoints, disable_adapter, the trainable-parameter
summary (PEFT's own count as reference), unload without merging, per-method stats."""
import copy

import peft
import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification, BertModel

import fastlora
from fastlora import LoraConfig, SelectiveLoraConfig

from utils import tiny_bert

IDS = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))


def classifier(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert(num_labels=3)).eval()


def trained_classifier():
    """A LoRA classifier whose head (unfrozen by the user) and adapters took a few SGD steps."""
    model = fastlora.inject(classifier(), LoraConfig(r=2, target_modules=["query", "value"]))
    model.classifier.requires_grad_(True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(input_ids=IDS).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_a_trained_classifier_head_is_saved_and_restored(tmp_path):
    model = trained_classifier()
    assert not torch.equal(model.classifier.weight, classifier().classifier.weight)
    fastlora.save_adapter(model, tmp_path)
    assert fastlora.checkpoint.read_adapter_config(tmp_path).r == 2
    fresh = classifier()
    assert not torch.allclose(logits(fresh), logits(model))
    fastlora.load_adapter(fresh, tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    assert fresh.classifier.weight.requires_grad and not fresh.bert.embeddings.word_embeddings.weight.requires_grad


def test_saved_parameters_the_model_lacks_are_refused_and_the_model_is_unchanged(tmp_path):
    fastlora.save_adapter(trained_classifier(), tmp_path)
    torch.manual_seed(0)
    other = BertForSequenceClassification(tiny_bert(num_labels=2)).eval()  # head of another shape
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint parameter 'classifier.bias'.*\(3,\).*\(2,\)"):
        fastlora.load_adapter(other, tmp_path)
    assert not list(fastlora.adapter_layers(other))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_disable_adapter_gives_the_base_model_and_restores_each_layer():
    base = classifier()
    model = trained_classifier()
    model.classifier.load_state_dict(base.classifier.state_dict())
    layers = [layer for _, layer in fastlora.adapter_layers(model)]
    layers[0].adapter_enabled = False
    with fastlora.disable_adapter(model):
        assert torch.allclose(logits(model), logits(base), atol=1e-6)
    assert [layer.adapter_enabled for layer in layers] == [False] + [True] * (len(layers) - 1)
    with pytest.raises(RuntimeError), fastlora.disable_adapter(model):
        raise RuntimeError("the block fails")
    assert [layer.adapter_enabled for layer in layers] == [False] + [True] * (len(layers) - 1)
    with pytest.raises(ValueError, match="no fastlora adapters"), fastlora.disable_adapter(base):
        pass


def test_trainable_parameter_summary_matches_peft():
    torch.manual_seed(0)
    bert = BertModel(tiny_bert())
    reference = peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    trainable, total = reference.get_nb_trainable_parameters()
    summary = fastlora.trainable_parameters(fastlora.inject(bert, LoraConfig(r=4, target_modules=["query", "value"])))
    assert (summary.trainable, summary.total) == (trainable, total)
    assert summary.percent == pytest.approx(100 * trainable / total)
    assert str(summary) == (f"trainable params: {trainable:,} || all params: {total:,} || "
                            f"trainable%: {100 * trainable / total:.4f}")


@pytest.mark.parametrize("merged", [False, True])
def test_unload_puts_back_the_original_linears_without_merging(merged):
    base = classifier()
    model = trained_classifier()
    model.classifier.load_state_dict(base.classifier.state_dict())
    query = model.bert.encoder.layer[0].attention.self.query
    weight = query.weight
    if merged:
        fastlora.merge(model)
    fastlora.unload(model)
    restored = model.bert.encoder.layer[0].attention.self.query
    assert type(restored) is torch.nn.Linear and restored.weight is weight
    assert not list(fastlora.adapter_layers(model))
    assert torch.equal(logits(model), logits(base))


def test_adapter_stats_count_active_blocks():
    model = fastlora.inject(classifier(), SelectiveLoraConfig(r=2, target_modules=["query", "value"]))
    layers = [layer for _, layer in fastlora.adapter_layers(model)]
    with torch.no_grad():
        layers[0].adapter.score.fill_(-1.0)
    stats = fastlora.adapter_stats(model)
    assert stats["fastlora/selective_lora/layers"] == 4.0
    assert stats["fastlora/selective_lora/active"] == 3.0
    assert stats["fastlora/selective_lora/score"] == pytest.approx((3 * 0.15 - 1.0) / 4)


def test_a_peft_seq_cls_checkpoint_loads_with_its_head(tmp_path):
    reference = peft.get_peft_model(classifier(), peft.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False,
                                                                  target_modules=["query", "value"])).eval()
    with torch.no_grad():
        reference.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    reference.save_pretrained(str(tmp_path))
    model = fastlora.load_peft_adapter(classifier(), tmp_path).eval()
    assert torch.allclose(logits(model), logits(reference), atol=1e-6)
    assert not torch.allclose(logits(classifier()), logits(reference), atol=1e-3)
    assert model.classifier.weight.requires_grad


def test_a_peft_checkpoint_with_a_nested_module_to_save_loads_it(tmp_path):
    """modules_to_save names a module inside another (the pooler in "bert.pooler"): its tensors load too."""
    config = peft.LoraConfig(r=2, init_lora_weights=False, modules_to_save=["pooler"],
                             target_modules=["query", "value"])
    reference = peft.get_peft_model(classifier(), config).eval()
    with torch.no_grad():
        reference.base_model.model.bert.pooler.modules_to_save["default"].dense.weight.normal_()
    reference.save_pretrained(str(tmp_path))
    model = fastlora.load_peft_adapter(classifier(), tmp_path).eval()
    assert torch.equal(model.bert.pooler.dense.weight,
                       reference.base_model.model.bert.pooler.modules_to_save["default"].dense.weight)
    assert torch.allclose(logits(model), logits(reference), atol=1e-6)
    assert model.bert.pooler.dense.weight.requires_grad


def test_an_exported_head_loads_in_plain_peft(tmp_path):
    model = trained_classifier()
    fastlora.save_peft_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(classifier(), str(tmp_path)).eval()
    assert torch.allclose(logits(loaded), logits(model), atol=1e-6)


@pytest.mark.parametrize("call", [fastlora.merge, fastlora.unmerge, fastlora.merge_and_unload, fastlora.unload,
                                  lambda model: fastlora.set_adapters_enabled(model, False)],
                         ids=["merge", "unmerge", "merge_and_unload", "unload", "set_adapters_enabled"])
def test_calls_on_the_adapters_refuse_a_model_without_any(call):
    """They did nothing, silently (a PEFT model's merge_and_unload came back unmerged)."""
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"model has no fastlora adapters; call fastlora.inject first \(a PEFT "
                                         r"model's adapters: PEFT's own calls"):
        call(model)


class _WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = BertModel(tiny_bert())
        self.head = nn.Linear(self.body.config.hidden_size, 3)

    def forward(self, input_ids):
        return self.head(self.body(input_ids=input_ids).last_hidden_state)


@pytest.mark.parametrize("targets", ["all-linear", None])
def test_implicit_targets_leave_modules_to_save_out_as_peft_does(targets):
    """PEFT trains a modules_to_save module in full and adapts the other layers all-linear (or the default)
    selects; fastlora refused the overlap. An explicit list naming it stays refused, naming the fix."""
    config = LoraConfig(r=2, target_modules=targets, modules_to_save=["head"])
    model = fastlora.inject(_WithHead(), config)
    peft_model = peft.get_peft_model(_WithHead(), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                  modules_to_save=["head"]))
    peft_adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n for n, _ in fastlora.adapter_layers(model)} == peft_adapted and "head" not in peft_adapted
    assert model.head.weight.requires_grad
    fastlora.add_adapter(model, "second", LoraConfig(r=2, target_modules=targets))  # the same layers, head left out
    with pytest.raises(ValueError, match=r"a module is either trained in full or adapted: drop it from "
                                         r"target_modules"):
        fastlora.inject(_WithHead(), LoraConfig(r=2, target_modules=["query", "head"], modules_to_save=["head"]))

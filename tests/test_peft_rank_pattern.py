"""PEFT checkpoints with per-layer ranks and alphas (rank_pattern / alpha_pattern), both ways.

fastlora's export must load in plain PEFT with each layer's own r and scaling and fastlora's outputs;
a checkpoint PEFT itself saved with patterns must load into fastlora with PEFT's ranks and outputs.
Everything runs in float64 on tiny models built from configs (no downloads).
"""
import copy
import json
import re

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import BertModel

import fastlora
from fastlora import load_peft_adapter, save_peft_adapter

from utils import randomize_adapters, rel, tiny_bert

TOL = 1e-12
PREFIX = "base_model.model."
IDS = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BertModel(tiny_bert()).double().eval()


class Nested(nn.Module):
    """Two Linears whose names end alike ("proj", "inner.proj") and a third, "out"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8, dtype=torch.float64)
        self.inner = nn.Module()
        self.inner.proj = nn.Linear(8, 8, dtype=torch.float64)
        self.out = nn.Linear(8, 6, dtype=torch.float64)

    def forward(self, x):
        return self.out(torch.tanh(self.inner.proj(torch.tanh(self.proj(x)))))


def output(model, x):
    """The model's output on ``x``: token ids (a BertModel's last hidden state) or features (Nested)."""
    with torch.no_grad():
        return model(input_ids=x).last_hidden_state if x.dtype == torch.long else model(x)


def fastlora_ranks(model):
    """{layer name: (r, scale)} of the fastlora layers."""
    return {name: (layer.config.r, layer.config.scale) for name, layer in fastlora.adapter_layers(model)}


def peft_ranks(model):
    """{layer name: (r, scaling)} of the PEFT LoRA layers, names without PEFT's prefix."""
    return {name.removeprefix(PREFIX): (module.r["default"], module.scaling["default"])
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def anchored(names_values):
    return {"^" + re.escape(name): value for name, value in names_values.items()}


BERT_QUERY = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
BERT_VALUE = [f"encoder.layer.{i}.attention.self.value" for i in range(2)]


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("source", ["inject", "checkpoint"])
def test_per_layer_ranks_export_to_peft(bert, tmp_path, use_rslora, source):
    config = fastlora.LoraConfig(r=4, alpha=8.0, use_rslora=use_rslora, target_modules=["query", "value", "dense"],
                                 rank_pattern={"dense": 2},
                                 alpha_pattern={"value": 5.0, r"layer\.1\.attention\.self\.query": 3.0})
    model = randomize_adapters(fastlora.inject(copy.deepcopy(bert), config))
    if source == "checkpoint":  # per-layer configs read back from fastlora's own checkpoint
        fastlora.save_adapter(model, tmp_path / "fastlora")
        model = fastlora.load_adapter(copy.deepcopy(bert), tmp_path / "fastlora")
    expected, ranks = output(model, IDS), fastlora_ranks(model)
    assert rel(expected, output(bert, IDS)) > 1e-3
    save_peft_adapter(model, tmp_path / "peft")

    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    # 7 dense layers (attention.output, intermediate, output in each layer, and the pooler) at r=2,
    # 4 query/value layers at r=4; alpha 8 on 5 of the 11 layers
    assert (meta["r"], meta["lora_alpha"]) == (2, 8.0)
    assert meta["rank_pattern"] == anchored(dict.fromkeys(BERT_QUERY + BERT_VALUE, 4))
    assert meta["alpha_pattern"] == anchored({**dict.fromkeys(BERT_VALUE, 5.0), BERT_QUERY[1]: 3.0})

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(bert), str(tmp_path / "peft")).eval()
    got = peft_ranks(loaded)
    assert got.keys() == ranks.keys() and len(got) == 11
    for name, (r, scaling) in got.items():
        want_r, want_scale = ranks[name]
        alpha = 3.0 if name == BERT_QUERY[1] else 5.0 if name in BERT_VALUE else 8.0
        assert r == want_r == (4 if name in BERT_QUERY + BERT_VALUE else 2), name
        assert scaling == pytest.approx(want_scale) and scaling == pytest.approx(
            alpha / (r ** 0.5 if use_rslora else r)), name
    assert rel(output(loaded, IDS), expected) < TOL
    again = load_peft_adapter(copy.deepcopy(bert), tmp_path / "peft")
    assert fastlora_ranks(again) == ranks and rel(output(again, IDS), expected) < TOL


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_rank_pattern_checkpoint_loads_with_each_layers_rank(bert, tmp_path, use_rslora):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights=False,
                             target_modules=["query", "value", "intermediate.dense"],
                             rank_pattern={r"layer\.0\.attention\.self\.query": 2, "dense": 6},
                             alpha_pattern={"value": 3, "^encoder.layer.1.intermediate.dense": 12})
    torch.manual_seed(2)
    reference = peft.get_peft_model(copy.deepcopy(bert), config).eval()
    reference.save_pretrained(str(tmp_path))
    want = peft_ranks(reference)
    assert {r for r, _ in want.values()} == {2, 4, 6} and len({s for _, s in want.values()}) >= 4

    loaded = load_peft_adapter(copy.deepcopy(bert), tmp_path).eval()
    got = fastlora_ranks(loaded)
    assert got.keys() == want.keys()
    for name, (r, scale) in got.items():
        assert r == want[name][0] and scale == pytest.approx(want[name][1]), name
    expected = output(reference, IDS)
    assert rel(expected, output(bert, IDS)) > 1e-3
    assert rel(output(loaded, IDS), expected) < TOL


@pytest.mark.parametrize("odd", ["proj", "inner.proj"])
def test_a_name_that_ends_another_gets_only_its_own_rank(tmp_path, odd):
    # "proj" is a suffix of "inner.proj": a bare key "proj" would also give "inner.proj" its rank in PEFT
    config = fastlora.LoraConfig(r=2, alpha=4.0, target_modules=["proj", "out"],
                                 rank_pattern={"^" + re.escape(odd): 5}, alpha_pattern={"^" + re.escape(odd): 7.0})
    model = randomize_adapters(fastlora.inject(Nested(), config))
    assert {name: r for name, (r, _) in fastlora_ranks(model).items()} == {
        "proj": 2, "inner.proj": 2, "out": 2, odd: 5}
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = output(model, x)
    save_peft_adapter(model, tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert (meta["r"], meta["lora_alpha"], meta["rank_pattern"], meta["alpha_pattern"]) == (
        2, 4.0, anchored({odd: 5}), anchored({odd: 7.0}))
    in_peft = peft.PeftModel.from_pretrained(Nested(), str(tmp_path / "export")).eval()
    assert peft_ranks(in_peft) == fastlora_ranks(model)
    assert rel(output(in_peft, x), expected) < TOL

    # the same layout saved by PEFT itself, with fresh random factors, loads into fastlora
    torch.manual_seed(5)
    reference = peft.get_peft_model(Nested(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["proj", "out"], init_lora_weights=False,
        rank_pattern={"^" + re.escape(odd): 5}, alpha_pattern={"^" + re.escape(odd): 7})).eval()
    reference.save_pretrained(str(tmp_path / "peft"))
    loaded = load_peft_adapter(Nested(), tmp_path / "peft")
    assert fastlora_ranks(loaded) == peft_ranks(reference) == fastlora_ranks(model)
    assert rel(output(loaded, x), output(reference, x)) < TOL


def test_an_unadapted_module_whose_name_ends_an_adapted_one_stays_plain_in_peft(tmp_path):
    # only "proj" and "out" are adapted: the list ["proj", "out"] would make PEFT adapt "inner.proj" too
    model = randomize_adapters(fastlora.inject(Nested(), fastlora.LoraConfig(r=2, alpha=4.0, target_modules="proj|out",
                                                                     rank_pattern={"^proj": 5})))
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = output(model, x)
    save_peft_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    # a tie in r: the first layer's value is the global one
    assert (meta["target_modules"], meta["r"], meta["rank_pattern"]) == ("proj|out", 5, {"^out": 2})
    in_peft = peft.PeftModel.from_pretrained(Nested(), str(tmp_path)).eval()
    assert peft_ranks(in_peft) == fastlora_ranks(model) == {"proj": (5, 0.8), "out": (2, 2.0)}
    assert rel(output(in_peft, x), expected) < TOL
    loaded = load_peft_adapter(Nested(), tmp_path)
    assert fastlora_ranks(loaded) == fastlora_ranks(model) and rel(output(loaded, x), expected) < TOL


def test_export_refuses_fields_peft_holds_once_naming_layer_and_field(bert, tmp_path):
    model = fastlora.inject(copy.deepcopy(bert), fastlora.LoraConfig(r=2, target_modules=["query"],
                                                                     rank_pattern={"layer.1.attention.self.query": 3}))
    layer = model.get_submodule(BERT_QUERY[1])
    layer.config = fastlora.LoraConfig(r=3, dropout=0.1, target_modules=["query"])
    with pytest.raises(ValueError, match=re.escape(
            f"layer {BERT_QUERY[1]} has dropout=0.1, unlike layer {BERT_QUERY[0]}'s 0.0; PEFT's LORA format "
            f"sets only r (rank_pattern) and alpha (alpha_pattern) per layer")):
        save_peft_adapter(model, tmp_path / "lora")
    neat = fastlora.inject(copy.deepcopy(bert), fastlora.NeatConfig(r=4, target_modules=["query"],
                                                                    rank_pattern={"layer.1.attention.self.query": 2}))
    with pytest.raises(ValueError, match=re.escape(
            f"layer {BERT_QUERY[1]} has r=2, unlike layer {BERT_QUERY[0]}'s 4; PEFT's PEANUT format holds one "
            f"config for all layers")):
        save_peft_adapter(neat, tmp_path / "neat")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("pattern, match", [
    ({"layer.1.attention.self.query": 2},  # the pattern says r=2, the saved tensors have r=4
     rf"PEFT tensor {re.escape(BERT_QUERY[1])}.lora_A.weight has shape \(4, 32\), expected \(2, 32\)"),
    ({"layer.0.attention.self.query": 40}, rf"PEFT rank r=40 exceeds min\(d_in=32, d_out=32\) of '{BERT_QUERY[0]}'"),
    ({"(a+)+": 2}, r"LoraConfig.rank_pattern regex '\(a\+\)\+' repeats a group"),
])
def test_load_refuses_a_rank_pattern_the_checkpoint_does_not_fit(bert, tmp_path, pattern, match):
    peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(r=4, target_modules=["query"])).save_pretrained(
        str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rank_pattern": pattern}))
    model = copy.deepcopy(bert)
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(model, tmp_path)
    assert not list(fastlora.adapter_layers(model))

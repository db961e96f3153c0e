"""PEFT's target selection on fastlora configs: the same fields pick the same layers, with the same ranks and
alphas, as PEFT itself on tiny BERT and Llama models built from configs."""
import copy
import dataclasses
import types
import warnings

import peft
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import fastlora
from fastlora import LoraConfig
from fastlora.targets import DEFAULT_TARGETS, exact_name_pattern, layer_config

from utils import tiny_bert

LLAMA = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=60)


def bert():
    torch.manual_seed(0)
    return BertModel(tiny_bert(dropout=0.1)).double().eval()


def bert_classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert(dropout=0.1, num_labels=3)).double().eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).double().eval()


def peft_adapted(model, **fields):
    """PEFT's LoRA model on a copy of ``model`` and the names of the layers it adapted."""
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **fields)).eval()
    names = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    return reference, names


CASES = {
    "bert default": (bert, {}),
    "bert all-linear (pooler kept, as PEFT)": (bert, {"target_modules": "all-linear"}),
    "classifier all-linear": (bert_classifier, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    "bert layer 1 by index": (bert, {"target_modules": ["query", "dense"], "layers_to_transform": 1}),
    "bert layer 0 by pattern": (bert, {"target_modules": ["key", "output.dense"], "layers_to_transform": [0],
                                       "layers_pattern": "layer"}),
    "llama default": (llama, {}),
    "llama all-linear (lm_head left out)": (llama, {"target_modules": "all-linear"}),
    "llama ALL-LINEAR (any case, as PEFT)": (llama, {"target_modules": "ALL-LINEAR"}),
    "classifier All-Linear": (bert_classifier, {"target_modules": "All-Linear", "task_type": "SEQ_CLS"}),
    "llama exclude names": (llama, {"target_modules": ["q_proj", "down_proj"],
                                    "exclude_modules": ["model.layers.1.self_attn.q_proj", "down_proj"]}),
    "llama exclude regex": (llama, {"target_modules": "all-linear", "exclude_modules": r".*\.1\.mlp\..*"}),
    "llama layers 0 and 2": (llama, {"target_modules": ["v_proj", "up_proj"], "layers_to_transform": [0, 2],
                                     "layers_pattern": ["layers"]}),
    "llama exact name beats layers": (llama, {"target_modules": ["model.layers.1.mlp.up_proj", "o_proj"],
                                              "layers_to_transform": [2]}),
}


@pytest.mark.parametrize("case", CASES)
def test_selection_is_peft_selection(case):
    make, fields = CASES[case]
    model = make()
    _, expected = peft_adapted(model, r=2, **fields)
    injected = fastlora.inject(model, LoraConfig(r=2, **fields))
    assert {name for name, _ in fastlora.adapter_layers(injected)} == set(expected)


@pytest.mark.parametrize("spelling", ["ALL-LINEAR", "All-Linear", "all-Linear"])
def test_all_linear_shorthand_is_read_in_any_case(spelling):
    config = LoraConfig(r=2, target_modules=spelling)
    assert config.target_modules == "all-linear" and LoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="not the regex or shorthand 'all-linear'"):
        LoraConfig(r=2, target_modules=spelling, layers_to_transform=0)
    with pytest.warns(UserWarning, match=f"exclude_modules '{spelling}' left out no module"):  # a regex there
        fastlora.inject(llama(), LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=spelling))


def test_a_regex_that_only_resembles_the_shorthand_stays_a_regex():
    with pytest.raises(ValueError, match="'all-linears' .*select no nn.Linear"):
        fastlora.inject(llama(), LoraConfig(r=2, target_modules="all-linears"))


#: the model types of PEFT 0.21's default LoRA targets: every one has its default here
PEFT_0_21_MODEL_TYPES = {
    "RefinedWeb", "RefinedWebModel", "bart", "bert", "blip-2", "bloom", "btlm", "chatglm", "codegen", "deberta",
    "deberta-v2", "electra", "falcon", "gemma", "gemma2", "gemma3_text", "gemma4", "gpt2", "gpt_bigcode", "gpt_neo",
    "gpt_neox", "gptj", "layoutlm", "llama", "llama4", "mistral", "mixtral", "mpt", "mt5", "nemotron_h", "opt", "phi",
    "qwen2", "qwen3", "roberta", "rwkv", "rwkv7", "stablelm", "t5", "xlm-roberta"}


def test_default_targets_are_peft_defaults():
    assert PEFT_0_21_MODEL_TYPES <= set(DEFAULT_TARGETS)
    for model_type, targets in DEFAULT_TARGETS.items():
        theirs = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
        assert (theirs == targets) if isinstance(targets, str) else sorted(theirs) == sorted(targets)


@pytest.mark.parametrize("model_type, width_field", [("gpt_neox", "hidden_size"), ("phi", "hidden_size"),
                                                      ("deberta-v2", "hidden_size"), ("mt5", "d_model")])
def test_default_targets_select_what_peft_selects(model_type, width_field):
    """No target_modules: the layers PEFT's get_peft_model adapts, on tiny transformers models of types
    beyond the first few (a fused query_key_value, phi's MLP layers, DeBERTa's projections, mT5's q/v)."""
    config = AutoConfig.for_model(model_type, **{width_field: 32}, num_hidden_layers=1, num_layers=1,
                                  num_decoder_layers=1, num_attention_heads=4, num_heads=4, intermediate_size=64,
                                  d_ff=64, d_kv=8, vocab_size=64)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2))
    peft_layers = {name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {name for name, _ in fastlora.adapter_layers(fastlora.inject(model, LoraConfig(r=2)))}
    assert ours == peft_layers and ours


@pytest.mark.parametrize("config", [fastlora.SelectiveLoraConfig(r=2), fastlora.RankSelectiveLoraConfig(r=2)],
                         ids=lambda config: type(config).__name__)
def test_selective_and_codyra_adapt_every_linear_layer_without_target_modules(config):
    """Their default targets are "all-linear" (CoDyRA's authors adapt every linear layer; Selective LoRA gates
    blocks off from all of them), not PEFT's per-architecture table: the layers PEFT's "all-linear" selects, and
    layers_to_transform still applies."""
    model = bert_classifier()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                                  task_type="SEQ_CLS"))
    peft_layers = {name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = {name for name, _ in fastlora.adapter_layers(fastlora.inject(copy.deepcopy(model), config))}
    assert ours == peft_layers and len(ours) == 13, sorted(ours)
    one_layer = dataclasses.replace(config, layers_to_transform=(1,))
    ours = {name for name, _ in fastlora.adapter_layers(fastlora.inject(copy.deepcopy(model), one_layer))}
    assert ours == {name for name in peft_layers if ".layer.1." in name} and len(ours) == 6, sorted(ours)


def test_rank_and_alpha_patterns_give_peft_outputs():
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                  rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 3, "up_proj": 1},
                  alpha_pattern={r"layers\.[02]\.mlp\.up_proj": 3.0, "v_proj": 5})
    model = llama()
    reference, peft_layers = peft_adapted(model, **fields)
    injected = fastlora.inject(model, LoraConfig(**fields)).eval()
    layers = dict(fastlora.adapter_layers(injected))
    assert set(layers) == set(peft_layers)
    for name, layer in layers.items():
        assert layer.config.r == peft_layers[name].r["default"]
        assert layer.config.scale == peft_layers[name].scaling["default"]
        assert layer.config.rank_pattern == () and layer.config.alpha_pattern == ()
        layer.adapter.lora_A.data.copy_(peft_layers[name].lora_A["default"].weight)
        layer.adapter.lora_B.data.copy_(peft_layers[name].lora_B["default"].weight)
    assert sorted({layer.config.r for layer in layers.values()}) == [1, 2, 3, 4]
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, injected(input_ids=ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-12


@pytest.mark.parametrize("name", ["proj", "inner.proj", "a.inner.proj"])
def test_exact_name_pattern_selects_only_that_name(name):
    config = LoraConfig(r=4, alpha=16, rank_pattern={exact_name_pattern(name): 2},
                        alpha_pattern={exact_name_pattern(name): 3})
    sizes = {other: (layer_config(config, other).r, layer_config(config, other).alpha)
             for other in ("proj", "inner.proj", "a.inner.proj")}
    assert sizes == {other: (2, 3) if other == name else (4, 16) for other in sizes}


def test_patterned_adapter_saves_and_loads(tmp_path):
    config = LoraConfig(r=4, target_modules=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"query": 3})
    model = fastlora.inject(bert(), config)
    for _, layer in fastlora.adapter_layers(model):
        nn.init.normal_(layer.adapter.lora_B)
    fastlora.save_adapter(model, tmp_path)
    loaded = fastlora.load_adapter(fastlora.inject(bert(), config), tmp_path)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=0)


def test_rank_pattern_too_large_names_the_layer_and_leaves_the_model_alone():
    model = bert()
    with pytest.raises(ValueError, match=r"layer 'encoder.layer.0.attention.self.value': r=40 exceeds "
                                         r"min\(d_in=32, d_out=32\)"):
        fastlora.inject(model, LoraConfig(r=2, target_modules=["query", "value"], rank_pattern={"value": 40}))
    assert not list(fastlora.adapter_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_missing_targets_without_a_default_are_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = types.SimpleNamespace(model_type="mystery")
    with pytest.raises(ValueError, match="no default for model_type 'mystery'.*target_modules='all-linear'"):
        fastlora.inject(model, LoraConfig(r=2))


def test_targets_that_are_neither_linear_nor_conv1d_are_refused_with_their_type():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30, n_positions=8))
    expected = r"target_modules: \['ln_1'\] match no nn.Linear, Conv1D or MultiheadAttention in the model; they name "
    with pytest.raises(ValueError, match=expected + r"\['transformer.h.0.ln_1 \(LayerNorm\)'"):
        fastlora.inject(gpt2, LoraConfig(r=2, target_modules=["ln_1"]))
    assert len(list(fastlora.adapter_layers(fastlora.inject(gpt2, LoraConfig(r=2))))) == 1  # PEFT's default: c_attn


def test_plain_module_keeps_every_linear_for_missing_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    assert len(list(fastlora.adapter_layers(fastlora.inject(model, LoraConfig(r=2))))) == 2


def test_selection_that_selects_nothing_names_the_fields():
    with pytest.raises(ValueError, match=r"target_modules \('query',\) with exclude_modules \('query',\).*select no"):
        fastlora.inject(bert(), LoraConfig(r=2, target_modules=["query"], exclude_modules=["query"]))


def test_exclude_that_excludes_nothing_warns():
    with pytest.warns(UserWarning, match=r"exclude_modules \('nothing_here',\) left out no module") as record:
        fastlora.inject(bert(), LoraConfig(r=2, target_modules=["query"], exclude_modules=["nothing_here"]))
    assert [w.filename for w in record if "left out no module" in str(w.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlora.inject(bert(), LoraConfig(r=2, target_modules=["query"], exclude_modules=["0.attention.self.query"]))


@pytest.mark.parametrize("fields, match", [
    (dict(target_modules=r".*query", layers_to_transform=0), "need target_modules given as names"),
    (dict(target_modules="all-linear", layers_pattern="layer", layers_to_transform=0), "need target_modules given"),
    (dict(target_modules=["query"], layers_pattern="layer"), r"layers_pattern \['layer'\] needs layers_to_transform"),
    (dict(layers_to_transform=[0, -1]), r"LoraConfig.layers_to_transform must be an int >= 0"),
    (dict(rank_pattern={"query": 0}), r"LoraConfig.rank_pattern\['query'\] must be a positive int, got 0"),
    (dict(alpha_pattern={"query": float("nan")}), r"LoraConfig.alpha_pattern\['query'\] must be a positive number"),
    (dict(rank_pattern={"(a+)+": 2}), r"LoraConfig.rank_pattern regex '\(a\+\)\+' repeats a group"),
    (dict(exclude_modules="("), r"LoraConfig.exclude_modules regex '\(' is invalid"),
])
def test_bad_selection_fields_are_refused_with_the_field_named(fields, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(r=2, **fields)


def test_alpha_pattern_needs_an_alpha():
    with pytest.raises(ValueError, match="NeatConfig has no alpha, so no alpha_pattern"):
        fastlora.NeatConfig(r=2, alpha_pattern={"query": 2.0})


def test_selection_fields_round_trip_as_json_values():
    config = LoraConfig(r=2, target_modules={"q_proj"}, exclude_modules=["model.layers.0.self_attn.q_proj"],
                        layers_to_transform=[0, 1], layers_pattern="layers", rank_pattern={"q_proj": 1},
                        alpha_pattern={"q_proj": 4.0})
    data = config.to_dict()
    assert (data["rank_pattern"], data["layers_to_transform"], data["exclude_modules"]) == (
        {"q_proj": 1}, [0, 1], ["model.layers.0.self_attn.q_proj"])
    assert fastlora.AdapterConfig.from_dict(data) == config and hash(fastlora.AdapterConfig.from_dict(data))

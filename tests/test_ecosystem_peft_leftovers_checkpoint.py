"""A checkpoint saved with per-layer ranks (rank_pattern / alpha_pattern) loads into a model without
adapters as ``PeftModel.from_pretrained`` does: the saved configs are injected, every layer with its own r
and alpha, then the weights loaded; a refused load leaves the model as it was."""
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fastlora
from fastlora import LoraConfig

from utils import randomize_adapters, rel

LLAMA = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=60)
PATTERNED = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                       rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6, "up_proj": 1},
                       alpha_pattern={r"layers\.0\.mlp\.up_proj": 3.0, "v_proj": 5})
IDS = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(1))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).double().eval()


def ranks(model):
    return {name: (layer.config.r, layer.config.alpha) for name, layer in fastlora.adapter_layers(model)}


def loss_and_grads(model):
    model.zero_grad()
    logits = model(input_ids=IDS).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_per_layer_ranks_load_into_a_fresh_plain_model(tmp_path):
    model = randomize_adapters(fastlora.inject(llama(), PATTERNED))
    saved = ranks(model)
    assert {r for r, _ in saved.values()} == {1, 2, 4, 6} and {a for _, a in saved.values()} == {3.0, 5, 8}
    fastlora.save_adapter(model, tmp_path)
    loaded = fastlora.load_adapter(llama(), tmp_path)
    assert ranks(loaded) == saved
    want, want_grads = loss_and_grads(model)
    out, grads = loss_and_grads(loaded)
    assert torch.equal(out, want) and rel(out, loss_and_grads(llama())[0]) > 1e-3
    assert grads.keys() == want_grads.keys() and all(torch.equal(grads[k], want_grads[k]) for k in grads)


def test_a_per_layer_checkpoint_loads_as_a_named_adapter(tmp_path):
    fastlora.save_adapter(randomize_adapters(fastlora.inject(llama(), PATTERNED)), tmp_path)
    reference = fastlora.load_adapter(llama(), tmp_path)
    model = fastlora.inject(llama(), LoraConfig(r=3, target_modules=["q_proj", "v_proj", "up_proj"]))
    fastlora.load_adapter(model, tmp_path, adapter_name="patterned")
    fastlora.set_adapter(model, "patterned")
    assert ranks(model) == ranks(reference)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)


class Nested(nn.Module):
    """Two Linear layers, one's name a dotted suffix of the other's ("proj" and "inner.proj")."""

    def __init__(self, d_out=6):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8, dtype=torch.float64)
        self.inner = nn.Module()
        self.inner.proj = nn.Linear(8, d_out, dtype=torch.float64)

    def forward(self, x):
        return self.inner.proj(torch.tanh(self.proj(x)))


def test_layers_whose_names_end_alike_keep_their_own_ranks(tmp_path):
    config = LoraConfig(r=2, alpha=3, target_modules=["proj"], rank_pattern={"inner.proj": 5},
                        alpha_pattern={"^proj": 7})
    model = randomize_adapters(fastlora.inject(Nested(), config))
    assert ranks(model) == {"proj": (2, 7), "inner.proj": (5, 3)}
    fastlora.save_adapter(model, tmp_path)
    loaded = fastlora.load_adapter(Nested(), tmp_path)
    assert ranks(loaded) == ranks(model)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


def plain_state(model):
    return list(model.named_modules()), [(n, p.requires_grad) for n, p in model.named_parameters()]


@pytest.mark.parametrize("d_out, match", [
    (4, r"layer 'inner.proj': r=5 exceeds min\(d_in=8, d_out=4\)"),  # refused while injecting
    (7, r"inner.proj.adapter.lora_B: checkpoint shape \(6, 5\) != model shape \(7, 5\)"),  # refused once injected
])
def test_a_refused_load_leaves_the_plain_model_unchanged(tmp_path, d_out, match):
    model = randomize_adapters(fastlora.inject(Nested(), LoraConfig(r=2, target_modules=["proj"],
                                                            rank_pattern={"inner.proj": 5})))
    fastlora.save_adapter(model, tmp_path)
    plain = Nested(d_out)
    before = plain_state(plain)
    values = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match=match):
        fastlora.load_adapter(plain, tmp_path)
    assert plain_state(plain) == before and not list(fastlora.adapter_layers(plain))
    assert all(torch.equal(t, values[k]) for k, t in plain.state_dict().items())

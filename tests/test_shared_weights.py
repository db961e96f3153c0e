"""inject refuses a method that writes W in place (LoRASC) on a layer whose W shares memory with another
module (a tied lm_head, one weight in two Linear layers, a view of W held elsewhere), naming both owners;
untie_shared_weights=True gives the layer its own copy and the other module stays bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import CascadeLoraConfig, LoraConfig

F64 = torch.float64


def _layers(model):
    return [layer for _, layer in fastlora.adapter_layers(model)]


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim, dtype=F64)
        self.body = nn.Linear(dim, dim, dtype=F64)
        self.lm_head = nn.Linear(dim, vocab, bias=False, dtype=F64)
        self.lm_head.weight = self.embed.weight  # tied, as GPT-2's and Llama's heads often are

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def _lm_steps(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, 11, (4, 5), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        optimizer.step()
    hooks.remove()


def test_lorasc_on_a_tied_lm_head_is_refused_naming_both_owners():
    model = TiedLM()
    table = model.embed.weight.detach().clone()
    config = CascadeLoraConfig(r=2, target_modules=["lm_head"], cascade_interval=1)
    with pytest.raises(ValueError, match=r"layer 'lm_head': its weight shares memory with \['embed.weight'\].*"
                                         r"writes W in place.*untie_shared_weights=True"):
        fastlora.inject(model, config)
    assert not _layers(model) and model.lm_head.weight is model.embed.weight  # unchanged
    assert torch.equal(model.embed.weight, table)
    fastlora.inject(TiedLM(), LoraConfig(r=2, target_modules=["lm_head"]))  # LoRA never writes W: allowed


def test_untie_shared_weights_gives_the_layer_a_copy_and_the_embeddings_stay_bit_for_bit():
    model = TiedLM()
    table = model.embed.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'lm_head' \(shared with \['embed.weight'\]\).*own copy of W") as record:
        fastlora.inject(model, CascadeLoraConfig(r=2, target_modules=["lm_head"], cascade_interval=1),
                        untie_shared_weights=True)
    assert [w.filename for w in record if "own copy of W" in str(w.message)] == [__file__]
    head = model.lm_head
    assert head.weight.data_ptr() != model.embed.weight.data_ptr() and torch.equal(head.weight, table)
    _lm_steps(model)  # stage-0 noise and two folds written into the head's W
    assert torch.equal(model.embed.weight, table)
    assert (head.weight - table).abs().max() > 1e-3 and head.adapter.extra_stats()["cascades"] == 3.0


def test_a_linear_sharing_w_with_the_target_is_refused_and_untied_on_request():
    model = nn.Sequential(nn.Linear(6, 6, dtype=F64), nn.Tanh(), nn.Linear(6, 6, dtype=F64))
    model[2].weight = model[0].weight
    before = model[2].weight.detach().clone()
    for targets in (["0"], ["0", "2"]):  # the other owner adapted too: both would write the same W
        with pytest.raises(ValueError, match=r"layer '0': its weight shares memory with \['2.weight'\]"):
            fastlora.inject(model, CascadeLoraConfig(r=2, target_modules=targets))
    a_view = nn.Sequential(nn.Linear(6, 6, dtype=F64))
    holder = nn.Module()
    holder.register_buffer("flat", a_view[0].weight.detach().view(-1))  # a view of W, another module's buffer
    a_view.add_module("holder", holder)
    with pytest.raises(ValueError, match=r"shares memory with \['holder.flat'\]"):
        fastlora.inject(a_view, CascadeLoraConfig(r=2, target_modules=["0"]))
    with pytest.warns(UserWarning, match="own copy of W"):
        fastlora.inject(model, CascadeLoraConfig(r=2, target_modules=["0"], cascade_interval=1),
                        untie_shared_weights=True)
    x = torch.randn(5, 6, dtype=F64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    hooks.remove()
    assert torch.equal(model[2].weight, before) and not torch.equal(model[0].weight, before)

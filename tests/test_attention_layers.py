"""nn.MultiheadAttention adapted as PEFT adapts it: the packed q/k/v in-projection and out_proj, every method,
through the fused op; the attention between the projections matches torch's own (float64), merge/unmerge,
merge_and_unload back to nn.MultiheadAttention, checkpoints, state-dict keys, selection rules and warnings,
nn.TransformerEncoderLayer's fused inference path kept off, PEFT's MultiheadAttention LoRA outputs, and PEFT
checkpoints of attention layers both ways."""
import copy
import dataclasses
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
import fastlora.layer
from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.attention import AdapterMultiheadAttention
from fastlora.layer import AdapterLinear
from fastlora.peft_formats import peft_out_proj_updates, peft_release

from utils import rel

F64 = torch.float64
E, HEADS, L, S, B = 12, 3, 5, 7, 4
CONFIGS = [LoraConfig(r=2, alpha=3.0), SelectiveLoraConfig(r=2, alpha=3.0), RankSelectiveLoraConfig(r=2),
           CurLoraConfig(r=2, alpha=0.7, seed=1), NeatConfig(r=2, scale=0.6),
           CascadeLoraConfig(r=2, alpha=3.0, noise_intensity=0.0)]


class Block(nn.Module):
    """A ViT / OpenCLIP-style block: self-attention called as torchvision calls it, then a head."""

    def __init__(self, batch_first=True, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dtype=F64, **kwargs)
        self.head = nn.Linear(E, 4, dtype=F64)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def _randomise(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            for p in layer.adapter.parameters():
                if p.is_floating_point():
                    p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


CALLS = {  # (query, key, value) from x (L, B, E) and memory (S, B, E), sequence first
    "self": lambda x, m: (x, x, x),
    "key is value": lambda x, m: (x, m, m),
    "separate": lambda x, m: (x, m, m + 0.5),
}
OPTIONS = [
    {},
    {"need_weights": False},
    {"need_weights": True, "average_attn_weights": False},
    {"key_padding_mask": "bool"},
    {"attn_mask": "float"},
    {"attn_mask": "float", "need_weights": False},
    {"attn_mask": "bool3d", "need_weights": False},
    {"attn_mask": "causal", "is_causal": True},
    {"attn_mask": "causal", "is_causal": True, "need_weights": False},
    {"key_padding_mask": "bool", "need_weights": False},
    {"attn_mask": "causal", "is_causal": True, "key_padding_mask": "float", "need_weights": False},
]


def _masks(option, tgt, src, batch):
    kwargs = dict(option)
    if kwargs.get("key_padding_mask") == "bool":
        kwargs["key_padding_mask"] = torch.zeros(batch, src, dtype=torch.bool)
        kwargs["key_padding_mask"][0, -2:] = True
    elif kwargs.get("key_padding_mask") == "float":  # beside a float attn_mask (torch deprecates mixing types)
        kwargs["key_padding_mask"] = torch.zeros(batch, src, dtype=F64)
        kwargs["key_padding_mask"][0, -2:] = -math.inf
    if kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = _x(tgt, src, seed=5)
    elif kwargs.get("attn_mask") == "bool3d":
        kwargs["attn_mask"] = _x(batch * HEADS, tgt, src, seed=6) > 0.8
    elif kwargs.get("attn_mask") == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(tgt, dtype=F64)
    return kwargs


def _pair(target="attn", **kwargs):
    """A plain nn.MultiheadAttention and its adapted twin (random LoRA factors), float64."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(E, HEADS, dtype=F64, **kwargs)
    holder = nn.Sequential()
    holder.add_module("attn", copy.deepcopy(plain))
    fastlora.inject(holder, LoraConfig(r=2, alpha=3.0, target_modules=[target]))
    return plain, _randomise(holder)


def _against_merged(holder, *inputs, **kwargs):
    """The adapted attention's (output, weights) equal those of torch's nn.MultiheadAttention holding W + ΔW
    (merge_and_unload), under the same random state; returns the output."""
    assert isinstance(holder.attn, AdapterMultiheadAttention)
    merged = fastlora.merge_and_unload(copy.deepcopy(holder)).attn
    assert type(merged) is nn.MultiheadAttention
    torch.manual_seed(11)
    out, weights = holder.attn(*inputs, **kwargs)
    torch.manual_seed(11)
    ref, ref_weights = merged(*inputs, **kwargs)
    assert out.shape == ref.shape and rel(out, ref) < 1e-12
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        assert weights.shape == ref_weights.shape and rel(weights, ref_weights) < 1e-12
    return out


def _option_id(option: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in option.items()) or "default"


#: (call, option) pairs: a causal mask is square, so is_causal goes with self-attention only
CALL_OPTIONS = [pytest.param(call, option, id=f"{call}-{_option_id(option)}") for call in CALLS for option in OPTIONS
                if call == "self" or not option.get("is_causal")]


@pytest.mark.parametrize("call, option", CALL_OPTIONS)
@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True}, {"add_bias_kv": True, "add_zero_attn": True},
                                    {"bias": False}], ids=["seq-first", "batch-first", "bias-kv-zero-attn", "no-bias"])
def test_the_attention_between_the_projections_is_torchs(call, option, kwargs):
    """Adapted layer == torch's nn.MultiheadAttention holding W + ΔW (merge_and_unload), output and weights."""
    plain, holder = _pair(**kwargs)
    tgt, src = L, (L if call == "self" else S)
    x, memory = _x(L, B, E), _x(S, B, E, seed=2)
    q, k, v = CALLS[call](x, memory)
    if kwargs.get("batch_first"):
        q, k, v = CALLS[call](x.transpose(0, 1), memory.transpose(0, 1))
    masks = _masks(option, tgt, src, B)
    out = _against_merged(holder, q, k, v, **masks)
    base, _ = plain(q, k, v, **masks)
    assert rel(out, base) > 1e-3  # the adapters matter


def test_unbatched_inputs_and_fresh_adapters_give_the_plain_output():
    plain, _ = _pair()
    holder = nn.Sequential()
    holder.add_module("attn", copy.deepcopy(plain))
    fastlora.inject(holder, LoraConfig(r=2, target_modules=["attn"]))  # B = 0: the adapted layer adds nothing
    x, memory = _x(L, E), _x(S, E, seed=2)
    for q, k, v in ((x, x, x), (x, memory, memory)):
        out, weights = holder.attn(q, k, v)
        ref, ref_weights = plain(q, k, v)
        assert out.shape == (L, E) and rel(out, ref) < 1e-12 and rel(weights, ref_weights) < 1e-12


def test_projections_run_through_the_fused_op(monkeypatch):
    _, holder = _pair(batch_first=True)
    calls = []
    op = fastlora.layer.adapted_linear
    monkeypatch.setattr(fastlora.layer, "adapted_linear", lambda x, w, *a, **k: calls.append(tuple(w.shape)) or
                        op(x, w, *a, **k))
    x, memory = _x(B, L, E), _x(B, S, E, seed=2)
    holder.attn(x, x, x, need_weights=False)
    assert calls == [(3 * E, E), (E, E)]  # self-attention: one packed call, then out_proj
    calls.clear()
    holder.attn(x, memory, memory)
    assert calls == [(E, E), (2 * E, E), (E, E)]  # q from its rows, k and v from theirs, out_proj
    calls.clear()
    holder.attn(x, memory, memory + 1)
    assert calls == [(E, E)] * 4


@pytest.mark.parametrize("config", CONFIGS, ids=[c.method for c in CONFIGS])
def test_every_method_trains_the_packed_projection_and_out_proj(config):
    """Forward == torch's attention on W + ΔW for each method, also from different query and key (rows of
    the packed update); gradients reach both projections' adapters; merge / unmerge bit for bit."""
    model = Block()
    base = copy.deepcopy(model)
    fastlora.inject(model, dataclasses.replace(config, target_modules=["attn"]))
    _randomise(model)
    names = [n for n, _ in fastlora.adapter_layers(model)]
    assert names == ["attn.in_proj", "attn.out_proj"]
    x, memory = _x(B, L, E), _x(B, S, E, seed=2)
    plain = fastlora.merge_and_unload(copy.deepcopy(model)).attn
    for q, k, v in ((x, x, x), (x, memory, memory)):
        assert rel(model.attn(q, k, v)[0], plain(q, k, v)[0]) < 1e-10
    loss = model(x).square().sum()
    loss.backward()
    for _, layer in fastlora.adapter_layers(model):
        grads = [p.grad for p in layer.adapter.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    weights = [model.attn.in_proj_weight.detach().clone(), model.attn.out_proj.weight.detach().clone()]
    before = model(x).detach()
    fastlora.merge(model)
    assert rel(model(x), before) < 1e-12
    fastlora.unmerge(model)
    assert torch.equal(model.attn.in_proj_weight, weights[0]) and torch.equal(model.attn.out_proj.weight, weights[1])
    with fastlora.disable_adapter(model):
        assert rel(model(x), base(x)) < 1e-12


def test_triton_plan_serves_the_attention_projections():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("attn", nn.MultiheadAttention(16, 2, batch_first=True))
    reference = copy.deepcopy(holder).double()
    fastlora.inject(holder, LoraConfig(r=4, alpha=8.0, target_modules=["attn"], backend="triton"))
    _randomise(holder)
    fastlora.inject(reference, LoraConfig(r=4, alpha=8.0, target_modules=["attn"], backend="torch"))
    reference.load_state_dict({k: v.double() for k, v in holder.state_dict().items()})
    x = torch.randn(2, 5, 16)
    out = holder.attn(x, x, x, need_weights=False)[0]
    ref = reference.attn(x.double(), x.double(), x.double(), need_weights=False)[0]
    assert rel(out.double(), ref) < 1e-5


def test_selection_whole_out_proj_only_and_all_linear():
    model = Block()
    fastlora.inject(model, LoraConfig(r=2, target_modules=["out_proj"]))
    assert [n for n, _ in fastlora.adapter_layers(model)] == ["attn.out_proj"]
    assert type(model.attn.in_proj) is nn.Linear and model.attn.in_proj.weight is model.attn.in_proj_weight
    _randomise(model)
    x = _x(B, L, E)
    plain = fastlora.merge_and_unload(copy.deepcopy(model))
    assert type(plain.attn) is nn.MultiheadAttention and rel(model(x), plain(x)) < 1e-12
    everything = fastlora.inject(Block(), LoraConfig(r=2, target_modules="all-linear"))
    assert [n for n, _ in fastlora.adapter_layers(everything)] == ["attn.in_proj", "attn.out_proj", "head"]
    assert type(everything.attn.out_proj) is AdapterLinear


def test_layers_fastlora_cannot_adapt_are_named_in_a_warning_or_refused_when_listed():
    class QuantLinear(nn.Linear):
        pass

    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(E, HEADS, kdim=5, vdim=6))  # separate q/k/v weights
    model.add_module("proj", QuantLinear(E, E))
    model.add_module("head", nn.Linear(E, 4))
    with pytest.warns(UserWarning, match=r"matches 3 modules of a type fastlora cannot adapt.*\['attn "
                                         r"\(MultiheadAttention\)', 'attn.out_proj \(NonDynamicallyQuantizableLinear\)'"
                                         r", 'proj \(QuantLinear\)'\]") as record:
        fastlora.inject(model, LoraConfig(r=2, target_modules="all-linear"))
    assert [w.filename for w in record if "cannot adapt" in str(w.message)] == [__file__]
    assert [n for n, _ in fastlora.adapter_layers(model)] == ["head"]
    with pytest.raises(ValueError, match=r"\['attn'\] match no nn.Linear, Conv1D or MultiheadAttention in the model; "
                                         r"they name \['attn \(MultiheadAttention\)'\]"):
        fastlora.inject(fastlora.unload(model), LoraConfig(r=2, target_modules=["attn"]))


def test_state_dict_keys_stay_those_of_nn_multihead_attention():
    plain = Block()
    keys = list(plain.state_dict())
    model = fastlora.inject(copy.deepcopy(plain), LoraConfig(r=2, target_modules=["attn"]))
    state = model.state_dict()
    assert [k for k in state if ".adapter." not in k] == keys
    assert "attn.in_proj_weight" in state and "attn.in_proj.weight" not in state
    assert "attn.in_proj.adapter.lora_A" in state and "attn.out_proj.adapter.lora_B" in state
    other = Block()  # a plain state dict (pretrained weights) loads into the adapted model
    with torch.no_grad():
        other.attn.in_proj_weight.add_(1.0)
    result = model.load_state_dict(other.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".adapter." in k for k in result.missing_keys)
    assert torch.equal(model.attn.in_proj_weight, other.attn.in_proj_weight)
    assert model.attn.in_proj_weight is model.attn.in_proj.weight


@pytest.mark.parametrize("config", [LoraConfig(r=2, alpha=3.0, target_modules=["attn"]),
                                    LoraConfig(r=2, target_modules=["out_proj"]),
                                    CascadeLoraConfig(r=2, target_modules=["attn"], cascade_interval=1,
                                                      noise_intensity=0.2)], ids=["lora", "out_proj", "lorasc"])
def test_save_and_load_into_the_plain_model(tmp_path, config):
    model = fastlora.inject(Block(), config)
    _randomise(model)
    x = _x(B, L, E)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    for _ in range(2):  # LoRASC: noise and folds written into the packed W and out_proj's W
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    hooks.remove()
    fastlora.save_adapter(model, tmp_path / "ckpt")
    loaded = fastlora.load_adapter(Block(), tmp_path / "ckpt")
    assert [n for n, _ in fastlora.adapter_layers(loaded)] == [n for n, _ in fastlora.adapter_layers(model)]
    assert torch.equal(loaded.attn.in_proj_weight, model.attn.in_proj_weight)
    assert torch.equal(loaded.attn.out_proj.weight, model.attn.out_proj.weight)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_lorasc_cascades_write_the_packed_weight():
    model = fastlora.inject(Block(), CascadeLoraConfig(r=2, target_modules=["attn"], cascade_interval=1,
                                                       noise_intensity=0.1))
    before = model.attn.in_proj_weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    optimizer.zero_grad()
    model(_x(B, L, E)).square().mean().backward()
    optimizer.step()
    hooks.remove()
    assert model.attn.in_proj.adapter.extra_stats()["cascades"] == 1.0
    assert not torch.equal(model.attn.in_proj_weight, before)


def test_transformer_encoder_layer_keeps_the_adapters_in_inference():
    """nn.TransformerEncoderLayer's fused inference path reads the weights directly; inject keeps it off."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, 24, dropout=0.0, batch_first=True, dtype=F64)  # even heads: fused path
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    fastlora.inject(model, LoraConfig(r=2, target_modules="all-linear"))
    assert {n for n, _ in fastlora.adapter_layers(model)} == {"layers.0.self_attn.in_proj",
                                                               "layers.0.self_attn.out_proj",
                                                               "layers.0.linear1", "layers.0.linear2"}
    _assert_adapters_kept_in_inference(model)


def test_an_encoder_layer_injected_itself_keeps_the_adapters_in_inference():
    """The model may be the nn.TransformerEncoderLayer itself (its root): its fused path is kept off too."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(E, 2, 24, dropout=0.0, batch_first=True, dtype=F64)
    fastlora.inject(model, LoraConfig(r=2, target_modules="all-linear"))
    _assert_adapters_kept_in_inference(model)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_an_encoder_with_a_padding_mask_keeps_the_adapters_in_inference(config):
    """nn.TransformerEncoder's nested-tensor path (eval, a padding mask) would hand the adapted layers a nested
    tensor: inject turns it off on encoders holding adapted layers, unload and merge_and_unload turn it back on.
    Each position the mask keeps gets the training path's output, that of the merged model's nested path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, 24, dropout=0.0, batch_first=True, dtype=F64)
    model = nn.TransformerEncoder(layer, 2)
    assert model.use_nested_tensor  # torch takes its nested path for this model
    fastlora.inject(model, dataclasses.replace(config, target_modules="all-linear"))
    assert not model.use_nested_tensor
    _randomise(model)
    x, mask = _x(B, L, E), torch.zeros(B, L, dtype=torch.bool)
    mask[0, L // 2:] = True
    training = model(x, src_key_padding_mask=mask).detach()
    merged = fastlora.merge_and_unload(copy.deepcopy(model)).eval()
    assert merged.use_nested_tensor
    model.eval()
    with torch.no_grad():
        inference = model(x, src_key_padding_mask=mask)
        merged_nested = merged(x, src_key_padding_mask=mask)
    kept = ~mask
    assert rel(inference[kept], training[kept]) < 1e-12 and rel(inference[kept], merged_nested[kept]) < 1e-10
    assert fastlora.unload(model).use_nested_tensor


def _assert_adapters_kept_in_inference(model):
    """With random factors: the eval no-grad output (where the fused path would run) is the training one, not
    the base model's."""
    _randomise(model)
    x = _x(B, L, E)
    training = model(x).detach()
    model.eval()
    with torch.no_grad():
        inference = model(x)
        with fastlora.disable_adapter(model):
            base = model(x)
    assert rel(inference, training) < 1e-12 and rel(inference, base) > 1e-3


def _installed_peft_out_proj_updates(peft) -> int:
    """How many times the installed PEFT's MultiheadAttention LoRA adds its out_proj update (2 before 0.22)."""
    return peft_out_proj_updates(peft.__version__)


def _assert_peft_input_grad(peft, model, grad, peft_grad, x) -> None:
    """Our input gradient is PEFT's where PEFT's is the gradient of its forward (before 0.22); PEFT 0.22's
    disagrees with its own forward's finite differences, so ours is checked against torch's attention on the
    merged weights (the function PEFT's forward computes) instead."""
    if peft_release(peft.__version__) < (0, 22):
        assert rel(grad, peft_grad) < 1e-12
        return
    _, merged_grad = _output_and_input_grad(fastlora.merge_and_unload(copy.deepcopy(model)), x)
    assert rel(grad, merged_grad) < 1e-12


def test_peft_multihead_attention_lora_gives_the_same_outputs():
    """PEFT's MultiheadAttention LoRA on the same factors: the same in-projection update; PEFT before 0.22 adds
    its out_proj update twice in its forward (its merge writes W + s B A into out_proj, whose own merge then adds
    s B A again), so its outputs are ours with out_proj's B doubled there, and ours are torch's attention on
    W + s B A (test_every_method_trains_the_packed_projection_and_out_proj)."""
    peft = pytest.importorskip("peft")
    updates = _installed_peft_out_proj_updates(peft)
    base = Block()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["attn"]))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    modules = dict(peft_model.named_modules())
    pairs = (("attn.in_proj", "base_model.model.attn"), ("attn.out_proj", "base_model.model.attn.base_layer.out_proj"))
    x = _x(B, L, E)
    for out_factor in (1.0, 2.0):
        ours = fastlora.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=3.0, target_modules=["attn"]))
        with torch.no_grad():
            for name, peft_name in pairs:
                adapter = ours.get_submodule(name).adapter
                adapter.lora_A.copy_(modules[peft_name].lora_A["default"].weight)
                factor = out_factor if name.endswith("out_proj") else 1.0
                adapter.lora_B.copy_(factor * modules[peft_name].lora_B["default"].weight)
        if out_factor == updates:
            assert rel(ours(x), peft_model(x)) < 1e-12
        else:
            assert rel(ours(x), peft_model(x)) > 1e-2 and rel(ours(x), base(x)) > 1e-3
    with torch.no_grad():  # the in-projection alone: the same update
        for model in (ours, peft_model):
            for name, p in model.named_parameters():
                if "out_proj" in name and ("lora_B" in name or name.endswith("adapter.lora_B")):
                    p.zero_()
    assert rel(ours(x), peft_model(x)) < 1e-12 and rel(ours(x), base(x)) > 1e-3


def _peft_block(config, seed=4):
    """Block adapted by PEFT itself, random factors, eval mode."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(Block(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.eval()


def _output_and_input_grad(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("fields", [{}, {"use_rslora": True, "rank_pattern": {"attn": 3},
                                         "alpha_pattern": {"head": 5}}], ids=["lora", "patterns"])
def test_peft_checkpoint_of_attention_layers_loads_with_peft_outputs(tmp_path, fields):
    peft = pytest.importorskip("peft")
    reference = _peft_block(peft.LoraConfig(r=2, lora_alpha=3, target_modules=["attn", "head"], **fields))
    reference.save_pretrained(str(tmp_path))
    model = fastlora.load_peft_adapter(Block(), tmp_path).eval()
    assert [n for n, _ in fastlora.adapter_layers(model)] == ["attn.in_proj", "attn.out_proj", "head"]
    assert isinstance(model.attn, AdapterMultiheadAttention)
    assert model.attn.in_proj.config.r == model.attn.out_proj.config.r == (3 if fields else 2)
    x = _x(B, L, E)
    out, grad = _output_and_input_grad(model, x)
    peft_out, peft_grad = _output_and_input_grad(reference, x)
    assert rel(out, peft_out) < 1e-12
    _assert_peft_input_grad(peft, model, grad, peft_grad, x)
    assert rel(out, Block()(x)) > 1e-3
    peft_in = reference.base_model.model.attn
    assert torch.equal(model.attn.in_proj.adapter.lora_B, peft_in.lora_B["default"].weight)
    # PEFT before 0.22 adds its out_proj update twice: the loaded factor is twice the checkpoint's there
    peft_out_proj = peft_in.base_layer.out_proj.lora_B["default"].weight
    assert torch.equal(model.attn.out_proj.adapter.lora_B, _installed_peft_out_proj_updates(peft) * peft_out_proj)


def test_peft_export_of_attention_layers_round_trips(tmp_path):
    peft = pytest.importorskip("peft")
    model = _randomise(fastlora.inject(Block(), LoraConfig(r=2, alpha=3.0, target_modules=["attn", "head"])))
    model.eval()
    fastlora.save_peft_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(Block(), str(tmp_path)).eval()
    x = _x(B, L, E)
    out, grad = _output_and_input_grad(model, x)
    peft_out, peft_grad = _output_and_input_grad(reference, x)
    assert rel(out, peft_out) < 1e-12
    _assert_peft_input_grad(peft, model, grad, peft_grad, x)
    assert rel(out, Block()(x)) > 1e-3
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == peft.__version__
    assert "default" in reference.base_model.model.attn.lora_A  # PEFT's MultiheadAttention LoRA layer
    loaded = fastlora.load_peft_adapter(Block(), tmp_path)
    for (name, ours), (_, theirs) in zip(fastlora.adapter_layers(model), fastlora.adapter_layers(loaded)):
        for key, tensor in ours.adapter.state_dict().items():
            assert torch.equal(theirs.adapter.state_dict()[key], tensor), (name, key)


def test_peft_export_and_load_refuse_attention_layers_peft_cannot_hold(tmp_path):
    neat = fastlora.inject(Block(), NeatConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ValueError, match=r"layer attn.in_proj is a projection of nn.MultiheadAttention 'attn'; "
                                         r"PEFT's PEANUT does not adapt nn.MultiheadAttention"):
        fastlora.save_peft_adapter(neat, tmp_path / "neat")
    out_only = fastlora.inject(Block(), LoraConfig(r=2, target_modules=["out_proj"]))
    with pytest.raises(ValueError, match=r"'attn' has only its out_proj adapted; PEFT adapts an attention's "
                                         r"in-projection and out_proj together"):
        fastlora.save_peft_adapter(out_only, tmp_path / "out")
    ranks = fastlora.inject(Block(), LoraConfig(r=2, target_modules=["attn"], rank_pattern={"out_proj": 3}))
    with pytest.raises(ValueError, match=r"'attn': its in_proj and out_proj differ in r"):
        fastlora.save_peft_adapter(ranks, tmp_path / "ranks")
    assert not any((tmp_path / name).exists() for name in ("neat", "out", "ranks"))
    peft = pytest.importorskip("peft")
    _peft_block(peft.LoraConfig(r=2, target_modules=["attn"])).save_pretrained(str(tmp_path / "peft"))
    path = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "out_proj" not in k}, str(path))
    with pytest.raises(ValueError, match=r"lacks the tensors of 'attn.base_layer.out_proj' for "
                                         r"nn.MultiheadAttention 'attn'"):
        fastlora.load_peft_adapter(Block(), tmp_path / "peft")


def test_unload_puts_back_plain_multihead_attention():
    plain = Block()
    x = _x(B, L, E)
    model = _randomise(fastlora.inject(copy.deepcopy(plain), LoraConfig(r=2, target_modules=["attn"])))
    in_weight, in_bias, out_proj = model.attn.in_proj_weight, model.attn.in_proj_bias, model.attn.out_proj.weight
    fastlora.merge(model)
    fastlora.unload(model)
    assert type(model.attn) is nn.MultiheadAttention and type(model.attn.out_proj) is type(plain.attn.out_proj)
    assert model.attn.in_proj_weight is in_weight and model.attn.in_proj_bias is in_bias
    assert model.attn.out_proj.weight is out_proj and not in_weight.requires_grad
    assert list(model.state_dict()) == list(plain.state_dict())
    assert rel(model(x), plain(x)) < 1e-14  # the base W again
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, 24, dropout=0.0, batch_first=True, dtype=F64), 1,
                                    enable_nested_tensor=False).eval()
    reference = copy.deepcopy(encoder)
    _randomise(fastlora.inject(encoder, LoraConfig(r=2, target_modules="all-linear")))
    fastlora.unload(encoder)
    assert type(encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert not encoder.layers[0].self_attn._forward_pre_hooks  # torch's fused inference path again
    with torch.no_grad():
        assert rel(encoder(x), reference(x)) < 1e-12


@pytest.mark.parametrize("targets", [["attn"], ["out_proj"], "all-linear"])
def test_a_second_named_adapter_on_attention_layers(targets):
    model = _randomise(fastlora.inject(Block(), LoraConfig(r=2, alpha=3.0, target_modules=targets)))
    names = [n for n, _ in fastlora.adapter_layers(model)]
    fastlora.add_adapter(model, "b", NeatConfig(r=2, scale=0.6, target_modules=targets))
    fastlora.set_adapter(model, "b")
    _randomise(model, seed=5)
    x = _x(B, L, E)
    for name, config in (("b", NeatConfig(r=2, scale=0.6, target_modules=targets)),
                         ("default", LoraConfig(r=2, alpha=3.0, target_modules=targets))):
        fastlora.set_adapter(model, name)
        twin = fastlora.inject(Block(), config)
        assert [n for n, _ in fastlora.adapter_layers(twin)] == names
        for (_, ours), (_, theirs) in zip(fastlora.adapter_layers(model), fastlora.adapter_layers(twin)):
            theirs.adapter.load_state_dict(ours.adapter.state_dict())
        inputs = x.clone().requires_grad_(True)
        out = model(inputs)
        out.square().sum().backward()
        twin_inputs = x.clone().requires_grad_(True)
        twin_out = twin(twin_inputs)
        twin_out.square().sum().backward()
        assert rel(out, twin_out) < 1e-12 and rel(inputs.grad, twin_inputs.grad) < 1e-12
        for (_, ours), (_, theirs) in zip(fastlora.adapter_layers(model), fastlora.adapter_layers(twin)):
            for (key, p), q in zip(ours.adapter.named_parameters(), theirs.adapter.parameters()):
                assert rel(p.grad, q.grad) < 1e-12, key
            assert all(p.grad is None for p in ours.inactive_adapters.parameters())
        model.zero_grad(set_to_none=True)
    assert rel(model(x), Block()(x)) > 1e-3


def test_a_named_adapter_must_select_the_attention_projections_inject_adapted():
    model = fastlora.inject(Block(), LoraConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ValueError, match=r"selects \[\] that have no adapter and leaves out adapted layers "
                                         r"\['attn.in_proj'\]"):
        fastlora.add_adapter(model, "b", LoraConfig(r=2, target_modules=["out_proj"]))
    with pytest.raises(ValueError, match=r"selects \['head'\] that have no adapter"):
        fastlora.add_adapter(model, "b", LoraConfig(r=2, target_modules=["attn", "head"]))
    assert fastlora.adapter_names(model) == ["default"]


def test_a_projection_rank_from_rank_pattern_is_checked_against_that_projection():
    model = fastlora.inject(Block(), LoraConfig(r=2, target_modules=["attn"], rank_pattern={"out_proj": 4}))
    assert [(n, layer.adapter.lora_A.shape[0]) for n, layer in fastlora.adapter_layers(model)] == [
        ("attn.in_proj", 2), ("attn.out_proj", 4)]
    for part in ("in_proj", "out_proj"):  # r = E + 1 on one projection, r = 2 on the other
        with pytest.raises(ValueError, match=rf"layer 'attn.{part}': r={E + 1} exceeds min\(d_in={E}, "):
            fastlora.inject(Block(), LoraConfig(r=2, target_modules=["attn"], rank_pattern={part: E + 1}))


def test_lorasc_on_out_proj_alone_ignores_a_shared_in_projection():
    """The packed in-projection, tied to another module, is not written when only out_proj is adapted."""
    model = Block()
    model.add_module("other", nn.Module())
    model.other.tied = model.attn.in_proj_weight
    with pytest.raises(ValueError, match=r"layer 'attn.in_proj': its weight shares memory with \['other.tied'\]"):
        fastlora.inject(model, CascadeLoraConfig(r=2, target_modules=["attn"]))
    fastlora.inject(model, CascadeLoraConfig(r=2, target_modules=["attn.out_proj"]))
    assert [n for n, _ in fastlora.adapter_layers(model)] == ["attn.out_proj"]


def test_exclude_modules_that_leaves_out_nothing_warns_when_all_linear_adapts_an_attention():
    with pytest.warns(UserWarning, match=r"exclude_modules \('nothing',\) left out no module"):
        fastlora.inject(Block(), LoraConfig(r=2, target_modules="all-linear", exclude_modules=["nothing"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fastlora.inject(Block(), LoraConfig(r=2, target_modules="all-linear", exclude_modules=["head"]))
    assert [n for n, _ in fastlora.adapter_layers(model)] == ["attn.in_proj", "attn.out_proj"]


def test_unload_of_an_attention_registered_under_two_names_puts_one_plain_attention_under_both():
    model = Block()
    model.alias = model.attn
    fastlora.inject(model, LoraConfig(r=2, target_modules=["attn", "alias"]))
    assert type(model.alias) is AdapterMultiheadAttention and model.alias is model.attn
    in_weight, out_weight = model.attn.in_proj_weight, model.attn.out_proj.weight
    fastlora.unload(model)
    assert type(model.attn) is nn.MultiheadAttention and model.alias is model.attn
    assert model.attn.in_proj_weight is in_weight and model.attn.out_proj.weight is out_weight


@pytest.mark.parametrize("first", [0, 1], ids=["first-layer", "after-a-linear"])
def test_attention_projections_are_numbered_as_consecutive_layers(first):
    """The in-projection is layer ``layer_index`` and out_proj the next (CURLoRA seeds its sampler by the
    index), from ``from_attention`` (default 0) and from ``inject`` after another adapted layer (1, 2)."""
    config = CurLoraConfig(r=2, seed=4, target_modules=["pre", "attn"])
    plain = AdapterMultiheadAttention.from_attention(Block().attn, None, None)  # its projections as nn.Linear
    if first == 0:
        adapted = AdapterMultiheadAttention.from_attention(Block().attn, config, config)
    else:
        model = nn.Sequential()
        model.add_module("pre", nn.Linear(E, E, dtype=F64))
        model.add_module("attn", Block().attn)
        adapted = fastlora.inject(model, config).attn
    for index, name in enumerate(("in_proj", "out_proj"), start=first):
        alone = AdapterLinear.from_linear(getattr(plain, name), config, layer_index=index)
        assert torch.equal(getattr(adapted, name).adapter.row_index, alone.adapter.row_index)
        assert torch.equal(getattr(adapted, name).adapter.col_index, alone.adapter.col_index)
    assert not torch.equal(adapted.in_proj.adapter.col_index, adapted.out_proj.adapter.col_index)


@pytest.mark.parametrize("in_config", [None, LoraConfig(r=2)], ids=["plain", "adapted"])
def test_the_attributes_of_nn_multihead_attention_are_kept(in_config):
    adapted = AdapterMultiheadAttention.from_attention(Block().attn, in_config, LoraConfig(r=2))
    assert (adapted.in_proj.in_features, adapted.in_proj.out_features) == (E, 3 * E)
    assert adapted.in_proj.weight.shape == (3 * E, E)
    assert adapted.q_proj_weight is adapted.k_proj_weight is adapted.v_proj_weight is None  # one packed weight


def test_an_attention_wider_than_the_small_int_cache_runs():
    """embed_dim 264 (> 256, beyond CPython's cached ints: sizes compare by value)."""
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("attn", nn.MultiheadAttention(264, 2, dtype=F64))
    _randomise(fastlora.inject(holder, LoraConfig(r=2, target_modules=["attn"])))
    merged = fastlora.merge_and_unload(copy.deepcopy(holder)).attn
    x = _x(3, 2, 264)
    assert rel(holder.attn(x, x, x)[0], merged(x, x, x)[0]) < 1e-12


def test_mismatched_inputs_are_refused_as_torch_refuses_them():
    _, holder = _pair()
    x, memory = _x(L, B, E), _x(S, B, E, seed=2)
    for width in (E - 1, E + 1):
        with pytest.raises(ValueError, match=rf"expected query of embed_dim {E} features, got {width}"):
            holder.attn(_x(L, B, width), memory, memory)
    for key, value in ((memory, memory[:-1]), (memory[:-1], memory)):  # key shorter, then value shorter
        with pytest.raises((ValueError, AssertionError), match="key shape .* does not match value shape"):
            holder.attn(x, key, value)
    for shape in ((B * HEADS + 1, L, S), (B * HEADS - 1, L, S)):
        with pytest.raises(RuntimeError, match=rf"3D attn_mask is .*, but should be \({B * HEADS}, {L}, {S}\)"):
            holder.attn(x, memory, memory, attn_mask=torch.zeros(shape, dtype=F64))


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("bias", [True, False])
def test_out_proj_alone_adapted_projects_q_k_v_from_the_plain_packed_weight(call, bias):
    _, holder = _pair(target="attn.out_proj", bias=bias)
    assert type(holder.attn.in_proj) is nn.Linear
    _against_merged(holder, *CALLS[call](_x(L, B, E), _x(S, B, E, seed=2)))


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.get("attn_mask") != "bool3d"], ids=_option_id)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_inputs_with_each_option(option, batch_first):
    _, holder = _pair(batch_first=batch_first)
    x = _x(L, E)
    masks = _masks(option, L, L, 1)
    if "key_padding_mask" in masks:
        masks["key_padding_mask"] = masks["key_padding_mask"][0]  # (src,) for an unbatched call
    _against_merged(holder, x, x, x, **masks)


@pytest.mark.parametrize("need_weights", [True, False])
def test_attention_dropout_in_training_draws_as_torch_draws(need_weights):
    _, holder = _pair(dropout=0.5)
    holder.train()
    x = _x(L, B, E)
    _against_merged(holder, x, x, x, need_weights=need_weights)
    holder.eval()
    out = holder.attn(x, x, x, need_weights=need_weights)[0]
    assert rel(out, holder.attn(x, x, x, need_weights=need_weights)[0]) == 0  # no dropout in eval mode


def test_a_2d_attn_mask_of_another_shape_is_refused():
    _, holder = _pair()
    x = _x(L, B, E)
    for shape in ((L + 1, L), (L - 1, L), (L, L + 1)):
        with pytest.raises(RuntimeError, match=rf"2D attn_mask is .*, but should be \({L}, {L}\)"):
            holder.attn(x, x, x, attn_mask=torch.zeros(shape, dtype=F64))


def test_state_dict_with_keep_vars_holds_the_parameters_themselves():
    _, holder = _pair()
    attn = holder.attn
    kept, detached = attn.state_dict(keep_vars=True), attn.state_dict()
    assert kept["in_proj_weight"] is attn.in_proj.weight and kept["in_proj_bias"] is attn.in_proj.bias
    assert isinstance(kept["in_proj_weight"], nn.Parameter)
    assert not isinstance(detached["in_proj_weight"], nn.Parameter)
    assert detached["in_proj_weight"].data_ptr() == attn.in_proj.weight.data_ptr()


@pytest.mark.parametrize("version, updates", [(None, 2), ("0.17.1", 2), ("0.21.2", 2), ("0.22.0", 1),
                                              ("0.23.0.dev0", 1), ("1.0", 1)])
def test_a_peft_checkpoints_version_sets_how_its_out_proj_factor_loads(tmp_path, version, updates):
    """PEFT before 0.22 adds a MultiheadAttention's out_proj update twice, from 0.22 once: the checkpoint's
    "peft_version" (PEFT records it since 0.18; missing: an older one) says which."""
    assert peft_out_proj_updates(version) == updates
    model = _randomise(fastlora.inject(Block(), LoraConfig(r=2, alpha=3.0, target_modules=["attn"])))
    fastlora.save_peft_adapter(model, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.pop("peft_version")
    if version is not None:
        config["peft_version"] = version
    config_file.write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    stored = tensors["base_model.model.attn.base_layer.out_proj.lora_B.weight"]
    loaded = fastlora.load_peft_adapter(Block(), tmp_path)
    assert torch.equal(loaded.attn.out_proj.adapter.lora_B, updates * stored)
    assert torch.equal(loaded.attn.in_proj.adapter.lora_B, model.attn.in_proj.adapter.lora_B)

"""GPT-2's Conv1D layers (PEFT's fan_in_fan_out=True) across the PEFT boundary.

A tiny GPT-2 built from its config (no download) with LoRA on c_attn, c_proj and c_fc; PEFT itself is
the reference, in float64: fastlora's layers compute PEFT's outputs and gradients, an exported adapter
loads in plain PEFT, PEFT's save_pretrained loads into fastlora, and ``fastlora.accelerate`` runs PEFT's
own Conv1D layers through the fused op with PEFT's outputs, gradients and optimizer steps.
"""
import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import fastlora
import fastlora.peft_accelerate as peft_accelerate

from utils import assert_close, rel

GPT2 = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
TARGETS = ["c_attn", "c_proj", "c_fc"]
LAYERS = [f"transformer.h.{i}.{part}" for i in range(2) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")]
IDS = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
WEIGHTS = torch.linspace(-1, 1, 50, dtype=torch.float64)


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).double().eval()


def peft_gpt2(seed=2, **fields):
    """PEFT's LoRA on a fresh tiny GPT-2, every factor random (init_lora_weights=False: B is not zero)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(**{**dict(r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True,
                                       init_lora_weights=False), **fields})
    return peft.get_peft_model(gpt2(), config).eval()


def peft_layers(model):
    return {name: model.base_model.model.get_submodule(name) for name in LAYERS}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def loss(model):
    return (model(input_ids=IDS).logits * WEIGHTS).square().mean()


def test_fastlora_layers_compute_peft_outputs_and_gradients():
    reference = peft_gpt2()
    model = fastlora.inject(gpt2(), fastlora.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    layers = dict(fastlora.adapter_layers(model))
    assert sorted(layers) == sorted(LAYERS) and all(layer.fan_in_fan_out for layer in layers.values())
    with torch.no_grad():
        for name, module in peft_layers(reference).items():
            layers[name].adapter.lora_A.copy_(module.lora_A["default"].weight)
            layers[name].adapter.lora_B.copy_(module.lora_B["default"].weight)
    assert_close(logits(model), logits(reference), 1e-12, "logits")
    assert rel(logits(model), logits(gpt2())) > 1e-3
    loss(model).backward()
    loss(reference).backward()
    for name, module in peft_layers(reference).items():
        assert_close(layers[name].adapter.lora_A.grad, module.lora_A["default"].weight.grad, 1e-10, f"{name} dA")
        assert_close(layers[name].adapter.lora_B.grad, module.lora_B["default"].weight.grad, 1e-10, f"{name} dB")


def trained_fastlora_gpt2():
    """fastlora LoRA on the tiny GPT-2 after two SGD steps (every factor moved from its initial value)."""
    model = fastlora.inject(gpt2(), fastlora.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            layer.adapter.lora_B.normal_(std=0.3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
    return model


def test_export_loads_in_plain_peft(tmp_path):
    model = trained_fastlora_gpt2()
    fastlora.save_peft_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["fan_in_fan_out"] is True and sorted(meta["target_modules"]) == sorted(LAYERS)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"].shape == (4, 32)  # PEFT's (r, d_in)
    assert tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"].shape == (128, 4)  # and (d_out, r)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out")
        loaded = peft.PeftModel.from_pretrained(gpt2(), str(tmp_path)).eval()
    assert all(module.fan_in_fan_out for module in peft_layers(loaded).values())
    assert_close(logits(loaded), logits(model), 1e-12, "PEFT logits")
    assert rel(logits(loaded), logits(gpt2())) > 1e-3
    assert_close(logits(loaded.merge_and_unload()), logits(model), 1e-12, "PEFT merged logits")


def test_peft_checkpoint_loads_into_fastlora_and_exports_back(tmp_path):
    reference = peft_gpt2(use_rslora=True)
    reference.save_pretrained(str(tmp_path / "peft"))
    model = fastlora.load_peft_adapter(gpt2(), tmp_path / "peft")
    layers = dict(fastlora.adapter_layers(model))
    assert sorted(layers) == sorted(LAYERS) and all(layer.fan_in_fan_out for layer in layers.values())
    assert layers[LAYERS[0]].config == fastlora.LoraConfig(r=4, alpha=8, use_rslora=True,
                                                                  target_modules=sorted(TARGETS))
    assert_close(logits(model), logits(reference), 1e-12, "logits")
    fastlora.save_peft_adapter(model, tmp_path / "back")
    saved, back = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)


def train(model, steps=3):
    """AdamW steps on ``model``; returns the first step's logits and gradients (by parameter name)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        optimizer.zero_grad()
        out = model(input_ids=IDS).logits
        (out * WEIGHTS).square().mean().backward()
        if step == 0:
            first = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
    return first


def test_accelerated_peft_gpt2_equals_peft_forward_backward_and_training(monkeypatch):
    reference = peft_gpt2().train()
    fused = copy.deepcopy(reference)
    shapes = []
    real = peft_accelerate.adapted_linear
    monkeypatch.setattr(peft_accelerate, "adapted_linear", lambda *a, **k: shapes.append(a[1].shape) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on PEFT's path
        fastlora.accelerate(fused)
        assert sorted(fastlora.accelerated_layers(fused)) == sorted(f"base_model.model.{n}" for n in LAYERS)
        want_out, want_grads = train(reference)
        out, grads = train(fused)
    assert len(shapes) == 3 * len(LAYERS) and {(96, 32), (32, 32), (128, 32), (32, 128)} == set(shapes)  # W (out, in)
    assert_close(out, want_out, 1e-12, "logits")
    assert grads.keys() == want_grads.keys() and len(grads) == 2 * len(LAYERS)
    for name, grad in grads.items():
        assert_close(grad, want_grads[name], 1e-10, name)
    for (name, p), (other, q) in zip(reference.named_parameters(), fused.named_parameters()):
        assert name == other and p.requires_grad == q.requires_grad
        if p.requires_grad:
            assert_close(q, p, 1e-12, name)
        else:
            assert torch.equal(q, p), name
    assert rel(peft_layers(fused)[LAYERS[0]].lora_B["default"].weight,
               peft_layers(peft_gpt2())[LAYERS[0]].lora_B["default"].weight) > 1e-3  # the steps trained
    assert_close(logits(fused.eval()), logits(reference.eval()), 1e-12, "logits after training")


def test_a_model_mixing_conv1d_and_linear_exports_and_loads_both_ways(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(12, 8), nn.Tanh(), nn.Linear(12, 6)).double()
    model = fastlora.inject(copy.deepcopy(base), fastlora.LoraConfig(r=2, alpha=3))
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            layer.adapter.lora_B.normal_()
    fastlora.save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    x = torch.randn(5, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        assert_close(loaded(x), model(x), 1e-12, "PEFT output")
        assert_close(fastlora.load_peft_adapter(copy.deepcopy(base), tmp_path)(x), model(x), 1e-12, "loaded output")


def test_peanut_has_no_conv1d_form_and_is_refused_both_ways(tmp_path):
    model = fastlora.inject(gpt2(), fastlora.NeatConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="layer transformer.h.0.attn.c_attn wraps a Conv1D; PEFT's PEANUT adapts "
                                         "nn.Linear only"):
        fastlora.save_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PEANUT", "r": 2, "depth": 0,
                                                              "target_modules": ["c_attn"]}))
    key = "base_model.model.transformer.h.0.attn.c_attn."
    save_file({key + "peanut_A.weight": torch.randn(2, 96), key + "peanut_B.weight": torch.randn(96, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    plain = gpt2()
    with pytest.raises(ValueError, match="'transformer.h.0.attn.c_attn', a Conv1D; PEFT's PEANUT adapts nn.Linear"):
        fastlora.load_peft_adapter(plain, tmp_path)
    assert not list(fastlora.adapter_layers(plain))

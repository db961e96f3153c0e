"""Random sequences of inject / merge / unmerge / train step / save / load / enable / disable keep every
base weight recoverable bit for bit (float32), and a disabled model computes the base model exactly.

LoRASC writes its stages and their noise into W (the paper's fold): its base model is W as the stages left
it, and its pretrained W is recovered by ``restore_pretrained`` from the copy keep_pretrained_copy keeps."""
import copy
import random

import pytest
import torch
from torch import nn

import fastlora
from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)

OPERATIONS = ["inject", "merge", "unmerge", "train", "save", "load", "enable", "disable"]
CONFIGS = [LoraConfig(r=2, alpha=3.0), SelectiveLoraConfig(r=2, sparsity_weight=0.5),
           RankSelectiveLoraConfig(r=3, total_steps=10, dense_fraction=0.2, threshold_levels=2, kappa_max=0.5),
           CurLoraConfig(r=2, alpha=2.0), NeatConfig(r=2, depth=1),
           CascadeLoraConfig(r=2, cascade_interval=3, noise_intensity=0.1, keep_pretrained_copy=True)]
STEPS = 30


class Run:
    """The model under test and what the sequence has done to it."""

    def __init__(self, config, tmp_path):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 6))
        self.base = copy.deepcopy(self.model)
        self.weights = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.config, self.directory = config, tmp_path / "ckpt"
        self.injected, self.saved, self.enabled, self.loads = False, False, True, 0
        self.x = torch.randn(5, 9)

    def layers(self):
        return list(fastlora.adapter_layers(self.model))

    def inject(self):
        if self.injected:
            with pytest.raises(ValueError, match="already has fastlora adapters"):
                fastlora.inject(self.model, self.config)
            return
        fastlora.inject(self.model, self.config)
        with torch.no_grad():
            for p in (p for _, layer in self.layers() for p in layer.adapter.parameters()):
                p.add_(0.5 * torch.randn_like(p))
        self.optimizer = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.05)
        fastlora.attach_training_hooks(self.model, self.optimizer)
        fastlora.set_adapters_enabled(self.model, self.enabled)
        self.injected = True

    def _on_adapters(self, call, *args):
        """``call(model, *args)``; refused before inject (a model without adapters)."""
        if self.injected:
            return call(self.model, *args)
        with pytest.raises(ValueError, match="model has no fastlora adapters"):
            call(self.model, *args)

    def merge(self):
        self._on_adapters(fastlora.merge)

    def unmerge(self):
        self._on_adapters(fastlora.unmerge)

    def train(self):
        if not self.injected:
            return
        loss = self.model(self.x).square().mean() + fastlora.regularization_loss(self.model)
        if loss.requires_grad:
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self):
        if self.injected:
            fastlora.save_adapter(self.model, self.directory)
            self.saved = True

    def load(self):
        if not self.saved:
            return
        self.loads += 1
        if any(layer.merged for _, layer in self.layers()):
            with pytest.raises(ValueError, match="merged"):
                fastlora.load_adapter(self.model, self.directory)
        else:
            fastlora.load_adapter(self.model, self.directory)

    def enable(self):
        self.enabled = True
        self._on_adapters(fastlora.set_adapters_enabled, True)

    def disable(self):
        self.enabled = False
        self._on_adapters(fastlora.set_adapters_enabled, False)

    def check(self, where):
        kept = {f"{name}.weight": layer.weight_before_merge if layer.merged else layer.weight
                for name, layer in self.layers()}
        base = self.base
        if isinstance(self.config, CascadeLoraConfig) and self.injected:
            base = copy.deepcopy(self.base)  # LoRASC's base model: W with its stages, as kept
            with torch.no_grad():
                for name, weight in kept.items():
                    base.get_parameter(name).copy_(weight)
            kept = {f"{name}.weight": _restored(layer) for name, layer in self.layers()}
        for name, weight in self.weights.items():
            current = kept.get(name, self.model.get_parameter(name))
            assert torch.equal(current, weight), (where, name)
        if not self.enabled or not self.injected:
            with torch.no_grad():
                assert torch.equal(self.model(self.x), base(self.x)), where


def _restored(layer):
    """The pretrained W a copy of a LoRASC layer restores (unmerged first), bit for bit."""
    layer = copy.deepcopy(layer)
    layer.unmerge()
    layer.adapter.restore_pretrained()
    return layer.weight


@pytest.mark.parametrize("seed, config", list(enumerate(CONFIGS)), ids=[c.method for c in CONFIGS])
def test_random_sequences_keep_the_base_weights_recoverable(tmp_path, seed, config):
    rng = random.Random(10 + seed)  # seeds whose sequences reach every operation
    run = Run(config, tmp_path)
    history = []
    for step in range(STEPS):
        operation = rng.choice(OPERATIONS if run.injected else ["inject"] + OPERATIONS)
        history.append(operation)
        getattr(run, operation)()
        run.check(history)
    fastlora.unmerge(run.model)
    if isinstance(config, CascadeLoraConfig):
        for _, layer in run.layers():
            layer.adapter.restore_pretrained()
    for name, parameter in run.model.named_parameters():
        if name in run.weights:
            assert torch.equal(parameter, run.weights[name]), (history, name)
    assert run.loads and {"merge", "train", "disable"} <= set(history), history

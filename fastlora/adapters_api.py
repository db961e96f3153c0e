"""PEFT habits on fastlora models: disable_adapter(), a trainable-parameter summary, unload(), method stats.

    with fastlora.disable_adapter(model):        # the base model's outputs
        ...
    fastlora.trainable_parameters(model)         # TrainableParameters(trainable=..., total=..., percent=...)
    fastlora.unload(model)                       # plain nn.Linear layers again, adapters dropped (no merge)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .inject import _set_submodule, adapter_layers
from .layer import AdapterLinear

# stats summed over a method's layers (counts); every other stat is averaged
_SUMMED_STATS = frozenset({"active", "active_ranks"})


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapter is off (the layers compute the base model, merged ones from
    the W kept at merge time); each layer's previous on/off state comes back on exit."""
    layers = [layer for _, layer in adapter_layers(model)]
    if not layers:
        raise ValueError("model has no fastlora adapters to disable")
    states = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.adapter_enabled = state


@dataclass(frozen=True)
class TrainableParameters:
    """Trainable and total parameter counts (each shared tensor counted once)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """PEFT's ``get_nb_trainable_parameters``; ``print(fastlora.trainable_parameters(model))``
    prints PEFT's ``print_trainable_parameters`` line."""
    params = list(model.parameters())
    return TrainableParameters(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def unload(model: nn.Module) -> nn.Module:
    """Put back the original nn.Linear (or Conv1D) of every adapted layer (the same weight and bias tensors,
    under each of the layer's names) and drop the adapters without merging them; returns ``model``.
    A merged layer is unmerged first, so its W is the base W again. Parameters other than the
    adapters keep the requires_grad flags inject gave them (frozen)."""
    names: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, AdapterLinear):
            names.setdefault(module, []).append(name)
    for layer, layer_names in names.items():
        layer.unmerge()
        weight = layer.weight
        if layer.fan_in_fan_out:  # Conv1D's own layout again, the same memory
            weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
        linear = layer.plain_layer(weight, layer.bias)
        for name in layer_names:
            _set_submodule(model, name, linear)
    return model


def adapter_stats(model: nn.Module) -> dict[str, float]:
    """Each method's ``extra_stats`` over its layers, keyed "fastlora/<method>/<stat>": counts
    (active blocks of Selective LoRA, active ranks of CoDyRA) summed, other stats averaged, plus
    "fastlora/<method>/layers"."""
    per_method: dict[str, list[dict[str, float]]] = {}
    for _, layer in adapter_layers(model):
        per_method.setdefault(layer.config.method, []).append(layer.adapter.extra_stats())
    stats = {}
    for method, rows in per_method.items():
        stats[f"fastlora/{method}/layers"] = float(len(rows))
        for key in sorted({k for row in rows for k in row}):
            values = [row[key] for row in rows if key in row]
            total = float(sum(values))
            stats[f"fastlora/{method}/{key}"] = total if key in _SUMMED_STATS else total / len(values)
    return stats

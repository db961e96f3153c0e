"""PEFT habits on fastlora models: named adapters, disable_adapter(), a trainable-parameter summary,
unload(), method stats.

    fastlora.add_adapter(model, "b", config)     # a second adapter on the layers inject adapted
    fastlora.set_adapter(model, "b")             # one active adapter at a time ("default" from inject)
    with fastlora.disable_adapter(model):        # the base model's outputs
        ...
    fastlora.trainable_parameters(model)         # TrainableParameters(trainable=..., total=...); .percent
    fastlora.unload(model)                       # plain layers again, adapters dropped (no merge)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .attention import AdapterMultiheadAttention, is_attention
from .config import AdapterConfig
from .encoder_paths import restore_fused_paths
from .heads import add_head_values, drop_head_values, switch_head_values
from .layer import AdapterLinear, check_adapter_name, is_adaptable
from .methods import build_adapter
from .model_tree import adapter_layers, is_saved_in_full, required_adapter_layers, set_submodule
from .parallel_guards import DDP, parallel_wrapping, refuse_module_swaps, refuse_new_adapters
from .targets import (
    in_task_head,
    is_selected,
    layer_config,
    output_layer_names,
    projection_config,
    resolved_targets,
    within,
)
from .training import remove_attached_hooks

# stats summed over a method's layers (counts); every other stat is averaged
_SUMMED_STATS = frozenset({"active", "active_ranks", "gate_changes"})


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter the model computes with ("default": the one ``inject`` built)."""
    return required_adapter_layers(model)[0][1].adapter_name


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter's name, the active one first."""
    return required_adapter_layers(model)[0][1].adapter_names()


def add_adapter(model: nn.Module, name: str, config: AdapterConfig) -> nn.Module:
    """Build a second (third, ...) adapter called ``name`` on the layers ``inject`` adapted, inactive
    until ``set_adapter(model, name)``; returns ``model``. ``config`` selects layers as inject does
    and must select exactly the adapted layers (per-layer rank_pattern/alpha_pattern apply). Refused,
    the model unchanged: a name in use or not a non-empty string without ".", a selection that
    differs, a method that writes W (LoRASC), a rank a layer cannot hold, a ``modules_to_save`` (the
    new adapter gets its own values of the modules inject's config trains in full, starting from the
    active adapter's: ``fastlora.heads``)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    check_adapter_name(name)
    layers = required_adapter_layers(model)
    if name in layers[0][1].adapter_names():
        raise ValueError(f"the model has an adapter named {name!r} already (adapters: "
                         f"{layers[0][1].adapter_names()})")
    refuse_new_adapters(model, "add_adapter")
    if config.modules_to_save:
        raise ValueError(f"adapter {name!r}: modules_to_save={list(config.modules_to_save)} is not taken by "
                         f"add_adapter: every named adapter gets its own values of the modules inject's config "
                         f"trains in full (set them there)")
    if any(layer.adapter.writes_weight for _, layer in layers):
        raise ValueError(f"adapter {active_adapter(model)!r} is LoRASC, which writes its stages into W; a model "
                         f"with it cannot hold other named adapters")
    _check_selection(model, name, config)
    attentions = {n for n, m in model.named_modules() if isinstance(m, AdapterMultiheadAttention)}
    built = []
    for index, (layer_name, layer) in enumerate(layers):
        attention = layer_name.rpartition(".")[0]
        own = projection_config(config, layer_name, attention) if attention in attentions else \
            layer_config(config, layer_name)
        try:
            adapter = build_adapter(own, layer.in_features, layer.out_features,  # from the base W, merged or not
                                    layer.base_weight().detach(), layer_index=index).train(layer.training)
        except (ValueError, TypeError) as error:
            raise type(error)(f"adapter {name!r}, layer {layer_name!r}: {error}") from error
        if adapter.writes_weight:
            raise ValueError(f"adapter {name!r}: LoRASC writes its stages into W, which every named adapter "
                             f"shares; it cannot be one of several named adapters")
        adapter.tasks_done.copy_(layer.adapter.tasks_done)  # built on the W those tasks left
        built.append(adapter)
    for (_, layer), adapter in zip(layers, built):
        layer.add_named_adapter(name, adapter)
    add_head_values(model, name)
    return model


def _check_selection(model: nn.Module, name: str, config: AdapterConfig) -> None:
    """Refuse a config that does not select exactly the adapted layers (under all their names), as inject
    selects them (an attention's name: both projections; "<attention>.out_proj": that one), naming the
    difference."""
    targets = resolved_targets(model, config)
    output_layers = output_layer_names(model) if targets == "all-linear" else set()
    task_head = in_task_head(model, config)
    in_full = [n for n, m in model.named_modules() if n and is_saved_in_full(m)]  # inject's modules_to_save

    def chosen(module_name: str) -> bool:
        return is_selected(module_name, targets, config, output_layers) and not task_head(module_name) \
            and not any(within(module_name, n) for n in in_full)

    adapted, selected, done = set(), set(), []
    for module_name, module in model.named_modules(remove_duplicate=False):
        if any(module_name.startswith(n + ".") for n in done):
            continue  # inside an adapted layer (NEAT's own Linear layers) or an attention, seen whole
        if isinstance(module, AdapterMultiheadAttention) or is_attention(module):
            done.append(module_name)
            parts = {part: f"{module_name}.{part}" for part in ("in_proj", "out_proj")}
            adapted |= {n for part, n in parts.items() if isinstance(getattr(module, part), AdapterLinear)}
            selected |= set(parts.values()) if chosen(module_name) else \
                {parts["out_proj"]} if chosen(parts["out_proj"]) else set()
        elif isinstance(module, AdapterLinear) or is_adaptable(module):
            if isinstance(module, AdapterLinear):
                done.append(module_name)
                adapted.add(module_name)
            if chosen(module_name):
                selected.add(module_name)
    if selected != adapted:
        raise ValueError(f"adapter {name!r}: the config selects {sorted(selected - adapted)[:5]} that have no "
                         f"adapter and leaves out adapted layers {sorted(adapted - selected)[:5]}; every named "
                         f"adapter covers the layers inject adapted")


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the adapter every adapted layer computes with (and trains: the others' parameters
    are frozen); returns ``model``. Refused, nothing switched, while a layer is merged."""
    layers = required_adapter_layers(model)
    if name not in layers[0][1].adapter_names():
        raise ValueError(f"no adapter named {name!r} (adapters: {layers[0][1].adapter_names()})")
    merged = [n for n, layer in layers if layer.merged]
    if merged and name != layers[0][1].adapter_name:
        raise ValueError(f"cannot switch to adapter {name!r} while adapter {layers[0][1].adapter_name!r} is merged "
                         f"into {merged[:3]}; unmerge first")
    if name != layers[0][1].adapter_name and parallel_wrapping(model) == DDP:
        refuse_new_adapters(model, "set_adapter")
    if name != layers[0][1].adapter_name:
        switch_head_values(model, layers[0][1].adapter_name, name)
    for _, layer in layers:
        layer.activate(name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Drop the inactive adapter ``name`` from every layer; returns ``model``. The active adapter is
    refused: switch to another first (or ``unload`` to drop them all)."""
    layers = required_adapter_layers(model)
    if name not in layers[0][1].adapter_names():
        raise ValueError(f"no adapter named {name!r} (adapters: {layers[0][1].adapter_names()})")
    if name == layers[0][1].adapter_name:
        raise ValueError(f"adapter {name!r} is the active adapter; set_adapter another one before deleting it "
                         f"(or unload the adapters)")
    for _, layer in layers:
        layer.remove_adapter(name)
    drop_head_values(model, name)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every adapter is off (the layers compute the base model, merged ones from
    the W kept at merge time; modules trained in full keep their values); each layer's previous on/off
    state comes back on exit."""
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
    """Put back the original nn.Linear (or Conv1D, or nn.MultiheadAttention) of every adapted layer (the same
    weight and bias tensors, under each of the layer's names) and drop the adapters without merging them;
    returns ``model``.
    A merged layer is unmerged first, so its W is the base W again. Parameters other than the
    adapters keep the requires_grad flags inject gave them (frozen); the modules trained in full keep the
    active adapter's values (the inactive adapters' are dropped); training hooks attached to ``model`` are
    removed."""
    required_adapter_layers(model)
    refuse_module_swaps(model, "unload")
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
            set_submodule(model, name, linear)
    attentions: dict[nn.Module, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, AdapterMultiheadAttention):
            attentions.setdefault(module, []).append(name)
    for attention, attention_names in attentions.items():
        plain = attention.to_attention()  # its projections are plain now: their tensors themselves
        for name in attention_names:
            set_submodule(model, name, plain)
    drop_head_values(model)  # the active adapter's head values stay in place
    restore_fused_paths(model)
    remove_attached_hooks(model)
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

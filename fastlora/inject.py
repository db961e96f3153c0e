"""Model-level operations: inject adapters, merge/unmerge, unload, inspect."""
from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from .config import AdapterConfig
from .layer import AdapterLinear


def _matches(name: str, target_modules) -> bool:
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace every nn.Linear matched by ``config.target_modules`` with an AdapterLinear
    (sharing the original weight and bias) and freeze every other parameter.

    Returns ``model`` (changed in place). Raises ValueError when a listed target
    matches no nn.Linear, or when nothing matches.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if any(isinstance(m, AdapterLinear) for m in model.modules()):
        raise ValueError("model already has fastlora adapters; merge_and_unload it first")
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if _matches(n, config.target_modules)]
    _check_targets(config, linears, chosen)
    for param in model.parameters():
        param.requires_grad_(False)
    for index, (name, linear) in enumerate(chosen):
        layer = AdapterLinear.from_linear(linear, config, layer_index=index)
        _set_submodule(model, name, layer.train(linear.training))
    return model


def _check_targets(config: AdapterConfig, linears, chosen) -> None:
    names = [n for n, _ in linears]
    if isinstance(config.target_modules, (list, tuple)):
        missing = [t for t in config.target_modules if not any(_matches(n, [t]) for n in names)]
        if missing:
            raise ValueError(f"target_modules {missing} match no nn.Linear in the model; "
                             f"linear modules are: {sorted({n.rsplit('.', 1)[-1] for n in names})}")
    if not chosen:
        raise ValueError(f"target_modules {config.target_modules!r} match no nn.Linear in the model")


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(qualified name, layer) of every AdapterLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward becomes the plain Linear)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo ``merge`` on every adapted layer."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every AdapterLinear by a plain nn.Linear holding W + ΔW; returns ``model``."""
    for name, layer in list(adapter_layers(model)):
        _set_submodule(model, name, layer.to_linear())
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the layers compute the base model exactly)."""
    for _, layer in adapter_layers(model):
        layer.adapter_enabled = enabled


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

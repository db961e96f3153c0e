"""A model's modules by qualified name: its adapted layers, the modules its checkpoints save in full,
replacing one module by another, and the model inside the wrappers that prefix its names."""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .layer import AdapterLinear

#: set on the modules whose parameters checkpoints carry beside the adapters (PEFT's modules_to_save)
_SAVED_IN_FULL = "_fastlora_saved_in_full"


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(qualified name, layer) of every AdapterLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def required_adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    """``adapter_layers(model)`` as a list; ValueError when there are none (a call that acts on the adapters
    would silently do nothing)."""
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no fastlora adapters; call fastlora.inject first (a PEFT model's adapters: "
                         "PEFT's own calls, or fastlora.accelerate to run them fused)")
    return layers


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` under the qualified name ``name`` ("encoder.layer.0.query")."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def parameter_owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module holding it, its attribute name) of the parameter ``name`` (qualified) of ``model``."""
    owner_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), attribute


def mark_saved_in_full(module: nn.Module) -> None:
    """Have checkpoints carry ``module``'s parameters (a classifier head), trainable or frozen at save time."""
    setattr(module, _SAVED_IN_FULL, True)


def is_saved_in_full(module: nn.Module) -> bool:
    """Whether ``mark_saved_in_full`` marked ``module``."""
    return getattr(module, _SAVED_IN_FULL, False)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside wrappers that only prefix its names: torch.compile's OptimizedModule ("_orig_mod.")
    and DistributedDataParallel / DataParallel ("module."), so that a checkpoint names the plain model's
    layers whether it was saved from or loaded into a wrapper."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model

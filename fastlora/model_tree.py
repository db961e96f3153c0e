"""A model's modules by qualified name: its adapted layers, and replacing one module by another."""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .layer import AdapterLinear


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(qualified name, layer) of every AdapterLinear in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` under the qualified name ``name`` ("encoder.layer.0.query")."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)

"""Folding adapters into their base weights and back: merge, unmerge, merge_and_unload.

``merge`` writes W in place, so it is refused (nothing merged) on a layer whose W shares memory with
another module's parameter or buffer (an lm_head tied to the input embeddings, one weight in two
Linear layers, a view of W held elsewhere), naming both owners; ``merge_and_unload`` builds new
weights instead.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .attention import AdapterMultiheadAttention
from .encoder_paths import restore_fused_paths
from .heads import drop_head_values
from .layer import AdapterLinear, checked_backup_device
from .model_tree import required_adapter_layers, set_submodule
from .parallel_guards import refuse_module_swaps, refuse_weight_writes
from .shared_weights import shared_weight_owners
from .training import remove_attached_hooks


def _check_unshared_weights(model: nn.Module, layers: list[tuple[str, AdapterLinear]]) -> None:
    """Raise ValueError naming both owners when an adapted layer's W shares memory with a tensor
    of another module (an lm_head tied to the input embeddings, one W in two layers)."""
    shared = shared_weight_owners(model, [(name, layer, layer.weight) for name, layer in layers])
    if shared:
        name, others = next(iter(shared.items()))
        raise ValueError(f"cannot merge layer {name!r}: its weight shares memory with {others} (tied or shared "
                         f"weights), which merging would change too; untie it first (give the layer its own "
                         f"copy of W) or use merge_and_unload, which builds new weights")


def merge(model: nn.Module, backup_device: Optional[Union[str, torch.device]] = None) -> None:
    """Fold every adapter into its base weight (forward becomes the plain Linear); layers
    already merged stay as they are. Each layer keeps the W it had for ``unmerge`` on
    ``backup_device`` (default: W's device; "cpu" keeps GPU memory free). Refused (nothing
    merged) when a layer's W is shared with another module's tensor."""
    layers = [(n, layer) for n, layer in required_adapter_layers(model) if not layer.merged]
    refuse_weight_writes(model, "merge")
    _check_unshared_weights(model, layers)
    if backup_device is not None:
        backup_device = checked_backup_device(backup_device)
    try:
        for _, layer in layers:
            layer.merge(backup_device)
    except BaseException:
        unmerge(model)
        raise


def unmerge(model: nn.Module) -> None:
    """Undo ``merge`` on every adapted layer: each W is restored bit for bit, latest merge
    first (so a W merged twice through shared storage ends as it was before both)."""
    merged = [layer for _, layer in required_adapter_layers(model) if layer.merged]
    if merged:
        refuse_weight_writes(model, "unmerge")
    for layer in sorted(merged, key=lambda layer: layer.merge_order, reverse=True):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every AdapterLinear (under each of its names) by a plain nn.Linear (Conv1D) holding
    W + ΔW in a new weight, and every AdapterMultiheadAttention by an nn.MultiheadAttention holding
    its projections' W + ΔW (a merged layer's W as it is: ΔW is never added twice; a W tied to
    another module stays with that module unchanged); returns ``model``. The modules trained in full keep
    the active adapter's values (the inactive adapters' are dropped); training hooks attached to ``model``
    are removed."""
    required_adapter_layers(model)
    refuse_module_swaps(model, "merge_and_unload")
    for kind, convert in ((AdapterMultiheadAttention, "to_attention"), (AdapterLinear, "to_linear")):
        names: dict[nn.Module, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, kind):
                names.setdefault(module, []).append(name)
        for layer, layer_names in names.items():
            plain = getattr(layer, convert)()
            for name in layer_names:
                set_submodule(model, name, plain)
    drop_head_values(model)  # the active adapter's head values stay in place
    restore_fused_paths(model)
    remove_attached_hooks(model)
    return model

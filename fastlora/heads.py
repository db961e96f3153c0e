"""Modules trained in full beside the adapters (PEFT's ``modules_to_save``: a classifier head): each named
adapter has its own values of them, as in PEFT.

The active adapter's values are the modules' parameters themselves (what the forward reads and the
optimizer steps). An inactive adapter's are frozen buffers of the module that owns each parameter,
``<owner>.inactive_heads.<adapter>.<parameter>`` (in state dicts, moved by ``.to()``). ``set_adapter``
swaps the values in place: the parameters stay the same objects, so an optimizer built before the switch
carries its moments from one adapter's head to the other's (build it after switching, as after PEFT's
``set_adapter``). An adapter ``add_adapter`` builds starts from the active adapter's values (PEFT's
from the module as it was before training, which fastlora does not keep). An adapter without its own
values for a module (one marked after it was added) computes with the values in place.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .model_tree import is_saved_in_full, mark_saved_in_full

#: the child of a head module that holds the inactive adapters' values
INACTIVE = "inactive_heads"


def head_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of each module that directly owns parameters of the modules saved in full."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not is_saved_in_full(module):
            continue
        for sub_name, sub in module.named_modules(prefix=name):
            if id(sub) not in seen and next(sub.parameters(recurse=False), None) is not None:
                seen.add(id(sub))
                yield sub_name, sub


def _stored(owner: nn.Module) -> nn.ModuleDict:
    """The owner's inactive values by adapter name (created empty when missing)."""
    if INACTIVE not in owner._modules:
        owner.add_module(INACTIVE, nn.ModuleDict())
    return owner._modules[INACTIVE]


def _copy_of_parameters(owner: nn.Module) -> nn.Module:
    """A module holding a detached copy of each of ``owner``'s own parameters, as buffers of the same names."""
    values = nn.Module()
    for name, param in owner.named_parameters(recurse=False):
        values.register_buffer(name, param.detach().clone())
    return values


def add_head_values(model: nn.Module, adapter: str) -> None:
    """Give the new inactive ``adapter`` its own values of every head module: the ones in place now."""
    for _, owner in list(head_owners(model)):
        _stored(owner)[adapter] = _copy_of_parameters(owner)


@torch.no_grad()
def switch_head_values(model: nn.Module, active: str, new: str) -> None:
    """Keep the values in place as ``active``'s and put ``new``'s in their place, on every head module
    where ``new`` has values of its own."""
    for _, owner in list(head_owners(model)):
        stored = _stored(owner)
        if new not in stored:
            continue
        stored[active] = _copy_of_parameters(owner)
        for name, param in owner.named_parameters(recurse=False):
            param.copy_(getattr(stored[new], name))
        del stored[new]


def drop_head_values(model: nn.Module, adapter: Optional[str] = None) -> None:
    """Forget ``adapter``'s values (every inactive adapter's when None)."""
    for _, owner in list(head_owners(model)):
        stored = owner._modules.get(INACTIVE)
        if stored is None:
            continue
        if adapter is None or (adapter in stored and len(stored) == 1):
            del owner._modules[INACTIVE]
        elif adapter in stored:
            del stored[adapter]


def head_value(model: nn.Module, name: str, adapter: Optional[str]) -> Tensor:
    """The value of the head parameter ``name`` (qualified) for ``adapter``: its own when it is inactive and
    has one, else the parameter's."""
    owner_name, _, param_name = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    stored = owner._modules.get(INACTIVE)
    if adapter is not None and stored is not None and adapter in stored:
        return getattr(stored[adapter], param_name)
    return getattr(owner, param_name)


@torch.no_grad()
def write_inactive_head_values(model: nn.Module, adapter: str, saved: dict[str, Tensor]) -> None:
    """Store saved head parameters (qualified name -> tensor, checked to fit) as the inactive ``adapter``'s
    values, marking their modules saved in full; the parameters in place are not touched."""
    for name, tensor in saved.items():
        owner_name, _, param_name = name.rpartition(".")
        if not owner_name:
            raise ValueError(f"checkpoint parameter {name!r} belongs to the model's root module, which cannot hold "
                             f"an inactive adapter's values; load this checkpoint into the active adapter")
        owner = model.get_submodule(owner_name)
        mark_saved_in_full(owner)
        stored = _stored(owner)
        if adapter not in stored:
            stored[adapter] = _copy_of_parameters(owner)
        getattr(stored[adapter], param_name).copy_(tensor)

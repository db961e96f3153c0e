"""Modules trained in full beside the adapters (PEFT's ``modules_to_save``: a classifier head): each named
adapter has its own values of them (parameters and persistent buffers), as in PEFT.

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

from .model_tree import is_saved_in_full, mark_saved_in_full, parameter_owner

#: the child of a head module that holds the inactive adapters' values
INACTIVE = "inactive_heads"


def _own_values(sub: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``sub``'s own parameters and persistent buffers (a BatchNorm's running statistics): its values as a
    head (PEFT's modules_to_save copy the whole module)."""
    yield from sub.named_parameters(recurse=False)
    yield from ((n, b) for n, b in sub.named_buffers(recurse=False) if n not in sub._non_persistent_buffers_set)


def _head_modules(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of ``module`` and its submodules, less the inactive adapters' values."""
    yield prefix, module
    for name, child in module.named_children():
        if name != INACTIVE:
            yield from _head_modules(child, f"{prefix}.{name}" if prefix else name)


def head_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """(qualified name, module, names of its own parameters and persistent buffers) of each module that
    directly owns values of the modules saved in full, each tensor under its first owner only (a parameter
    two modules hold, tied weights, has one set of values)."""
    seen_modules: set[int] = set()
    seen_tensors: set[int] = set()
    for root, module in model.named_modules():
        if not is_saved_in_full(module):
            continue
        for name, sub in _head_modules(module, root):
            if id(sub) in seen_modules:
                continue
            seen_modules.add(id(sub))
            names = [n for n, t in _own_values(sub) if id(t) not in seen_tensors]
            seen_tensors.update(id(getattr(sub, n)) for n in names)
            if names:
                yield name, sub, names


def _stored(owner: nn.Module) -> nn.ModuleDict:
    """The owner's inactive values by adapter name (created empty when missing)."""
    if INACTIVE not in owner._modules:
        owner.add_module(INACTIVE, nn.ModuleDict())
    return owner._modules[INACTIVE]


def _copy_of_parameters(owner: nn.Module, names: list[str]) -> nn.Module:
    """A module holding a detached copy of ``owner``'s tensors ``names`` (parameters, buffers), as buffers:
    normal tensors even under inference mode (a switch while serving), so later loads can write them."""
    values = nn.Module()
    with torch.inference_mode(False):
        for name in names:
            values.register_buffer(name, getattr(owner, name).detach().clone())
    return values


def add_head_values(model: nn.Module, adapter: str) -> None:
    """Give the new inactive ``adapter`` its own values of every head module: the ones in place now."""
    for _, owner, names in list(head_tensors(model)):
        _stored(owner)[adapter] = _copy_of_parameters(owner, names)


@torch.no_grad()
def switch_head_values(model: nn.Module, active: str, new: str) -> None:
    """Keep the values in place as ``active``'s and put ``new``'s in their place, on every head module
    where ``new`` has values of its own."""
    for _, owner, names in list(head_tensors(model)):
        stored = owner._modules.get(INACTIVE)
        if stored is None or new not in stored:
            continue
        stored[active] = _copy_of_parameters(owner, names)
        for name in names:
            getattr(owner, name).copy_(getattr(stored[new], name))
        del stored[new]


def drop_head_values(model: nn.Module, adapter: Optional[str] = None) -> None:
    """Forget ``adapter``'s values (every inactive adapter's when None)."""
    for _, owner, _ in list(head_tensors(model)):
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
    owner, param_name = parameter_owner(model, name)
    stored = owner._modules.get(INACTIVE)
    if adapter is not None and stored is not None and adapter in stored:
        return getattr(stored[adapter], param_name)
    return getattr(owner, param_name)


def check_inactive_head_values(model: nn.Module, saved: dict[str, Tensor]) -> None:
    """Refuse saved head parameters (qualified name -> tensor) an inactive adapter cannot hold: one of the
    root module's own (it has no owner below the model to keep the values)."""
    for name in saved:
        if parameter_owner(model, name)[0] is model:
            raise ValueError(f"checkpoint parameter {name!r} belongs to the model's root module, which cannot hold "
                             f"an inactive adapter's values; load this checkpoint into the active adapter")


@torch.no_grad()
def write_inactive_head_values(model: nn.Module, adapter: str, saved: dict[str, Tensor]) -> None:
    """Store saved head parameters (qualified name -> tensor, checked to fit and by
    ``check_inactive_head_values``) as the inactive ``adapter``'s values, marking their modules saved in
    full; the parameters in place are not touched."""
    for name, tensor in saved.items():
        owner, param_name = parameter_owner(model, name)
        mark_saved_in_full(owner)
        stored = _stored(owner)
        if adapter not in stored:
            stored[adapter] = _copy_of_parameters(owner, [n for n, _ in _own_values(owner)])
        getattr(stored[adapter], param_name).copy_(tensor)

"""Method registry: each method module registers its config class, adapter class and PEFT format once.

    register_method(LoraConfig, LoraAdapter, peft_format=LORA_FORMAT)   # at the end of methods/lora.py

The method's name is its config class's ``method``. Lookups by config walk the config's MRO, so a
user's subclass of a registered config runs its nearest registered ancestor's method (and saves
under that method's name unless it sets its own ``method`` and registers it).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .config import AdapterConfig
    from .methods.base import Adapter
    from .peft_formats import PeftFormat


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method: its name, config class, adapter class and PEFT format (None: no PEFT counterpart)."""

    name: str
    config: type["AdapterConfig"]
    adapter: type["Adapter"]
    peft_format: Optional["PeftFormat"] = None


_METHODS: dict[type, Method] = {}  # config class -> its registration


def register_method(config: type["AdapterConfig"], adapter: type["Adapter"],
                    peft_format: Optional["PeftFormat"] = None) -> Method:
    """Register the method of ``config`` (named ``config.method``), built as ``adapter``, exported to and
    loaded from PEFT through ``peft_format``. Registering the same config class again replaces its entry;
    a name or peft_type already taken by another config class raises ValueError."""
    from .config import AdapterConfig
    from .methods.base import Adapter

    if not (isinstance(config, type) and issubclass(config, AdapterConfig)):
        raise TypeError(f"config must be an AdapterConfig subclass, got {config!r}")
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise TypeError(f"adapter must be an Adapter subclass, got {adapter!r}")
    name = config.method
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config.__name__}.method must name the method (a non-empty str), got {name!r}")
    for other in _METHODS.values():
        if other.config is config:
            continue
        if other.name == name:
            raise ValueError(f"method {name!r} is already registered by {other.config.__name__}")
        if peft_format is not None and other.peft_format is not None \
                and other.peft_format.peft_type == peft_format.peft_type:
            raise ValueError(f"peft_type {peft_format.peft_type!r} is already registered by {other.name!r}")
    method = Method(name, config, adapter, peft_format)
    _METHODS[config] = method
    return method


def method_of(config: "AdapterConfig") -> Method:
    """The method of ``config``: its class's registration, else its nearest registered base class's."""
    for cls in type(config).__mro__:
        if cls in _METHODS:
            return _METHODS[cls]
    raise ValueError(f"no adapter registered for {type(config).__name__}")


def method_named(name: str) -> Method:
    """The method registered under ``name`` (a config's ``method``, as saved in checkpoints)."""
    for method in _METHODS.values():
        if method.name == name:
            return method
    raise ValueError(f"unknown adapter method {name!r}; known: {sorted(m.name for m in _METHODS.values())}")


def peft_methods() -> dict[str, Method]:
    """peft_type -> the method loaded from and exported to it."""
    return {m.peft_format.peft_type: m for m in _METHODS.values() if m.peft_format is not None}


class _AdapterTypes(Mapping):
    """Read-only view of the registry: registered config class -> adapter class."""

    def __getitem__(self, config: type) -> type["Adapter"]:
        return _METHODS[config].adapter

    def __iter__(self) -> Iterator[type]:
        return iter(_METHODS)

    def __len__(self) -> int:
        return len(_METHODS)


ADAPTER_TYPES: Mapping = _AdapterTypes()

"""torch's fused nn.TransformerEncoder(Layer) inference paths, kept off around adapted layers.

In eval mode ``nn.TransformerEncoderLayer`` may run one fused kernel that reads its layers' weights
directly (the adapters would be skipped), and ``nn.TransformerEncoder`` with a padding mask may turn
its input into a nested tensor, which the adapted layers do not take. ``inject`` registers a no-op
forward pre-hook on each adapted layer inside an encoder layer (a hooked submodule keeps the fused
layer path off) and sets ``use_nested_tensor = False`` on each encoder holding one (the padded path,
which training mode takes anyway); ``unload`` and ``merge_and_unload`` give an encoder without
adapted layers left its nested path back.
"""
from __future__ import annotations

from torch import nn

from .layer import AdapterLinear

#: set on the encoders whose nested path inject turned off
_NESTED_OFF = "_fastlora_nested_tensor_off"


def _no_fused_path(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: its presence keeps nn.TransformerEncoderLayer off its fused
    inference path."""


def _enclosing(model: nn.Module, name: str, kind: type) -> list[nn.Module]:
    """The modules of type ``kind`` that hold the module called ``name`` (itself included)."""
    parts = name.split(".")
    found = (model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1))
    return [module for module in found if isinstance(module, kind)]


def keep_fused_paths_off(model: nn.Module, module: nn.Module, names: list[str]) -> None:
    """``module``, an adapted layer now under ``names`` in ``model``: hook it when an encoder layer holds
    it, and turn the nested path of each encoder holding it off."""
    if any(_enclosing(model, name, nn.TransformerEncoderLayer) for name in names):
        module.register_forward_pre_hook(_no_fused_path)
    for encoder in {id(e): e for name in names for e in _enclosing(model, name, nn.TransformerEncoder)}.values():
        if getattr(encoder, "use_nested_tensor", False):
            encoder.use_nested_tensor = False
            setattr(encoder, _NESTED_OFF, True)


def restore_fused_paths(model: nn.Module) -> None:
    """Give the encoders whose nested path ``keep_fused_paths_off`` turned off, and which hold no adapted
    layer any more, that path back."""
    for encoder in model.modules():
        if getattr(encoder, _NESTED_OFF, False) and not any(isinstance(m, AdapterLinear) for m in encoder.modules()):
            encoder.use_nested_tensor = True
            delattr(encoder, _NESTED_OFF)

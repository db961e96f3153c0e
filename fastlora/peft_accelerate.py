"""Run a PEFT model's LoRA and PEANuT layers through fastlora's fused op, keeping everything else PEFT's.

    model = peft.get_peft_model(base, peft.LoraConfig(...))   # or PeftModel.from_pretrained(...)
    fastlora.accelerate(model)      # same modules, parameters, state dict, save_pretrained
    fastlora.accelerate(model, backend="torch")   # the same, every layer on one plan (default "auto")
    ...
    fastlora.deaccelerate(model)    # PEFT's own forward again

Only the forward of each accelerated layer changes (an instance attribute shadowing the class's
``forward``). Per call, a layer whose state the fused op cannot compute takes PEFT's forward:
adapters disabled or merged, several active adapters, a mixed batch (``adapter_names``), a LoRA
variant (DoRA, ...) on the active adapter, forward or backward hooks on the layer's submodules (ZeRO-3,
FSDP) and torch's global module hooks, a parametrized lora_A / lora_B, lora_dropout 1, extra forward
arguments, a trainable base weight, an input dtype the base weight does not share outside autocast. A
trainable base bias (PEFT's ``bias="all"`` / ``"lora_only"``) gets its gradient from the fused op, and so does
``lora_bias``'s bias of lora_B.
Layers it never computes (Embedding, Conv, quantized or other tuner layers, a LoRA layer over another
tuner layer in a mixed model) are listed once in a
warning at ``accelerate`` time. Layers added later (a new adapter targeting new modules) are
accelerated by calling ``accelerate`` again.

PEFT's layers mapped onto ``adapted_linear(x, W, b, A, B, scale=s, dropout=p)``:
    lora.Linear     A = lora_A[name].weight, B = lora_B[name].weight, s = scaling[name],
                    p = lora_dropout[name].p while that dropout module is in training mode;
                    b = the base bias, plus s * lora_B[name].bias with ``lora_bias`` (PEFT scales
                    lora_B's output, its bias included: b + s * b_B, one (d_out,) add per call);
                    over nn.Linear or GPT-2's Conv1D (``fan_in_fan_out``: W is the transposed view of
                    its (d_in, d_out) weight, no copy; the flag only changes PEFT's merge, not its forward).
    peanut.Linear   A = f(act(W^T A_n^T))^T (encoders/decoders of depth res_num), B = peanut_B[name].weight,
                    s = scaling[name]; H = act(W^T A_n^T) by ``neat_projection`` (no dense ΔW is built).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from fastlora.kernels import BACKENDS, adapted_linear, neat_projection
from fastlora.kernels.activations import activation
from fastlora.kernels.caller_warnings import warn_at_caller

from .layer import conv1d_type, is_adaptable
from .peft_formats import PEANUT_ACTIVATIONS

_MARK = "_fastlora_accelerated"
_BACKEND = "_fastlora_backend"


def _peft_layer_types() -> dict[type, tuple[Callable, tuple[type, ...]]]:
    """PEFT layer class -> (its call: (layer, x, args, kwargs) -> the fused output, or a str saying why
    PEFT's path runs; the base layer types the call computes)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.peanut.layer import Linear as PeanutLinear
    from transformers.pytorch_utils import Conv1D
    return {LoraLinear: (_lora_call, (nn.Linear, Conv1D)), PeanutLinear: (_peanut_call, (nn.Linear,))}


def _weight(module: nn.Module) -> Tensor:
    """``module.weight`` read from ``_parameters``, without nn.Module's ``__getattr__`` (~0.7 us of host time
    per read on a CPU, three reads per call)."""
    return module._parameters["weight"]


def _linear_weight(base: nn.Module) -> Tensor:
    """The base weight in nn.Linear's (d_out, d_in) layout: a Conv1D's (d_in, d_out) weight transposed (a view)."""
    return _weight(base).t() if type(base) is conv1d_type() else _weight(base)


def _active_adapter(layer: nn.Module, factors: nn.ModuleDict) -> tuple[Optional[str], Optional[str]]:
    """(the single active adapter of ``layer`` holding factors here, None) or (None, why PEFT's path
    runs; None when that path computes the base layer alone: disabled, merged, no active adapter here)."""
    active = [name for name in layer.active_adapters if name in factors]
    if layer.disable_adapters or layer.merged or not active:
        return None, None
    if len(active) > 1:
        return None, f"{len(active)} active adapters (the fused op computes one)"
    return active[0], None


def _base_layer(layer: nn.Module) -> nn.Module:
    """The layer a PEFT layer wraps, the one its forward calls: an nn.Linear, or in a mixed model another
    tuner layer (LoRA over LoHa), whose update the fused op would skip (``_common_reason`` refuses it)."""
    return layer._modules["base_layer"]


#: torch's hooks on every module (torch.nn.modules.module.register_module_*_hook): they would miss the
#: submodule calls the fused path skips
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _common_reason(base: nn.Module, x: Tensor, modules: tuple[nn.Module, ...], args, kwargs) -> Optional[str]:
    """Why no PEFT layer type can take the fused path for this call over ``base`` (the layer's base
    layer), else None. Asked on every call: each check is a few attribute reads."""
    if args or kwargs:
        return f"extra forward arguments {sorted(kwargs) or len(args)}"
    if not is_adaptable(base):
        return f"base layer is a {type(base).__name__}, not an nn.Linear or Conv1D"
    for module in (base, *modules):
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
                or module._backward_pre_hooks:
            return "hooks on the layer's submodules (ZeRO-3, FSDP or user hooks read them there)"
    if any(_GLOBAL_HOOKS):
        return "global module hooks (torch.nn.modules.module.register_module_*_hook)"
    weight = base._parameters["weight"]
    if weight.requires_grad:
        return "base weight is trainable"
    if not x.is_floating_point():
        return f"input dtype {x.dtype}"
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return f"input dtype {x.dtype} differs from the base weight's {weight.dtype} outside autocast"
    return None


def _lora_call(layer: nn.Module, x: Tensor, args, kwargs) -> Union[Tensor, str, None]:
    """The fused output of a lora.Linear, else why PEFT's path runs (None: it adds nothing)."""
    modules = layer._modules
    name, reason = _active_adapter(layer, modules["lora_A"])
    if name is None:
        return reason
    if name in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[name]).__name__} (DoRA, ...)"
    lora_a, lora_b, dropout = modules["lora_A"][name], modules["lora_B"][name], modules["lora_dropout"][name]
    scale = layer.scaling[name]
    if isinstance(scale, Tensor):
        return "a tensor scaling"
    base = _base_layer(layer)
    reason = _common_reason(base, x, (lora_a, lora_b, dropout), args, kwargs)
    if reason is not None:
        return reason
    if "parametrizations" in lora_a._modules or "parametrizations" in lora_b._modules:
        return "a parametrized lora_A / lora_B (weight_norm, spectral_norm, ...)"
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if p >= 1.0:
        return f"lora_dropout p={p} (the update is zero)"
    bias = base._parameters.get("bias")
    if layer.lora_bias.get(name, False):
        scaled = lora_b._parameters["bias"] * scale
        bias = scaled if bias is None else bias + scaled
    return adapted_linear(x, _linear_weight(base), bias, _weight(lora_a), _weight(lora_b),
                          scale=float(scale), dropout=p, backend=layer.__dict__[_BACKEND])


def _peanut_call(layer: nn.Module, x: Tensor, args, kwargs) -> Union[Tensor, str, None]:
    """The fused output of a peanut.Linear, else why PEFT's path runs (None: it adds nothing)."""
    name, reason = _active_adapter(layer, layer.peanut_A)
    if name is None:
        return reason
    act = PEANUT_ACTIVATIONS.get(layer.act_fn[name])
    if act is None:
        return f"activation {layer.act_fn[name]!r}"
    encoders, decoders = layer.peanut_encoders[name], layer.peanut_decoders[name]
    modules = (layer.peanut_A[name], layer.peanut_B[name], *encoders, *decoders)
    base = _base_layer(layer)
    reason = _common_reason(base, x, modules, args, kwargs)
    if reason is not None:
        return reason
    a_n = layer.peanut_A[name].weight
    backend = layer.__dict__[_BACKEND]
    h = neat_projection(base.weight.to(a_n.dtype), a_n, act, backend)
    skips = []
    for encoder in encoders[:layer.res_num[name]]:
        skips.append(h)
        h = activation(act, encoder(h))
    for decoder in decoders[:layer.res_num[name]]:
        h = activation(act, decoder(h)) + skips.pop()
    return adapted_linear(x, base.weight, base.bias, h.t(), layer.peanut_B[name].weight,
                          scale=float(layer.scaling[name]), backend=backend)


def _fused_forward(call: Callable, layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The accelerated forward: the fused op, or PEFT's forward with a one-time warning saying why (silently
    on the meta device: shapes only, as PEFT gives them)."""
    if x.is_meta:
        return type(layer).forward(layer, x, *args, **kwargs)
    out = call(layer, x, args, kwargs)
    if isinstance(out, Tensor):
        return out
    if out is not None:
        warn_at_caller(f"fastlora.accelerate: a {type(layer).__name__} layer ran on PEFT's path: {out}")
    return type(layer).forward(layer, x, *args, **kwargs)


def accelerated_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers whose forward ``accelerate`` replaced; a call of one still takes PEFT's
    path where the fused op cannot compute it (DoRA, several active adapters, ...: the warning names it)."""
    return [name for name, module in model.named_modules() if getattr(module, _MARK, False)]


def _kind(module: nn.Module) -> str:
    """A module's class as a warning names it: PEFT's tuner layers with their tuner ("lora.Linear")."""
    path = type(module).__module__
    return f"{path.rsplit('.', 2)[-2]}.{type(module).__name__}" if path.startswith("peft.") else type(module).__name__


def accelerate(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every PEFT LoRA ``Linear`` layer (over an nn.Linear or GPT-2's Conv1D) and PEANuT ``Linear``
    layer of ``model`` (a PeftModel or any module holding PEFT layers) compute its forward with
    fastlora's fused op on ``backend`` (a plan of ``fastlora.kernels.adapted_linear``; "auto" chooses per
    call); returns ``model``.

    Parameters, buffers, module names and PEFT's methods are untouched, so ``save_pretrained``,
    ``load_adapter``, ``set_adapter``, ``disable_adapter``, merging and Trainer checkpoints work
    as before. Other PEFT tuner layers stay on PEFT's path and are listed in one warning.
    Idempotent; calling it again sets every accelerated layer's backend; undone by ``deaccelerate``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    calls = _peft_layer_types()
    skipped, tuner_layers = [], 0
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        tuner_layers += 1
        if getattr(module, _MARK, False):
            setattr(module, _BACKEND, backend)
            continue
        call, bases = calls.get(type(module), (None, ()))
        base = _base_layer(module) if "base_layer" in module._modules else module.get_base_layer()
        if call is None or type(base) not in bases:
            skipped.append(f"{name} ({_kind(module)} over {_kind(base)})")
            continue
        module.forward = functools.partial(_fused_forward, call, module)
        setattr(module, _BACKEND, backend)
        setattr(module, _MARK, True)
    if skipped:
        warn_at_caller(f"fastlora.accelerate: {len(skipped)} PEFT layers stay on PEFT's path (the fused op computes "
                       f"LoRA layers over nn.Linear or Conv1D and PEANuT layers over nn.Linear): "
                       f"{', '.join(skipped)}")
    if not tuner_layers:
        warn_at_caller("fastlora.accelerate: the model holds no PEFT tuner layers, so nothing was accelerated; call "
                       "it on the model peft.get_peft_model returns (a fastlora.inject model runs fastlora already)")
    return model


def deaccelerate(model: nn.Module) -> nn.Module:
    """Give every layer ``accelerate`` switched its PEFT forward back; returns ``model``."""
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            delattr(module, _BACKEND)
    return model

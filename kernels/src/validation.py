"""Input checks of the adapted-linear operation: clear errors before any kernel runs."""
from __future__ import annotations

import math
import numbers
import weakref
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: host scalar types (torch.compile passes symbolic ones)
_SCALARS = (numbers.Real, torch.SymInt, torch.SymFloat)
_STRIDED = torch.strided


def _check_index(name: str, index: Tensor, bound: int, what: str) -> None:
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor, got {index.dtype} with shape {tuple(index.shape)}")
    if index.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if torch.compiler.is_compiling():
        return  # the range check reads index values on the host: eager mode only
    lo, hi = _value_range(index)
    if lo < 0 or hi >= bound:
        raise IndexError(f"{name} values must lie in [0, {bound}) ({what}), got range [{lo}, {hi}]")


#: id(index) -> (weak reference, storage pointer, version, (min, max)) of index tensors read before
_RANGES: dict[int, tuple[weakref.ref, int, int, tuple[int, int]]] = {}


def _value_range(index: Tensor) -> tuple[int, int]:
    """(min, max) of an index tensor, read on the host (a GPU sync) only when the tensor is new
    or changed since the last read: an adapter's index buffers are read once, not per call.

    The cache holds weak references (an entry dies with its tensor) and checks the storage
    pointer and version counter, which every in-place write bumps (writes through ``.data``
    are not seen: make a new index tensor instead).
    """
    key = id(index)
    entry = _RANGES.get(key)
    if entry is not None and entry[0]() is index and entry[1:3] == (index.data_ptr(), index._version):
        return entry[3]
    value_range = (int(index.min()), int(index.max()))
    if not index.is_inference():
        _RANGES[key] = (weakref.ref(index, lambda _, key=key: _RANGES.pop(key, None)),
                        index.data_ptr(), index._version, value_range)
    return value_range


def _kind(value: object) -> str:
    """What ``value`` is, for an error message: a tensor's layout and dtype, else its type and value."""
    if isinstance(value, Tensor):
        return f"a {value.layout} tensor of dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def check_frozen_weight(weight: Tensor) -> None:
    """ValueError when the base weight requires grad (the ops give it no gradient)."""
    if weight.requires_grad:
        raise ValueError(f"weight {tuple(weight.shape)} requires grad: the ops train adapters over a frozen base "
                         f"weight (one that must have requires_grad=False); if the model was unfrozen "
                         f"(model.requires_grad_(True)), freeze the adapted layers' weights again")


def _check_finite(name: str, value: float) -> None:
    """ValueError for a non-finite host float, in eager mode only."""
    # under torch.compile a host float may be symbolic (dynamic=True, or a float argument that changed between
    # calls), which math.isfinite cannot trace; eager calls are checked, and configs check scales when built
    if not torch.compiler.is_compiling() and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _host_gate(gate, gate_value) -> Optional[float]:
    """The gate's value on the host, checked finite (eager mode): a float gate as is, a tensor gate's
    ``gate_value`` (its host copy, only with a tensor gate), else, in eager mode, the tensor
    read once (a device sync on GPU). None for a tensor gate under torch.compile: it is not
    read (no graph break); the low-rank path runs and is multiplied by it."""
    tensor_gate = isinstance(gate, Tensor)
    if tensor_gate and gate.numel() != 1:
        raise ValueError(f"gate must be a scalar, got shape {tuple(gate.shape)}")
    if tensor_gate and not gate.is_floating_point():
        raise TypeError(f"a tensor gate must be floating point (it multiplies the update and may get a "
                        f"gradient), got dtype {gate.dtype}")
    if not tensor_gate and not isinstance(gate, _SCALARS):
        raise TypeError(f"gate must be a float or a 0-dim floating tensor, got {type(gate).__name__}")
    if gate_value is not None:
        if not tensor_gate:
            raise TypeError("gate_value is the host copy of a tensor gate; with a float gate leave it None")
        if isinstance(gate_value, Tensor):
            raise TypeError("gate_value must be a Python float (the host copy of the gate), got a tensor")
        _check_finite("gate_value", gate_value)
        return float(gate_value)
    if tensor_gate and torch.compiler.is_compiling():
        return None
    value = float(gate.detach() if tensor_gate else gate)
    _check_finite("gate", value)
    return value


def check_adapted_linear_inputs(x, weight, bias, lora_a, lora_b, middle, rank_weights, gate, gate_value,
                                scale, row_index, col_index, dropout) -> Optional[float]:
    """Validate every input; returns the gate's host value (see ``_host_gate``).
    Raises TypeError/ValueError/IndexError/RuntimeError."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in}, got shape {tuple(x.shape)}")
    check_frozen_weight(weight)
    if (lora_a is None) == (row_index is None):
        raise ValueError("give exactly one of lora_a and row_index (rows of W gathered as A)")
    if (lora_b is None) == (col_index is None):
        raise ValueError("give exactly one of lora_b and col_index (columns of W gathered as B)")
    device = x.device
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b),
                    ("middle", middle), ("rank_weights", rank_weights)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.layout is not _STRIDED:
            raise TypeError(f"{name} must be a dense tensor, got {_kind(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got dtype {t.dtype}")
        if t.device != device:
            raise RuntimeError(f"{name} is on {t.device} but x is on {device}; all inputs must share one device")
    if device.type == "meta":
        raise RuntimeError("x is on the meta device (no values): the fused op computes values; for shapes, call "
                           "the layer (AdapterLinear, or an accelerated PEFT layer: meta in, meta out)")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(device.type):
        raise TypeError(f"x dtype {x.dtype} does not match weight dtype {weight.dtype} (as in nn.Linear)")
    for name, t in (("row_index", row_index), ("col_index", col_index), ("gate", gate)):
        if t is None or type(t) is float:
            continue
        if not isinstance(t, Tensor):
            if name != "gate":  # a gate of another type is _host_gate's to refuse
                raise TypeError(f"{name} must be a 1-D int32/int64 tensor, got {_kind(t)}")
            continue
        if t.layout is not _STRIDED:
            raise TypeError(f"{name} must be a dense tensor, got {_kind(t)}")
        if t.device != device:
            raise RuntimeError(f"{name} is on {t.device} but x is on {device}; all inputs must share one device")
    if row_index is not None:
        _check_index("row_index", row_index, d_out, "output rows of W")
    if col_index is not None:
        _check_index("col_index", col_index, d_in, "input columns of W")
    r = lora_a.shape[0] if lora_a is not None else row_index.shape[0]
    if r <= 0:
        raise ValueError(f"rank r must be positive, got {r}")
    for name, t, expected in (("bias", bias, (d_out,)), ("lora_a", lora_a, (r, d_in)), ("lora_b", lora_b, (d_out, r)),
                              ("middle", middle, (r, r)), ("rank_weights", rank_weights, (r,))):
        if t is not None and t.shape != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if col_index is not None and col_index.shape[0] != r:
        raise ValueError(f"col_index must have r={r} entries, got {col_index.shape[0]}")
    host_gate = _host_gate(gate, gate_value)
    if type(scale) is not float:  # the layers' own calls pass floats: one type check
        if not isinstance(scale, (*_SCALARS, Tensor)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float, got {_kind(scale)}")
        if isinstance(scale, Tensor) and scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got a tensor of shape {tuple(scale.shape)}")
    if type(dropout) is not float and (not isinstance(dropout, _SCALARS) or isinstance(dropout, bool)):
        raise TypeError(f"dropout must be a float in [0, 1), got {_kind(dropout)}")
    if isinstance(scale, Tensor) and scale.requires_grad:
        raise TypeError("scale is a host scalar and gets no gradient; pass a float or a tensor "
                        "that does not require grad")
    if not torch.compiler.is_compiling():  # see _check_finite; float() of a tensor scale is a host read
        _check_finite("scale", float(scale))
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    return host_gate

"""Public entry point of the compute layer: validation, dtype handling, dispatch."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import custom_ops, dispatch
from .function import AdaptedLinearFunction
from .validation import check_adapted_linear_inputs


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    # autocast leaves float64 alone (as it does for nn.Linear)
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def adapted_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    *,
    middle: Optional[Tensor] = None,
    rank_weights: Optional[Tensor] = None,
    gate: Union[float, Tensor] = 1.0,
    gate_value: Optional[float] = None,
    scale: float = 1.0,
    row_index: Optional[Tensor] = None,
    col_index: Optional[Tensor] = None,
    dropout: float = 0.0,
    dropout_seed: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """y = x W^T + bias + scale * gate * ((dropout(x) A^T) M^T ⊙ m) B^T.

    Shapes: x (..., d_in), weight (d_out, d_in) frozen, bias (d_out,) or None,
    lora_a (r, d_in) or None with row_index (r,) (A = W[row_index]), lora_b (d_out, r)
    or None with col_index (r,) (B = W[:, col_index]), middle (r, r), rank_weights (r,).
    gate: float or 0-dim tensor; when it is 0 the low-rank path is skipped (a tensor
    gate that requires grad still gets d gate = scale * sum((dy B) ⊙ v)). gate_value: the
    tensor gate's value as a host float, when the caller knows it (it must equal gate): the
    op then never reads the gate back from the device (a sync on GPU). Under torch.compile a
    tensor gate without gate_value is not read at all (no graph break): the low-rank path
    runs and is multiplied by it. dropout acts
    on x in the low-rank path only; its mask is drawn from ``dropout_seed`` (or from
    torch's generator when None). backend: "auto" | "torch" | "triton".
    Factors of another float dtype than x are cast to the compute dtype (autocast's
    when enabled) and receive gradients in their own dtype.
    """
    # the gate's host value, read once; None: a device gate (no host read under torch.compile)
    gate_value = check_adapted_linear_inputs(x, weight, bias, lora_a, lora_b, middle, rank_weights, gate,
                                             gate_value, scale, row_index, col_index, dropout)
    dtype = _compute_dtype(x)
    impl = dispatch.select_backend(backend, x, dtype)
    gate_tensor = gate if isinstance(gate, Tensor) else torch.tensor(gate_value, device=x.device)
    seed = _seed_tensor(dropout, dropout_seed)
    with torch.autocast(x.device.type, enabled=False):
        return AdaptedLinearFunction.apply(
            _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), _cast(lora_a, dtype), _cast(lora_b, dtype),
            _cast(middle, dtype), _cast(rank_weights, dtype), gate_tensor,
            _as_long(row_index), _as_long(col_index),
            seed, float(scale), gate_value, float(dropout), custom_ops.backend_name(impl))


def _seed_tensor(dropout: float, dropout_seed: Optional[int]) -> Optional[Tensor]:
    """The dropout seed as a (1,) int64 CPU tensor (None without dropout).

    Drawn as a tensor, not read with .item(), so torch.compile keeps the draw in the graph
    (no graph break, a fresh seed per call); the op reads it on the host, and a CPU read
    never syncs a GPU. An explicit int seed becomes a constant of the graph.
    """
    if dropout == 0.0:
        return None
    if dropout_seed is None:
        return torch.randint(0, 2**31 - 1, (1,))
    return torch.tensor([dropout_seed], dtype=torch.int64)


def _as_long(index: Optional[Tensor]) -> Optional[Tensor]:
    return index if index is None or index.dtype == torch.int64 else index.long()

"""Public entry point of the compute layer: validation, dtype handling, dispatch."""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch, plans, torch_impl
from .function import AdaptedLinearFunction, forward_without_grad
from .masks import unseeded_torch_dropout
from .philox import draw_seed, seed_tensor
from .spec import LowRankTerm, in_dtype
from .transforms import functorch_active
from .validation import check_adapted_linear_inputs


def _compute_dtype(x: Tensor, autocasting: bool) -> torch.dtype:
    # autocast leaves float64 alone (as it does for nn.Linear)
    if autocasting and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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
    dropout_seed: Optional[Union[int, Tensor]] = None,
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
    on x in the low-rank path only; its mask (``fastlora.kernels.dropout_mask``, the same on
    every plan) is drawn from ``dropout_seed`` (an int, or a (1,) int64 tensor on x's device),
    or from a seed drawn on the device by torch's generator when None (no host read: a CUDA
    graph replays with a fresh mask each time); on the torch plan outside the Triton interpreter
    (CPU, and GPU layers that ``auto`` gives the torch plan), None means torch's own dropout
    (``F.dropout``, drawn once per call from torch's generator as nn.Dropout's mask is; another mask
    than the kernels' for the same random state). backend: "auto" | "triton" | "cublas" |
    "torch" (see ``dispatch``). Factors of another float dtype than x are cast to the compute
    dtype (autocast's when enabled) and receive gradients in their own dtype; the cublas plan
    reads them uncast (its kernels cast in registers) and forms their gradients in fp32.
    """
    # the gate's host value, read once; None: a device gate (no host read under torch.compile)
    gate_value = check_adapted_linear_inputs(x, weight, bias, lora_a, lora_b, middle, rank_weights, gate,
                                             gate_value, scale, row_index, col_index, dropout)
    autocasting = torch.is_autocast_enabled(x.device.type)
    dtype = _compute_dtype(x, autocasting)
    gathered = row_index is not None or col_index is not None
    rank = (lora_a if lora_a is not None else row_index).shape[0]
    plan = dispatch.select_plan(backend, x, dtype, lambda: _auto_plan(x, weight, bias, rank, dtype, dropout, gathered))
    gate_tensor = gate if isinstance(gate, Tensor) else None
    # the torch plan with the low-rank path on runs as torch ops autograd records (a C++ backward), and so
    # does every plan under a torch.func transform, which differentiates recorded ops only
    functorch = functorch_active()
    recorded = (plan == "torch" and bool(gate_value) or functorch) and not torch.compiler.is_compiling()
    if dropout == 0.0 or (recorded and dropout_seed is None and unseeded_torch_dropout()):
        seed = None
    else:
        seed = _seed(dropout_seed, x.device)
    # the cublas plan reads factors of another float dtype as they are (see triton.impl); recorded ops cast them
    factor_dtype = None if plan == "cublas" and not recorded else dtype
    if autocasting:  # else x and W are in ``dtype`` already (validated)
        x, weight = in_dtype(x, dtype), in_dtype(weight, dtype)
    bias = in_dtype(bias, dtype)
    if factor_dtype is not None:
        lora_a, lora_b = in_dtype(lora_a, factor_dtype), in_dtype(lora_b, factor_dtype)
        middle, rank_weights = in_dtype(middle, factor_dtype), in_dtype(rank_weights, factor_dtype)
    row_index, col_index = _as_long(row_index), _as_long(col_index)
    if recorded:  # its inputs are in ``dtype`` now: autocast's casts of its ops are no-ops, it may stay on
        gradient_gate = _gradient_gate(gate_tensor)
        # a gate at 0 that takes a gradient: the low-rank path runs, multiplied by it (as under compile)
        host_gate = 1.0 if gradient_gate is not None and not gate_value else gate_value
        term = LowRankTerm(lora_a, lora_b, middle, rank_weights, row_index, col_index, float(scale), host_gate,
                           float(dropout), seed, gradient_gate)
        return torch_impl.forward_recorded(x, weight, bias, term)
    # the Function computes in ``dtype`` itself (fp32 partials included): autocast is switched off around
    # it; entering the context costs host time, so only when autocast is on. Where autograd records
    # nothing (no_grad, inference_mode) its forward runs alone, without the Function's context
    run = AdaptedLinearFunction.apply if torch.is_grad_enabled() else forward_without_grad
    with torch.autocast(x.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        return run(x, weight, bias, lora_a, lora_b, middle, rank_weights, gate_tensor, row_index, col_index, seed,
                   float(scale), gate_value, float(dropout), plan)


def _gradient_gate(gate: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor gate that requires grad, multiplied into the recorded ops (its value is the host
    gate's): its gradient is then s * sum((dy B) ⊙ v), as the Function gives it. Else None."""
    return gate if gate is not None and gate.requires_grad else None


def _seed(dropout_seed, device: torch.device) -> Tensor:
    """The dropout seed as a (1,) int64 tensor on x's device.

    Drawn on the device, never read on the host: no sync, the draw stays in a torch.compile
    graph (a fresh seed per call, no recompile) and in a captured CUDA graph (torch's
    generator advances its offset per replay). An explicit int seed is filled on the device.
    """
    if dropout_seed is None:
        return draw_seed(device)
    if isinstance(dropout_seed, Tensor):
        if dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1 or dropout_seed.device != device:
            raise ValueError(f"dropout_seed tensor must be one int64 element on {device}, got "
                             f"{dropout_seed.dtype} of shape {tuple(dropout_seed.shape)} on {dropout_seed.device}")
        return dropout_seed.reshape(1)
    return seed_tensor(dropout_seed, device)


def _auto_plan(x: Tensor, weight: Tensor, bias: Optional[Tensor], rank: int, dtype: torch.dtype,
               dropout: float, gathered: bool) -> str:
    """auto's plan for this call's shape: the recorded winner, else the default (``plans.choose``)."""
    n_tokens = x.numel() // x.shape[-1]
    key = plans.PlanKey(str(x.device), str(dtype).removeprefix("torch."), plans.token_bucket(n_tokens),
                        weight.shape[1], weight.shape[0], rank, dropout > 0.0, gathered)
    # only asked while tuning (choose times nothing otherwise): each check costs host time per call
    measurable = plans.tuning_on() and not torch.compiler.is_compiling() and not (
        x.is_cuda and torch.cuda.is_current_stream_capturing())
    run = _timing_step(key, x.device, dtype, bias is not None) if measurable else None  # built only to be timed
    return plans.choose(key, plans.device_section(x.device), run, measurable=measurable)


def _timing_step(key: "plans.PlanKey", device: torch.device, dtype: torch.dtype, has_bias: bool):
    """run(plan): one forward + backward of ``key``'s shape on random tensors (made once).

    The user's random streams are left as they were, and inference mode, no_grad and
    autocast around the call being planned do not apply to the timing.
    """
    inputs = {}

    def make_inputs() -> None:
        make = dict(device=device, dtype=dtype)
        d_in, d_out, r, n = key.d_in, key.d_out, key.rank, key.token_bucket
        inputs.update(x=torch.randn(n, d_in, **make, requires_grad=True), dy=torch.randn(n, d_out, **make),
                      weight=torch.randn(d_out, d_in, **make) / d_in**0.5,
                      bias=torch.randn(d_out, **make) if has_bias else None)
        if key.gathered:
            inputs.update(lora_a=None, lora_b=None, row_index=torch.randperm(d_out, device=device)[:r],
                          col_index=torch.randperm(d_in, device=device)[:r],
                          middle=torch.randn(r, r, **make, requires_grad=True))
        else:
            inputs.update(lora_a=torch.randn(r, d_in, **make, requires_grad=True),
                          lora_b=torch.randn(d_out, r, **make, requires_grad=True))

    def run(plan: str) -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            if not inputs:
                make_inputs()
            factors = {k: v for k, v in inputs.items() if k not in ("x", "dy", "weight", "bias")}
            y = adapted_linear(inputs["x"], inputs["weight"], inputs["bias"], dropout=0.1 if key.dropout else 0.0,
                               backend=plan, **factors)
            y.backward(inputs["dy"])

    return run


def _as_long(index: Optional[Tensor]) -> Optional[Tensor]:
    """``index`` as int64, and as a normal tensor when it was made under inference_mode and autograd
    records this call (the Function saves it for the backward, which an inference tensor refuses)."""
    if index is None:
        return None
    if (not torch.compiler.is_compiling() and index.is_inference() and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled()):  # dynamo cannot trace is_inference()
        return index.to(torch.int64, copy=True)
    return index if index.dtype == torch.int64 else index.long()

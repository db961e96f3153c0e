"""Partial-sum buffers of the split reductions: allocated, then summed by torch.

A split reduction writes one fp32 slice per split, ``part (S, *shape)``. With one split the
kernel writes the result directly in the output dtype (nothing more to launch); with several,
torch's reduction over S adds the slices in fp32 (deterministic: no atomics) and the sum is
cast when the output dtype is not fp32. One aten op (two with the cast) costs less host time
per call than an allocation plus a Triton launch, for the same bytes.
"""
from __future__ import annotations

import torch


def partial_buffer(splits: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """(splits, *shape): fp32 partials, or the (1, *shape) output itself in ``dtype`` when splits == 1."""
    return torch.empty(splits, *shape, device=device, dtype=dtype if splits == 1 else torch.float32)


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part (S, *shape) from ``partial_buffer`` -> (*shape) in ``dtype``."""
    total = part[0] if part.shape[0] == 1 else part.sum(0)
    return total if total.dtype == dtype else total.to(dtype)

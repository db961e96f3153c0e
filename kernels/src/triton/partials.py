"""Partial-sum buffers of the split reductions: allocated, then summed by torch.

A split reduction writes one fp32 slice per split, ``part (S, *shape)``. With one split the
kernel writes the result itself, in the output dtype, into a buffer of ``shape`` (program 0's
slice offset is 0): nothing more to run on the host. With several, torch's reduction over S adds
the slices in fp32 (deterministic: no atomics) and the sum is cast when the output dtype is not
fp32. One aten op (two with the cast) costs less host time per call than an allocation plus a
Triton launch, for the same bytes.
"""
from __future__ import annotations

import torch


def partial_buffer(splits: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """(splits, *shape) fp32 partials, or, when splits == 1, the output itself: (*shape) in ``dtype``."""
    if splits == 1:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.empty((splits, *shape), device=device, dtype=torch.float32)


def sum_partials(part: torch.Tensor, splits: int, dtype: torch.dtype) -> torch.Tensor:
    """The (*shape) sum in ``dtype`` of ``part`` from ``partial_buffer(splits, shape, dtype, ...)``."""
    if splits == 1:
        return part
    total = part.sum(0)
    return total if dtype == torch.float32 else total.to(dtype)

"""Partial-sum buffers of the split reductions: allocated, then summed and cast in one launch.

A split reduction writes one fp32 slice per split, ``part (S, *shape)``. With one split the
kernel writes the result directly in the output dtype (no extra launch); with several, one
reduction kernel adds the slices in a fixed order (deterministic, no atomics) in fp32 and
stores the sum in the output dtype (no separate cast).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import cdiv, launch_context


def partial_buffer(splits: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """(splits, *shape): fp32 partials, or the (1, *shape) output itself in ``dtype`` when splits == 1."""
    return torch.empty(splits, *shape, device=device, dtype=dtype if splits == 1 else torch.float32)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, splits, numel, BLOCK: tl.constexpr):
    """Grid (cdiv(numel, BLOCK),): out[i] = sum_s part[s, i] in fp32, s in increasing order; part (S, numel)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part (S, *shape) from ``partial_buffer`` -> (*shape) in ``dtype``."""
    if part.shape[0] == 1:
        return part[0] if part.dtype == dtype else part[0].to(dtype)
    out = torch.empty(part.shape[1:], device=part.device, dtype=dtype)
    numel = out.numel()
    if numel:
        block = 1024
        with launch_context(part.device):
            _sum_splits_kernel[(cdiv(numel, block),)](part, out, part.shape[0], numel, BLOCK=block)
    return out

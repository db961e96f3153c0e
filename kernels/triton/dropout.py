"""Dropout on the low-rank input, drawn from a seed inside the kernels (no stored mask).

Entry (n, k) of the (N, d_in) input is kept when ``tl.rand(seed, n * d_in + k) >= p`` and
then scaled by 1/(1-p). The same offsets are used by the shrink, dx and dA kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import launch_context


@triton.jit
def keep_scale(seed, offsets, p, scale):
    """fp32 block: ``scale`` (= 1/(1-p)) where entry ``offsets`` is kept, 0 where dropped."""
    return tl.where(tl.rand(seed, offsets) >= p, scale, 0.0)


@triton.jit
def _keep_kernel(out_ptr, numel, seed, p, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, keep_scale(seed, offsets, p, 1.0), mask=offsets < numel)


def dropout_mask(n: int, d_in: int, p: float, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """The Triton path's dropout mask (n, d_in): 1/(1-p) where kept, 0 where dropped.

    For tests and debugging: feed it to ``adapted_linear_reference(dropout_mask=...)``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must lie in [0, 1), got {p}")
    keep = torch.empty(n, d_in, device=device, dtype=torch.float32)
    if keep.numel():
        block = 1024
        with launch_context(keep.device):
            _keep_kernel[(triton.cdiv(keep.numel(), block),)](keep, keep.numel(), seed, p, BLOCK=block)
    return keep.to(dtype) / (1.0 - p)


"""Timers of the adapted-Linear benchmark: median time of a call, peak memory of one call.

CUDA: ``triton.testing.do_bench`` median (it synchronizes and flushes the L2 cache
between calls) and the CUDA allocator's peak. CPU (a smoke check, not a measurement):
``time.perf_counter`` median of ``CPU_REPEATS`` calls after one warm-up call, and no
peak memory (None: the CPU allocator keeps no peak to read).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .profiling import launches

CPU_REPEATS = 5


def median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory (MiB) of one ``fn()`` above the memory allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    fn()  # autotuning and caches first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def forward_only(forward: Callable[[], Tensor]) -> Callable[[], None]:
    """``forward()`` under no_grad."""
    def fwd():
        with torch.no_grad():
            forward()
    return fwd


def forward_backward(forward: Callable[[], Tensor], params: Sequence[Tensor], dy: Tensor) -> Callable[[], object]:
    """``forward()`` then ``autograd.grad(y, params, dy)``."""
    return lambda: torch.autograd.grad(forward(), params, dy)


def measure(forward: Callable[[], Tensor], params: Sequence[Tensor], dy: Tensor, device: torch.device,
            module: Optional[nn.Module] = None) -> dict:
    """{"fwd_ms", "fwd_bwd_ms", "fwd_bwd_peak_mib", "fwd_bwd_launches"} of ``y = forward()``.

    fwd: ``forward()`` under no_grad. fwd_bwd: ``forward()`` then
    ``autograd.grad(y, params, dy)`` (dy fixed, allocated outside the timed call).
    launches: GPU kernels, copies and memsets of one fwd_bwd (None on CPU).
    module: when given, in eval mode for the fwd timing (inference) and in train mode
    for fwd_bwd.
    """
    fwd_bwd = forward_backward(forward, params, dy)
    if module is not None:
        module.eval()
    fwd_ms = median_ms(forward_only(forward), device)
    if module is not None:
        module.train()
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": median_ms(fwd_bwd, device), "fwd_bwd_peak_mib": peak_mib(fwd_bwd, device),
            "fwd_bwd_launches": launches(fwd_bwd, device)}

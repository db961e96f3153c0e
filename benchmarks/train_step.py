"""One training step of a whole model, and what the model benchmark measures of it.

Step: forward under ``torch.autocast(bfloat16)`` (the model returns its loss), backward, then
AdamW (``fused=True`` on CUDA) over the trainable parameters and ``zero_grad(set_to_none=True)``;
a model without trainable parameters (the frozen base) runs forward and backward only.

- ``steady``: after warm-up steps, each timed step starts on an idle device (synchronised
  before it). Device time: CUDA events around the step (on CPU: the wall time). Host time:
  ``time.perf_counter`` from the step's start until it returns, without synchronising: the CPU
  time to issue the step; when it is close to the device time the step is host-bound (or it
  synchronised, or filled the launch queue). Peak memory: the allocator's peak during the timed
  steps (weights, optimizer state, activations), and what was allocated before them.
- ``profile``: one step under torch.profiler (after one unprofiled step): GPU kernels, copies and
  memsets launched, and the kernels taking the most device time (on CPU: the top operators).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

from .model_setups import trainable
from .profiling import cpu_ops, gpu_events, per_name, top

LR = 1e-3
TOP_KERNELS = 12


def make_step(model: nn.Module, batch: dict, device: torch.device) -> Callable[[], Tensor]:
    """The training step of ``model`` on ``batch``; it returns the loss (detached, not read back)."""
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda") if params else None

    def step() -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Give the memory of deleted models back (between variants)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_step_s(step: Callable[[], Tensor], device: torch.device) -> float:
    """Seconds of one step, from its start until the device has finished it."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def steady(step: Callable[[], Tensor], device: torch.device, warmup: int, steps: int) -> dict:
    """Medians of device and host time per step, and memory (see the module docstring)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    device_ms, host_ms = [], []
    for _ in range(steps):
        synchronize(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        step()
        host_ms.append((time.perf_counter() - begin) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
        else:
            device_ms.append(host_ms[-1])
    step_ms, host = statistics.median(device_ms), statistics.median(host_ms)
    return {"step_ms": step_ms, "host_ms": host, "host_vs_step": host / step_ms, "steps_ms": device_ms,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "resident_mib": resident / 2**20 if cuda else None}


def profile(step: Callable[[], Tensor], device: torch.device) -> dict:
    """GPU launches of one step and its top kernels by device time (CPU: its top operators)."""
    if device.type != "cuda":
        return {"launches": None, "top_cpu_ops": cpu_ops(step, TOP_KERNELS)}
    events = gpu_events(step)
    return {"launches": len(events), "kernel_ms": sum(us for _, us in events) / 1e3,
            "top_kernels": top(per_name(events), TOP_KERNELS)}

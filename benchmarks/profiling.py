"""GPU work of a call as torch.profiler sees it: kernels and copies with their device times.

Used for launch counts, the per-kernel view of the Triton GEMM and skinny kernels, and
trace summaries. On CPU there is no GPU work to count (None / CPU operator times instead).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

COPY_PREFIXES = ("Memcpy", "Memset")


def gpu_events(fn: Callable[[], object], repeats: int = 1) -> list[tuple[str, float]]:
    """(name, device microseconds) of every GPU kernel, copy and memset of ``repeats`` calls
    of ``fn()`` (after one unprofiled warm-up call), in start order."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events()
              if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name, float(e.time_range.elapsed_us())) for e in events]


def launches(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """GPU kernels, copies and memsets of one ``fn()``; None on CPU."""
    return len(gpu_events(fn)) if device.type == "cuda" else None


def is_copy(name: str) -> bool:
    return name.startswith(COPY_PREFIXES)


def per_name(events: list[tuple[str, float]], repeats: int = 1) -> dict[str, dict]:
    """name -> {"calls", "us"} per call of the profiled function (totals divided by ``repeats``)."""
    table: dict[str, dict] = defaultdict(lambda: {"calls": 0, "us": 0.0})
    for name, us in events:
        table[name]["calls"] += 1
        table[name]["us"] += us
    return {name: {"calls": row["calls"] / repeats, "us": row["us"] / repeats} for name, row in table.items()}


def top(table: dict[str, dict], k: int) -> list[dict]:
    """The ``k`` rows of ``per_name`` output taking the most time, with their share of the total."""
    total = sum(row["us"] for row in table.values()) or 1.0
    rows = sorted(table.items(), key=lambda item: -item[1]["us"])[:k]
    return [{"name": name, **row, "share": row["us"] / total} for name, row in rows]


def cpu_ops(fn: Callable[[], object], k: int) -> list[dict]:
    """Top ``k`` CPU operators of one ``fn()`` by self CPU time (after a warm-up call)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:k]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
    return [{"name": e.key, "calls": e.count, "us": float(e.self_cpu_time_total),
             "share": e.self_cpu_time_total / total} for e in rows]

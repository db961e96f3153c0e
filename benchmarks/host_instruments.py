"""Instruments of the host-path benchmarks: what one call dispatches and launches, where its Python time
goes, and interleaved block timing of several variants.

- ``count_ops``: the aten operators one call dispatches (a TorchDispatchMode counting them);
- ``counted_triton``: every Triton launch counted by kernel (then run: on a GPU, or by the offline driver of
  ``offline_triton``, which stops before the driver's launch);
- ``python_top``: the Python functions with the most own time per call (cProfile);
- ``time_blocks``: microseconds per call of each variant, the variants taking turns in rounds;
- ``forced_plan``: ``auto`` runs one named plan meanwhile (accelerated PEFT layers included).
"""
from __future__ import annotations

import contextlib
import cProfile
import gc
import os
import pstats
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

from torch.utils._python_dispatch import TorchDispatchMode

#: the Python functions ``python_top`` lists
PYTHON_TOP = 10


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(call: Callable[[], object]) -> Counter:
    with OpCounter() as counter:
        call()
    return counter.ops


@contextlib.contextmanager
def counted_triton(launches: Counter) -> Iterator[None]:
    """Every Triton launch counted in ``launches`` (by kernel name), then run."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    JITFunction.run = counted
    try:
        yield
    finally:
        JITFunction.run = run


def python_top(call: Callable[[], object], calls: int, k: int = PYTHON_TOP) -> list[dict]:
    """The ``k`` Python functions with the most own time per call over ``calls`` calls (cProfile)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda kv: -kv[1][2])[:k]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": n / calls, "own_us": own / calls * 1e6}
            for (file, line, name), (_, n, own, _, _) in rows]


def time_blocks(calls: dict[str, Callable[[], object]], warmup: int, rounds: int, per_block: int,
                sync: Callable[[], None] = lambda: None,
                scope: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
                ) -> dict[str, list[tuple[float, float]]]:
    """name -> (wall, issued) microseconds per call of each round (see bench_host's docstring): ``warmup``
    calls of each, then ``rounds`` rounds in which each runs ``per_block`` calls timed together, the
    variants taking turns, garbage collection off. "wall" ends after ``sync()`` closes the block, "issued"
    before it (the host's part of the block). Every call of ``name`` runs inside ``scope(name)``."""
    for name, call in calls.items():
        with scope(name):
            for _ in range(warmup):
                call()
    sync()
    times: dict[str, list] = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, call in calls.items():
                with scope(name):
                    start = time.perf_counter()
                    for _ in range(per_block):
                        call()
                    issued = time.perf_counter()
                    sync()
                    end = time.perf_counter()
                times[name].append(((end - start) / per_block * 1e6, (issued - start) / per_block * 1e6))
    finally:
        gc.enable()
    return times


@contextlib.contextmanager
def forced_plan(plan: str) -> Iterator[None]:
    """``auto`` runs ``plan`` meanwhile (FASTLORA_BACKEND): accelerate's layers then run it too."""
    from fastlora.kernels.dispatch import ENV_VAR

    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = plan
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous


def quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile of ``values`` (both the value itself for a single one)."""
    if len(values) < 2:
        return [values[0], values[0]]
    first, _, third = statistics.quantiles(values, n=4)
    return [first, third]

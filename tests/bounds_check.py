"""Bounds checking of Triton kernels run by the interpreter (TRITON_INTERPRET=1).

The interpreter executes ``tl.load`` / ``tl.store`` on raw addresses and never asks whether a lane its mask
lets through lies inside a tensor; on a GPU such a lane faults or reads a neighbour. Inside ``bounds_checked()``
every launch of an interpreted kernel (``InterpretedFunction.run``):

- runs on copies of its tensor arguments placed in one host arena, each storage followed by a ``GUARD``-byte
  gap that belongs to no argument, so that an overrun cannot land in another argument's copy (results are
  copied back after the launch; arguments sharing a storage share its copy);
- checks, before the access, every lane whose mask is true of every load and store (the interpreter builder's
  ``create_masked_load`` / ``create_masked_store``, which unmasked, atomic-load/store and descriptor accesses
  go through too): its element must lie within the span of one tensor argument, data_ptr + [0, (1 +
  sum_k (size_k - 1) stride_k) itemsize) (a strided view's hull). Otherwise ``OutOfBounds`` names the kernel,
  the nearest argument, the offending element offsets and the program. Atomic read-modify-write operations
  are not checked (no kernel of the package uses them).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional
from unittest import mock

import numpy as np
import torch
from torch import Tensor

#: Bytes between two arguments' copies in the arena (address space only: the gap is never written or read).
GUARD = 1 << 24
_ALIGN = 128


class OutOfBounds(AssertionError):
    """A masked-in lane of a load or store addressed memory outside every tensor argument of its kernel."""


def _leading_parameters(function, count: int) -> list[str]:
    return list(inspect.signature(function).parameters)[:count] if callable(function) else []


def unavailable() -> Optional[str]:
    """Why bounds checking cannot run here (the interpreter is off, or its internals differ), or None."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "bounds checking needs the Triton interpreter (TRITON_INTERPRET=1)"
    import triton
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    run = getattr(getattr(interpreter, "InterpretedFunction", None), "run", None)
    missing = [what for what, found in (
        ("interpreter_builder.create_masked_load(ptrs, mask, ...)",
         _leading_parameters(getattr(builder, "create_masked_load", None), 2) == ["ptrs", "mask"]),
        ("interpreter_builder.create_masked_store(ptrs, value, mask, ...)",
         _leading_parameters(getattr(builder, "create_masked_store", None), 3) == ["ptrs", "value", "mask"]),
        ("InterpretedFunction.run(self, *args, grid, warmup, **kwargs)",
         _leading_parameters(run, 4) == ["self", "args", "grid", "warmup"]),
        ("TensorHandle.get_element_ty", hasattr(getattr(interpreter, "TensorHandle", None), "get_element_ty")),
    ) if not found]
    if missing:
        return f"bounds checking cannot hook Triton {triton.__version__}'s interpreter: no {'; no '.join(missing)}"
    return None


@dataclass
class Report:
    """What a ``bounds_checked`` block checked: launches and masked-in lanes per kernel name."""

    launches: Counter = field(default_factory=Counter)
    lanes: Counter = field(default_factory=Counter)


def span_elements(tensor: Tensor) -> int:
    """Elements from data_ptr to one past the last element of a (strided) tensor: 0 when empty."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def _bytes_of(storage) -> Tensor:
    return torch.tensor([], dtype=torch.uint8).set_(storage)


class _Launch:
    """One checked launch: its kernel's tensor arguments moved into an arena, and their spans."""

    def __init__(self, kernel: str, named: dict) -> None:
        self.kernel = kernel
        storages = {}
        for value in named.values():
            if isinstance(value, Tensor):
                storages.setdefault(value.untyped_storage().data_ptr(), value.untyped_storage())
        offsets, end = {}, GUARD
        for key, storage in storages.items():
            offsets[key] = end
            end += -(-storage.nbytes() // _ALIGN) * _ALIGN + GUARD
        self.arena = torch.UntypedStorage(end)
        self.storages = storages
        self.offsets = offsets
        arena = _bytes_of(self.arena)
        for key, storage in storages.items():
            arena[offsets[key]:offsets[key] + storage.nbytes()].copy_(_bytes_of(storage))
        self.args = {name: self._moved(value) for name, value in named.items() if isinstance(value, Tensor)}
        spans = sorted((t.data_ptr(), t.data_ptr() + span_elements(t) * t.element_size())
                       for t in self.args.values() if t.numel())
        merged = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.starts = np.array([lo for lo, _ in merged], dtype=np.uint64)
        self.ends = np.array([hi for _, hi in merged], dtype=np.uint64)
        self.lanes = 0

    def _moved(self, tensor: Tensor) -> Tensor:
        """``tensor`` as a view of its storage's copy in the arena (same offset, sizes and strides)."""
        start = self.offsets[tensor.untyped_storage().data_ptr()] // tensor.element_size()
        return torch.tensor([], dtype=tensor.dtype).set_(self.arena, start + tensor.storage_offset(),
                                                         tensor.shape, tensor.stride())

    def relocate(self, value):
        """The arena copy of a tensor argument; any other argument unchanged."""
        return self._moved(value) if isinstance(value, Tensor) else value

    def copy_back(self) -> None:
        arena = _bytes_of(self.arena)
        for key, storage in self.storages.items():
            _bytes_of(storage).copy_(arena[self.offsets[key]:self.offsets[key] + storage.nbytes()])

    def check(self, kind: str, ptrs, mask, grid_idx) -> None:
        """Raise ``OutOfBounds`` unless every lane of ``ptrs`` (a pointer TensorHandle) where ``mask`` holds
        addresses an element inside a tensor argument's span."""
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        active = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)].ravel()
        self.lanes += active.size
        if not active.size:
            return
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        index = np.searchsorted(self.starts, active, side="right") - 1
        inside = (index >= 0) & (active + np.uint64(size) <= self.ends[np.maximum(index, 0)])
        if inside.all():
            return
        raise OutOfBounds(self._describe(kind, [int(a) for a in active[~inside]], size, grid_idx))

    def _describe(self, kind: str, bad: list[int], size: int, grid_idx) -> str:
        def distance(tensor):
            lo = tensor.data_ptr()
            hi = lo + span_elements(tensor) * tensor.element_size()
            return max(lo - bad[0], bad[0] + size - hi, 0)

        nearest = min(distance(t) for t in self.args.values())
        names = [name for name, t in self.args.items() if distance(t) == nearest]
        tensor = self.args[names[0]]
        offsets = sorted({(a - tensor.data_ptr()) // size for a in bad})
        shown = ", ".join(map(str, offsets[:8])) + (", ..." if len(offsets) > 8 else "")
        return (f"{kind} out of bounds in kernel {self.kernel}, program {tuple(grid_idx)}: {len(bad)} masked-in "
                f"lane(s) outside every tensor argument; nearest argument {' / '.join(names)} ({tensor.dtype}, "
                f"shape {tuple(tensor.shape)}, strides {tuple(tensor.stride())}, elements [0, "
                f"{span_elements(tensor)})): element offsets {shown} (min {offsets[0]}, max {offsets[-1]})")


def _out_of_bounds_cause(error: BaseException) -> Optional[OutOfBounds]:
    """The ``OutOfBounds`` that the interpreter wrapped (in InterpreterError, once per nested call), if any."""
    while error is not None:
        if isinstance(error, OutOfBounds):
            return error
        error = error.__cause__
    return None


@contextlib.contextmanager
def bounds_checked() -> Iterator[Report]:
    """Check every load and store of every interpreted launch in the block (see the module docstring)."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original_run = interpreter.InterpretedFunction.run
    load, store = builder.create_masked_load, builder.create_masked_store
    report = Report()
    active: list[_Launch] = []

    def checked_load(ptrs, mask, *args, **kwargs):
        if active:
            active[-1].check("load", ptrs, mask, builder.grid_idx)
        return load(ptrs, mask, *args, **kwargs)

    def checked_store(ptrs, value, mask, *args, **kwargs):
        if active:
            active[-1].check("store", ptrs, mask, builder.grid_idx)
        return store(ptrs, value, mask, *args, **kwargs)

    def checked_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        launch = _Launch(self.__name__, {**dict(zip(self.arg_names, args)), **kwargs})
        active.append(launch)
        try:
            result = original_run(self, *map(launch.relocate, args), grid=grid, warmup=warmup,
                                  **{name: launch.relocate(value) for name, value in kwargs.items()})
        except Exception as error:
            cause = _out_of_bounds_cause(error)
            if cause is None:
                raise
            raise cause from None
        finally:
            active.pop()
        launch.copy_back()
        report.launches[launch.kernel] += 1
        report.lanes[launch.kernel] += launch.lanes
        return result

    with mock.patch.object(builder, "create_masked_load", checked_load), \
            mock.patch.object(builder, "create_masked_store", checked_store), \
            mock.patch.object(interpreter.InterpretedFunction, "run", checked_run):
        yield report

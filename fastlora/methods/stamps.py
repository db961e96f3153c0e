"""Stamps of tensors' current values: what lets a host-side cache skip a device read per forward.

A stamp holds the tensors weakly (a new tensor that reuses a freed one's address and Python id, as
``torch.func.functional_call`` with fresh tensors may, does not match), with each one's storage
address, version counter, dtype and device when the cached value was computed.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from fastlora.kernels.transforms import functorch_active


def trackable(tensors: Sequence[Tensor]) -> bool:
    """Whether stamps can follow ``tensors``: not under torch.compile (which traces the read instead)
    or a torch.func transform (its wrapped tensors have no storage), and no inference tensor (no
    version counter)."""
    return not (torch.compiler.is_compiling() or functorch_active() or any(t.is_inference() for t in tensors))


class TensorStamp:
    """The state of ``tensors`` (and of the hashable ``extra``: autocast's dtype, say) now. Take it before
    reading the value it stamps: a change between the two then makes the next check miss, not hit."""

    __slots__ = ("_refs", "_marks", "_extra")

    def __init__(self, tensors: Sequence[Tensor], extra: tuple = ()) -> None:
        self._refs = tuple(weakref.ref(t) for t in tensors)
        self._marks = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        self._extra = extra

    def matches(self, tensors: Sequence[Tensor], extra: tuple = ()) -> bool:
        """Whether ``tensors`` are the stamped tensor objects (checked first: another object may have no
        storage to read), unchanged since, and ``extra`` the same."""
        if extra != self._extra or len(tensors) != len(self._refs):
            return False
        for ref, (pointer, version, dtype, device), t in zip(self._refs, self._marks, tensors):
            if ref() is not t or t._version != version or t.data_ptr() != pointer or t.dtype != dtype \
                    or t.device != device:
                return False
        return True

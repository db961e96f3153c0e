"""Backend selection: Triton for eligible CUDA tensors, the torch path otherwise.

One eligibility check (device, dtype, availability); ``backend`` forces a path.
Under ``TRITON_INTERPRET=1`` a forced "triton" runs the real kernels on CPU tensors.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch
from torch import Tensor

from . import torch_impl

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing: no import in the trace
def triton_backend() -> ModuleType | None:
    """The Triton implementation module, or None when Triton is not installed.

    Errors inside the implementation itself (e.g. a Triton API difference) propagate.
    """
    return _import_triton_backend()


@functools.lru_cache(maxsize=1)
def _import_triton_backend() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module("fastlora.kernels.triton.impl")


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(backend: str, x: Tensor, dtype: torch.dtype) -> ModuleType:
    """Return the module whose forward/backward primitives run this call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return torch_impl
    eligible = (x.is_cuda or triton_interpreter_on()) and dtype in TRITON_DTYPES
    if backend == "auto":
        impl = triton_backend() if (x.is_cuda and dtype in TRITON_DTYPES) else None
        return impl or torch_impl
    if not eligible:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) of dtype fp16/bf16/fp32; "
            f"got device {x.device} and dtype {dtype}")
    impl = triton_backend()
    if impl is None:
        raise RuntimeError("backend='triton' was requested but Triton is not installed (pip install triton)")
    return impl

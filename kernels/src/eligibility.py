"""Where the Triton kernels can run: Triton installed, a CUDA device (or CPU tensors under
``TRITON_INTERPRET=1``, where the interpreter runs them), one of the dtypes they take."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreter_on() -> bool:
    """Whether Triton kernels run on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def triton_ineligibility(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` in ``dtype``, or None when they can."""
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} (the Triton plans take fp16/bf16/fp32)"
    if device.type == "cuda":
        return None if triton_backend() is not None else "Triton is not installed (pip install triton)"
    if device.type != "cpu" or not triton_interpreter_on():
        return f"device {device} (the Triton plans need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)"
    if dtype == torch.bfloat16:
        return "bf16 under the Triton interpreter (its bf16 arithmetic is wrong; use a GPU, fp16 or fp32)"
    return None if triton_backend() is not None else "Triton is not installed (pip install triton)"

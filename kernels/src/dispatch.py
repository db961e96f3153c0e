"""Execution-plan selection: which implementation runs a call.

Plans (each has the same forward/backward/neat_* primitives):

- "triton": the fused Triton plan (base GEMMs in Triton with the low-rank term in their epilogues);
- "cublas": torch's GEMMs (cuBLAS) for the base, Triton skinny kernels for the low-rank term;
- "torch":  plain torch (CPU, and anywhere Triton is not eligible);
- "onepass": the low-rank work inside the Triton base GEMMs' K loops (x and dy read once there).

``backend="auto"`` (the default) resolves in this order: the ``FASTLORA_BACKEND``
environment variable when set; the torch plan for inputs the Triton plans cannot take
(CPU, float64, Triton missing); otherwise ``plans.choose``: a winner measured for this shape
when one is recorded (``fastlora.tune``), else ``plans.default_plan``: ``plans.DEFAULT_PLAN``
("cublas"), or the torch plan below ``plans.SIZE_RULE``'s layer size, with no timing on first
use. A named backend forces its plan and fails clearly when it cannot run.
Under ``TRITON_INTERPRET=1`` the Triton plans run the real kernels on CPU tensors.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch
from torch import Tensor

from . import torch_impl
from .eligibility import triton_backend, triton_ineligibility
from .spec import Plan

PLANS = ("triton", "cublas", "torch", "onepass")
BACKENDS = ("auto", *PLANS)
#: forces a plan wherever ``backend="auto"``
ENV_VAR = "FASTLORA_BACKEND"


def plan_implementation(name: str) -> Plan:
    """The implementation (a ``spec.Plan``) that runs plan ``name``."""
    if name == "torch":
        return torch_impl
    if name in ("triton", "cublas", "onepass"):
        module = triton_backend()
        if module is None:
            raise RuntimeError(f"backend={name!r} was requested but Triton is not installed (pip install triton)")
        if name == "onepass":
            return importlib.import_module("fastlora.kernels.triton.onepass").ONEPASS
        return module.FUSED if name == "triton" else module.CUBLAS
    raise ValueError(f"plan must be one of {PLANS}, got {name!r}")


def select_plan(backend: str, x: Tensor, dtype: torch.dtype, choose: Callable[[], str]) -> str:
    """The plan name that runs this call; ``choose()`` gives auto's plan for a Triton-eligible CUDA call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    forced_by_env = backend == "auto" and os.environ.get(ENV_VAR)
    if forced_by_env:
        backend = os.environ[ENV_VAR]
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return choose() if x.is_cuda and triton_ineligibility(x.device, dtype) is None else "torch"
    reason = triton_ineligibility(x.device, dtype)
    if reason is not None:
        source = f"{ENV_VAR}={backend!r}" if forced_by_env else f"backend={backend!r}"
        raise RuntimeError(f"{source} cannot run this call: {reason}")
    return backend

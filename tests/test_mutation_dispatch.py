"""Plan dispatch (kernels/src/dispatch.py) by name and device, including the CUDA branches, checked on CPU.

Names are built at run time (not literals), so a comparison by identity instead of equality fails here as it
would for a name read from a file or the environment. A stand-in with ``is_cuda = True`` takes the CUDA
branches of the eligibility check: they read only ``x.is_cuda`` and ``x.device``.
"""
import importlib
from types import SimpleNamespace

import pytest
import torch

from fastlora.kernels import dispatch, eligibility, torch_impl

TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton is not installed")


def fresh(name):
    """An equal string that is not the interned literal."""
    return "".join(list(name))


CUDA_X = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


def test_torch_plan_by_name():
    assert dispatch.plan_implementation(fresh("torch")) is torch_impl


@needs_triton
@pytest.mark.parametrize("name,module,attribute", [
    ("triton", "fastlora.kernels.triton.impl", "FUSED"),
    ("cublas", "fastlora.kernels.triton.impl", "CUBLAS"),
    ("onepass", "fastlora.kernels.triton.onepass", "ONEPASS"),
])
def test_triton_plans_by_name(name, module, attribute):
    expected = getattr(importlib.import_module(module), attribute)
    assert dispatch.plan_implementation(fresh(name)) is expected


@pytest.mark.parametrize("name", ["auto", "a", "tor", "torch2", "onepas", "p", "triton ", "zzz", ""])
def test_unknown_plan_names_are_refused(name):
    with pytest.raises(ValueError, match="plan must be one of"):
        dispatch.plan_implementation(name)


@needs_triton
def test_triton_backend_is_the_triton_implementation():
    assert eligibility.triton_backend() is importlib.import_module("fastlora.kernels.triton.impl")


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("2", False), ("true", False),
                                            ("10", False), (None, False)])
def test_interpreter_flag_is_exactly_one(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert eligibility.triton_interpreter_on() is expected


@pytest.mark.parametrize("interpreter", [None, "1"])
@pytest.mark.parametrize("device", ["meta", "xpu", "mps", "hpu"])
def test_devices_other_than_cuda_and_the_interpreters_cpu_are_not_eligible(monkeypatch, device, interpreter):
    """Device types that sort after "cuda" (meta, xpu, ...) are neither CUDA nor the interpreter's CPU."""
    if interpreter is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpreter)
    reason = eligibility.triton_ineligibility(torch.device(device), torch.float16)
    assert reason is not None and f"device {device}" in reason


@needs_triton
def test_cuda_inputs_are_eligible_when_triton_is_installed():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert eligibility.triton_ineligibility(CUDA_X.device, dtype) is None
    assert "dtype torch.float64" in eligibility.triton_ineligibility(CUDA_X.device, torch.float64)


def test_cuda_inputs_without_triton_say_so(monkeypatch):
    monkeypatch.setattr(eligibility, "triton_backend", lambda: None)
    reason = eligibility.triton_ineligibility(CUDA_X.device, torch.float16)
    assert reason == "Triton is not installed (pip install triton)"


@needs_triton
def test_auto_on_cuda_takes_the_measured_plan(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.select_plan(fresh("auto"), CUDA_X, torch.float16, choose=lambda: "onepass") == "onepass"


def test_auto_on_cuda_without_triton_is_torch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(eligibility, "triton_backend", lambda: None)
    assert dispatch.select_plan("auto", CUDA_X, torch.float16, choose=lambda: "onepass") == "torch"


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_and_auto_run_bf16_on_cpu_without_measuring(monkeypatch, backend):
    """bf16 on CPU is not Triton-eligible (under the interpreter or not): torch, never an error or a measurement."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.zeros(2, 3, dtype=torch.bfloat16)

    def choose():
        raise AssertionError("nothing to measure on CPU")

    assert dispatch.select_plan(fresh(backend), x, torch.bfloat16, choose) == "torch"


def test_environment_variable_applies_to_auto_only(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert dispatch.select_plan(fresh("torch"), x, torch.bfloat16, lambda: "cublas") == "torch"
    with pytest.raises(RuntimeError, match=rf"{dispatch.ENV_VAR}='triton' cannot run this call"):
        dispatch.select_plan(fresh("auto"), x, torch.bfloat16, lambda: "cublas")


def test_triton_backend_is_a_constant_under_torch_compile():
    """torch.compile reads triton_backend() as a traced constant: no import (which dynamo cannot trace) in
    the graph, so a whole-graph compile of a function asking for it succeeds."""
    expected = 1.0 if eligibility.triton_backend() is not None else 2.0

    def pick(x):
        return x + (1.0 if eligibility.triton_backend() is not None else 2.0)

    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(3)), torch.full((3,), expected))

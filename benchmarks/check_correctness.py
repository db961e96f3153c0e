"""GPU check, section "correctness": every plan and method against a float64 reference.

    python -m benchmarks.check_correctness --plan P --device cuda|cpu [--quick] [--start I] [--budget-s S] --out PATH

runs one plan's items in this process (benchmarks/correctness_section.py runs each plan so, in
a child process of its own). Items, in priority order (the time budget may cut the tail, listed
as skipped):

- op cases: ``adapted_linear`` on each plan vs ``adapted_linear_reference`` on float64
  copies (dropout: the reference gets ``dropout_mask(n, d_in, p, seed)``, the mask every
  plan draws from that seed); the output and the gradient of every input that takes one
  (x, bias, A, B, middle, rank_weights, gate); "fp32_factors": fp32 factors over a
  half-precision x and W (PEFT's adapters; the cublas plan reads them uncast);
- methods: each method's ``op_arguments`` (detached, as leaves) through ``adapted_linear``
  on each plan, the same comparison;
- layers: each method's ``AdapterLinear`` (backend "auto", fp32 factors over a half-precision
  W, as built) vs ``reference_forward`` of a float64 copy of the layer whose parameters are
  first rounded to the compute dtype (the operands the fused op sees: with fp32 operands a
  ReLU kink turns their rounding into gradient differences of several percent);
  output, input gradient and every trainable parameter's;
- NEAT's projection ``neat_projection`` vs ``neat_projection_reference`` (H and dA_n).

Error: ||out - ref|| / ||ref|| (||out|| when ref is zero, e.g. factor gradients at gate 0).
With a tensor gate (op cases; fp32, as a method's score), rank weights or a middle factor, and
in every layer check, dy gets the reference low-rank term (gate on, scaled to unit RMS) added:
the gradient of a gate, a rank weight (s sum_n dP_nj u_nj) or M is then a sum over tokens
dominated by its coherent part, not a cancellation of random terms (whose relative rounding
error has a heavy tail: with a random dy alone, d rank_weights passed 1e-2 in bf16 for 5 of 40
draws on the torch plan).
Tolerance: 1e-2 in bf16/fp16, 1e-4 in fp32 (TF32 off).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from fastlora import kernels
from fastlora.kernels import adapted_linear, adapted_linear_reference

from .bench_methods import METHODS, method_layer
from .isolated import is_cuda_fault, write_json

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
SCALE = 2.0
OPTIONAL = ("middle", "rank_weights", "gate")  # tensor keyword arguments of adapted_linear
DROPOUT, SEED = 0.1, 1234
NEAT_ACTS = ("relu", "gelu")
# (n, d_in, d_out, r) per shape name; "bench" is the benchmark's shape (full runs only)
SHAPES = {"base": (1024, 512, 768, 16), "odd": (1000, 520, 700, 12), "bench": (8192, 4096, 4096, 16)}
QUICK_SHAPES = {"base": (40, 48, 56, 4), "odd": (37, 29, 23, 3)}
# case -> (shape, features)
CASES = {
    "plain": ("base", {"bias"}),
    "rank_mask": ("base", {"rank_weights"}),
    "middle": ("base", {"middle"}),
    "gathered": ("base", {"gathered", "middle"}),
    "gate_1": ("base", {"gate_1"}),
    "gate_0": ("base", {"gate_0"}),
    "dropout": ("base", {"dropout", "bias"}),
    "odd": ("odd", {"bias", "rank_weights", "middle", "dropout"}),
    "odd_gathered": ("odd", {"gathered", "middle"}),
    "fp32_factors": ("odd", {"fp32_factors", "bias", "middle", "rank_weights", "dropout"}),
    "bench": ("bench", {"bias"}),
}


def rel_error(out: Optional[Tensor], ref: Optional[Tensor]) -> float:
    """||out - ref|| / ||ref|| in float64; ||out|| when ref is all zeros; inf when out is missing."""
    if ref is None:
        return 0.0 if out is None else float("inf")
    if out is None:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    ref_norm = float(ref.norm())
    diff = float((out - ref).norm())
    return diff / ref_norm if ref_norm > 0 else diff


def case_inputs(features: set, shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
    """(tensor arguments of adapted_linear, other keyword arguments) of one case."""
    n, d_in, d_out, r = shape
    gen = torch.Generator(device=device).manual_seed(n * 7 + r)

    factor_dtype = torch.float32 if "fp32_factors" in features else dtype

    def rnd(*size, s=1.0, grad=True, factor=False):
        return (torch.randn(*size, device=device, generator=gen) * s).to(factor_dtype if factor else dtype) \
            .requires_grad_(grad)

    t = {"x": rnd(n, d_in), "weight": rnd(d_out, d_in, s=d_in ** -0.5, grad=False),
         "bias": rnd(d_out) if "bias" in features else None}
    kw: dict = {"scale": SCALE}
    if "gathered" in features:
        t["lora_a"] = t["lora_b"] = None
        kw["row_index"] = torch.randperm(d_out, device=device, generator=gen)[:r]
        kw["col_index"] = torch.randperm(d_in, device=device, generator=gen)[:r]
        t["middle"] = rnd(r, r, factor=True)
    else:
        t["lora_a"], t["lora_b"] = rnd(r, d_in, s=d_in ** -0.5, factor=True), rnd(d_out, r, s=r ** -0.5, factor=True)
        t["middle"] = rnd(r, r, s=r ** -0.5, factor=True) if "middle" in features else None
    if "rank_weights" in features:
        weights = torch.rand(r, device=device, generator=gen) + 0.5
        weights[1::2] = 0.0
        t["rank_weights"] = weights.to(factor_dtype).requires_grad_(True)
    else:
        t["rank_weights"] = None
    for value in (1.0, 0.0):
        if f"gate_{value:.0f}" in features:
            t["gate"] = torch.tensor(value, device=device, requires_grad=True)  # fp32, as a method's score
            kw["gate_value"] = value
    if "dropout" in features:
        kw.update(dropout=DROPOUT, dropout_seed=SEED)
    return t, kw


def compare(tensors: dict, kw: dict, dy: Tensor, plan: str, tol: float) -> dict:
    """Errors of adapted_linear on ``plan`` vs the float64 reference, output and every gradient."""
    leaves = {k: v for k, v in tensors.items() if isinstance(v, Tensor) and v.requires_grad}
    ref_t = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, Tensor) else v)
             for k, v in tensors.items()}
    ref_kw = {k: v for k, v in kw.items() if k not in ("gate_value", "dropout", "dropout_seed")}
    if kw.get("dropout"):
        n, d_in = tensors["x"].shape
        # in float64 the mask is drawn by torch's ops (philox.py), not by the kernels under test
        ref_kw["dropout_mask"] = kernels.dropout_mask(n, d_in, kw["dropout"], kw["dropout_seed"], dy.device,
                                                      torch.float64)

    def reference(**override):
        args = {**{k: v for k, v in ref_t.items() if k in OPTIONAL}, **override}
        return adapted_linear_reference(ref_t["x"], ref_t["weight"], ref_t.get("bias"), ref_t.get("lora_a"),
                                        ref_t.get("lora_b"), **args, **ref_kw)

    y_ref = reference()
    if leaves.keys() & set(OPTIONAL):  # each of their gradients sums over every token
        with torch.no_grad():
            dy = dy + _unit_rms(reference(gate=1.0) - reference(gate=0.0)).to(dy.dtype)
    ref_grads = torch.autograd.grad(y_ref, [ref_t[k] for k in leaves], dy.double(), allow_unused=True)
    y = adapted_linear(tensors["x"], tensors["weight"], tensors.get("bias"), tensors.get("lora_a"),
                       tensors.get("lora_b"), **{k: v for k, v in tensors.items() if k in OPTIONAL},
                       **kw, backend=plan)
    grads = torch.autograd.grad(y, list(leaves.values()), dy, allow_unused=True)
    errors = {"y": rel_error(y, y_ref)}
    errors.update({f"d_{k}": rel_error(g, g_ref) for k, g, g_ref in zip(leaves, grads, ref_grads)})
    return _verdict(errors, tol)


def _unit_rms(t: Tensor) -> Tensor:
    """``t`` scaled to root-mean-square 1 (zeros stay zeros)."""
    rms = t.pow(2).mean().sqrt()
    return t / rms if rms > 0 else t


def _verdict(errors: dict, tol: float) -> dict:
    worst = max(errors.values())
    return {"errors": errors, "max_error": worst, "tolerance": tol, "pass": worst < tol}


def _method_inputs(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
    """A method's op arguments (detached leaves) for x and W of ``shape``."""
    n, d_in, d_out, r = shape
    gen = torch.Generator(device=device).manual_seed(5)
    weight = (torch.randn(d_out, d_in, device=device, generator=gen) * d_in ** -0.5).to(dtype)
    layer = method_layer(name, weight, r, "torch", gen)
    with torch.no_grad():
        args = dict(layer.adapter.op_arguments(layer.weight))
    tensors = {"x": torch.randn(n, d_in, device=device, generator=gen).to(dtype).requires_grad_(True),
               "weight": weight, "bias": None}
    kw = {}
    for k, v in args.items():
        if k in ("lora_a", "lora_b") and v is None:
            tensors[k] = None
        elif isinstance(v, Tensor) and v.is_floating_point():  # factors in the compute dtype, a gate as it is
            tensors[k] = v.detach().to(v.dtype if k == "gate" else dtype).clone().requires_grad_(True)
        else:
            kw[k] = v
    return tensors, kw


def layer_check(name: str, shape: tuple, dtype: torch.dtype, device: torch.device, backend: str = "auto") -> dict:
    """AdapterLinear of method ``name`` (on ``backend``) vs reference_forward of a float64 copy."""
    n, d_in, d_out, r = shape
    gen = torch.Generator(device=device).manual_seed(6)
    weight = (torch.randn(d_out, d_in, device=device, generator=gen) * d_in ** -0.5).to(dtype)
    layer = method_layer(name, weight, r, backend, gen)  # factors in fp32 over the half-precision W
    ref = copy.deepcopy(layer)
    ref.config = ref.adapter.config = dataclasses.replace(ref.config, backend="auto")  # float64: the torch plan
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype))
    ref.double()
    x = torch.randn(n, d_in, device=device, generator=gen).to(dtype).requires_grad_(True)
    dy = torch.randn(n, d_out, device=device, generator=gen).to(dtype)
    params = {k: p for k, p in layer.named_parameters() if p.requires_grad}
    ref_params = dict(ref.named_parameters())
    x64 = x.detach().double().requires_grad_(True)
    with torch.no_grad():  # the low-rank term with the gate on, added to dy (see the module docstring)
        args = {"lora_a": None, "lora_b": None, **ref.adapter.op_arguments(ref.weight), "gate": 1.0}
        args.pop("gate_value", None)
        dy = dy + _unit_rms(adapted_linear_reference(x64, ref.weight, None, **args) - x64 @ ref.weight.t()).to(dtype)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params.values()], dy, allow_unused=True)
    y_ref = ref.reference_forward(x64)
    ref_grads = torch.autograd.grad(y_ref, [x64, *(ref_params[k] for k in params)], dy.double(), allow_unused=True)
    errors = {"y": rel_error(y, y_ref)}
    errors.update({f"d_{k}": rel_error(g, g_ref) for k, g, g_ref in zip(["x", *params], grads, ref_grads)})
    return _verdict(errors, TOLERANCE[dtype])


def neat_check(act: str, shape: tuple, dtype: torch.dtype, device: torch.device, plan: str) -> dict:
    """neat_projection on ``plan`` vs its float64 reference: H and the gradient of A_n."""
    _, d_in, d_out, r = shape
    gen = torch.Generator(device=device).manual_seed(7)
    weight = (torch.randn(d_out, d_in, device=device, generator=gen) * d_in ** -0.5).to(dtype)
    a_n = (torch.randn(r, d_out, device=device, generator=gen) * (d_in / d_out) ** 0.5).to(dtype).requires_grad_()
    dh = torch.randn(d_in, r, device=device, generator=gen).to(dtype)
    h = kernels.neat_projection(weight, a_n, act, backend=plan)
    (da,) = torch.autograd.grad(h, a_n, dh)
    a64 = a_n.detach().double().requires_grad_(True)
    h_ref = kernels.neat_projection_reference(weight.double(), a64, act)
    (da_ref,) = torch.autograd.grad(h_ref, a64, dh.double())
    return _verdict({"h": rel_error(h, h_ref), "d_a_n": rel_error(da, da_ref)}, TOLERANCE[dtype])


def op_check(case: str, dtype: torch.dtype, shapes: dict, device: torch.device, plan: str) -> dict:
    shape_name, features = CASES[case]
    return features_check(features, shapes[shape_name], dtype, device, plan)


def features_check(features: set, shape: tuple, dtype: torch.dtype, device: torch.device, plan: str) -> dict:
    """adapted_linear with ``features`` at ``shape`` (n, d_in, d_out, r) on ``plan`` vs the float64 reference."""
    tensors, kw = case_inputs(features, shape, dtype, device)
    dy = torch.randn(tensors["x"].shape[0], tensors["weight"].shape[0], device=device).to(dtype)
    return compare(tensors, kw, dy, plan, TOLERANCE[dtype])


def method_check(name: str, dtype: torch.dtype, shape: tuple, device: torch.device, plan: str) -> dict:
    tensors, kw = _method_inputs(name, shape, dtype, device)
    dy = torch.randn(tensors["x"].shape[0], tensors["weight"].shape[0], device=device).to(dtype)
    return compare(tensors, kw, dy, plan, TOLERANCE[dtype])


def dtypes_for(device: torch.device) -> tuple[torch.dtype, ...]:
    """The half-precision dtypes checked: bf16 and fp16 on CUDA; fp16 under the Triton
    interpreter (its bf16 arithmetic is wrong); bf16 with the torch plan on CPU."""
    if device.type == "cuda":
        return torch.bfloat16, torch.float16
    return (torch.float16,) if os.environ.get("TRITON_INTERPRET") == "1" else (torch.bfloat16,)


def items(device: torch.device, plans: tuple[str, ...], quick: bool) -> Iterator[tuple[dict, Callable[[], dict]]]:
    """(description, check) of every item, in priority order."""
    shapes = QUICK_SHAPES if quick else SHAPES
    cases = [c for c in CASES if CASES[c][0] in shapes]
    half = dtypes_for(device)
    for i, dtype in enumerate(half):
        name = str(dtype).replace("torch.", "")
        for case in cases:
            for plan in plans:
                yield {"kind": "op", "case": case, "dtype": name, "plan": plan}, \
                    lambda c=case, d=dtype, p=plan: op_check(c, d, shapes, device, p)
        if i == 0:
            for method in METHODS:
                yield {"kind": "layer", "method": method, "dtype": name, "plan": "auto"}, \
                    lambda m=method, d=dtype: layer_check(m, shapes["base"], d, device)
        for method in METHODS:
            for plan in plans:
                yield {"kind": "method", "method": method, "dtype": name, "plan": plan}, \
                    lambda m=method, d=dtype, p=plan: method_check(m, d, shapes["base"], device, p)
        for act in NEAT_ACTS:
            for plan in plans:
                yield {"kind": "neat", "act": act, "dtype": name, "plan": plan}, \
                    lambda a=act, d=dtype, p=plan: neat_check(a, shapes["base"], d, device, p)
    for case in ("plain", "gathered", "dropout"):
        for plan in plans:
            yield {"kind": "op", "case": case, "dtype": "float32", "plan": plan}, \
                lambda c=case, p=plan: _fp32(lambda: op_check(c, torch.float32, shapes, device, p))


def _fp32(check: Callable[[], dict]) -> dict:
    """``check()`` with TF32 off (full fp32 matmuls in torch and in the Triton dots)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return check()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def plan_items(device: torch.device, plan: str, quick: bool) -> list[tuple[dict, Callable[[], dict]]]:
    """The items of one plan, in priority order; plan "auto" holds the layer items."""
    return [item for item in items(device, () if plan == "auto" else (plan,), quick) if item[0]["plan"] == plan]


ITEM_RESERVE_S = 3.0
FAULT_EXIT = 3  # the child's exit status after an item that left its CUDA context unusable


def run_plan(device: torch.device, plan: str, quick: bool, start: int, budget_s: float, out: Path) -> int:
    """Run the items of ``plan`` from index ``start`` while ``budget_s`` lasts, rewriting ``out`` before
    and after every item ({"plan", "total", "items", "running": the item started and not finished,
    "skipped"}); stop after a CUDA fault. The exit status: 0, or FAULT_EXIT after a fault."""
    deadline = time.monotonic() + budget_s
    todo = plan_items(device, plan, quick)
    result = {"plan": plan, "total": len(todo), "items": [], "running": None, "skipped": []}
    for index, (desc, check) in enumerate(todo[start:], start):
        desc = {**desc, "index": index}
        if deadline - time.monotonic() < ITEM_RESERVE_S:
            result["skipped"].append({**desc, "reason": "time budget"})
            continue
        result["running"] = desc
        write_json(out, result)
        begin = time.monotonic()
        try:
            desc.update(check())
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous fault shows here, on its item
        except Exception:  # noqa: BLE001 - one failing item must not stop the others
            error = traceback.format_exc(limit=-10)
            desc.update({"pass": False, "error": error, "fault": is_cuda_fault(error)})
        desc["seconds"] = time.monotonic() - begin  # first calls include Triton compilation and autotuning
        result["items"].append(desc)
        result["running"] = None
        write_json(out, result)
        if desc.get("fault"):
            return FAULT_EXIT
    write_json(out, result)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """One plan's items in this process: ``python -m benchmarks.check_correctness --plan P --out PATH``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_correctness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True, choices=(*kernels.PLANS, "auto"))
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--start", type=int, default=0, help="index of the first item to run")
    parser.add_argument("--budget-s", type=float, default=float("inf"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    return run_plan(torch.device(args.device), args.plan, args.quick, args.start, args.budget_s, args.out)


if __name__ == "__main__":
    sys.exit(main())

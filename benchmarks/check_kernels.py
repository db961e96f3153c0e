"""GPU check, sections "order", "products", "gemm", "skinny" and "trace": per-kernel views and timings.

- order: the cublas plan's output order timed at the benchmark shapes, r = 16 (``output_order``:
  the GEMM with beta 0 and 1, the low-rank term added after the GEMM against the GEMM accumulating
  into it, for y and dx, the term written by addmm or by the Triton expand).
- gemm: the two longest kernels of one forward + backward (the base GEMMs: y and dx) of
  the "triton" plan against those of ``F.linear`` with its input gradient (cuBLAS), at the
  benchmark shapes, r = 16; plus forward medians of base, the triton plan with gate 0 and
  every plan, and (with the onepass plan) of the persistent one-pass forward and input-gradient
  kernels for several programs per row block (``ONEPASS_GROUPS``; "default": their own choice).
- skinny: device time of each skinny kernel of a forward and a backward ("cublas" plan when
  there is one: its other kernels are cuBLAS GEMMs) and its GB/s from a byte model, the
  fewest bytes the kernel must move (its (N, d) operand read once, factors read once,
  outputs written once in fp32), against the copy ceiling of section "env".
- products (after section "compile", whose kernels it launches): at every skinny case, the medians of
  each skinny product by its Triton kernel and by torch's GEMM (cuBLAS) on the same operands
  (``skinny_against_cublas``): the shrink t = x A^T, the dy pass (dP = dy B and dB = dy^T v: one Triton
  pass or two, against two GEMMs) and dA = dt^T x, without dropout, and the shrink and dA with dropout
  0.05 against a GEMM over ``F.dropout(x)`` (the mask materialised, as PEFT's layer does); and whether
  the case's dy pass reads dy twice. Where a GEMM is as fast the plan can take it
  (``fastlora.kernels.triton.products``; benchmarks/decisions.py reads these rows).
- trace: the top kernels (GPU) or operators (CPU) of one forward + backward of each plan.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastlora.kernels import adapted_linear

from .bench_adapted_linear import DTYPES, FULL_SHAPES, SCALE, case_tensors
from .check_env import copy_gbs
from .check_speed import QUICK_CASES
from .profiling import cpu_ops, gpu_events, is_copy, per_name, top
from .timing import forward_backward, forward_only, median_ms

REPEATS = 5
GEMM_RANK = 16
SKINNY_CASES = [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 11008, 16)]
TRACE_CASE = (8192, 4096, 4096, 16)
TOP = 15
ITEM_RESERVE_S = 5.0
#: label -> programs per row block wanted of the one-pass kernels (None: their own choice; capped at the column
#: tiles, so "per_tile" is one tile per program: the side product formed in every tile)
ONEPASS_GROUPS = {"default": None, "1": 1, "2": 2, "4": 4, "8": 8, "per_tile": 10**6}


def _tensors(case: tuple, device: torch.device) -> dict:
    return case_tensors(*case, device, DTYPES[device.type])


def _plan_forward(t: dict, plan: str, gate: float = 1.0) -> Callable[[], torch.Tensor]:
    return lambda: adapted_linear(t["x"], t["weight"], None, t["a"], t["b"], scale=SCALE, gate=gate, backend=plan)


def _longest(events: list[tuple[str, float]], count: int) -> dict:
    """The ``count`` longest kernels per call (of REPEATS calls): their names and mean total time."""
    kernels = sorted((e for e in events if not is_copy(e[0])), key=lambda e: -e[1])[:count * REPEATS]
    return {"names": sorted({name for name, _ in kernels}), "us": sum(us for _, us in kernels) / REPEATS}


def _gemm_case(n: int, d_in: int, d_out: int, ctx) -> dict:
    t = _tensors((n, d_in, d_out, GEMM_RANK), ctx.device)
    base_forward = lambda: F.linear(t["x"], t["weight"])  # noqa: E731
    cublas_gemms = _longest(gpu_events(forward_backward(base_forward, [t["x"]], t["dy"]), REPEATS), 2)
    fused = forward_backward(_plan_forward(t, "triton"), [t["x"], t["a"], t["b"]], t["dy"])
    triton_gemms = _longest(gpu_events(fused, REPEATS), 2)
    fwd_ms = {"base": median_ms(forward_only(base_forward), ctx.device),
              "triton_gate_0": median_ms(forward_only(_plan_forward(t, "triton", gate=0.0)), ctx.device)}
    fwd_ms.update({plan: median_ms(forward_only(_plan_forward(t, plan)), ctx.device) for plan in ctx.plans})
    case = {"n": n, "d_in": d_in, "d_out": d_out, "cublas_gemms": cublas_gemms, "triton_gemms": triton_gemms,
            "gemm_ratio": triton_gemms["us"] / cublas_gemms["us"], "fwd_ms": fwd_ms,
            "fwd_vs_base": {k: v / fwd_ms["base"] for k, v in fwd_ms.items()}}
    if "onepass" in ctx.plans:
        case["onepass_groups_fwd_ms"] = {label: median_ms(_onepass_forward(t, groups), ctx.device)
                                         for label, groups in ONEPASS_GROUPS.items()}
        case["onepass_groups_bwd_ms"] = {label: median_ms(_onepass_input_grad(t, groups), ctx.device)
                                         for label, groups in ONEPASS_GROUPS.items()}
    return case


def output_order(t: dict, device: torch.device) -> dict:
    """Medians (ms) of the base GEMM alone ("gemm": beta 0; "gemm_into": beta 1, reading the output back),
    of the low-rank term added after it ("term_after": a separate addmm_ pass over the output) and of the
    output started as the term with the GEMM accumulating into it ("term_first": the cublas plan; by the
    Triton expand kernel instead of addmm: "term_first_expand"), for y = x W^T + s v B^T and
    dx = dy W + s dt A, with fp32 v and factors (PEFT's adapters: addmm gets them cast, the expand reads
    them as they are); "first_vs_after" and "expand_vs_addmm" are ratios of those."""
    from fastlora.kernels.triton.fused_linear import fused_linear

    x, weight, dy, a, b = (t[k].detach() for k in ("x", "weight", "dy", "a", "b"))
    side = torch.randn(x.shape[0], a.shape[0], device=device)
    dtype = x.dtype
    result = {}
    for name, mat1, mat2, up in (("y", x, weight.t(), b.t().float()), ("dx", dy, weight, a.float())):
        out = torch.mm(mat1, mat2)

        def term() -> torch.Tensor:
            return torch.empty_like(out).addmm_(side.to(dtype), up.to(dtype), beta=0, alpha=SCALE)

        ms = {"gemm": median_ms(lambda: torch.mm(mat1, mat2), device),
              "gemm_into": median_ms(lambda: out.addmm_(mat1, mat2), device),
              "term_after": median_ms(lambda: torch.mm(mat1, mat2).addmm_(side.to(dtype), up.to(dtype),
                                                                          alpha=SCALE), device),
              "term_first": median_ms(lambda: term().addmm_(mat1, mat2), device),
              "term_first_expand": median_ms(lambda: fused_linear(None, None, None, side, up, v_scale=SCALE,
                                                                  out_dtype=dtype).addmm_(mat1, mat2), device)}
        result[name] = {**ms, "first_vs_after": ms["term_first"] / ms["term_after"],
                        "into_vs_gemm": ms["gemm_into"] / ms["gemm"],
                        "expand_vs_addmm": ms["term_first_expand"] / ms["term_first"]}
    return result


def _onepass_forward(t: dict, groups: Optional[int]) -> Callable[[], object]:
    """The one-pass forward kernel alone (y and t of plain LoRA) with ``groups`` programs per row block wanted."""
    from fastlora.kernels.triton.onepass_forward import onepass_forward

    x, w, a, b = (t[k].detach() for k in ("x", "weight", "a", "b"))
    return lambda: onepass_forward(x, w.t(), None, a, None, b.t(), None, None, None, v_scale=SCALE, gate=None,
                                   p=0.0, seed=None, groups=groups)


def _onepass_input_grad(t: dict, groups: Optional[int]) -> Callable[[], object]:
    """The one-pass input-gradient kernel alone (dx, dP and, where the plan takes them from it, the dB
    partials of plain LoRA) with ``groups`` programs per row block wanted."""
    from fastlora.kernels.triton.onepass_backward import db_partials_are_cheaper, onepass_input_grad

    dy, w, a, b = (t[k].detach() for k in ("dy", "weight", "a", "b"))
    v = torch.randn(dy.shape[0], a.shape[0], device=dy.device) if db_partials_are_cheaper(dy, a.shape[0]) else None
    return lambda: onepass_input_grad(dy, w, b.t(), None, a, None, None, None, v, False, v_scale=SCALE, gate=None,
                                      p=0.0, seed=None, db_dtype=b.dtype, dbias_dtype=dy.dtype, groups=groups)


def _each_shape(ctx, measure: Callable[[int, int, int], dict]) -> dict:
    """{"rank", "shapes": measure(n, d_in, d_out) of each benchmark shape while ITEM_RESERVE_S is left (the
    report rewritten after each), "skipped": the shapes left for time}."""
    result = {"rank": GEMM_RANK, "shapes": [], "skipped": []}
    for n, d_in, d_out in FULL_SHAPES:
        if not ctx.has(ITEM_RESERVE_S):
            result["skipped"].append({"shape": [n, d_in, d_out], "reason": "time budget"})
            continue
        result["shapes"].append(measure(n, d_in, d_out))
        ctx.partial(result)
    return result


def gemm_vs_cublas(ctx) -> dict:
    if "triton" not in ctx.plans:
        return {"status": "skipped", "reason": "the triton plan is not checked (--plans)"}
    result = _each_shape(ctx, lambda n, d_in, d_out: _gemm_case(n, d_in, d_out, ctx))
    result["summary"] = "Triton GEMMs / cuBLAS: " + ", ".join(
        f"{s['d_in']}x{s['d_out']} {s['gemm_ratio']:.2f}x" for s in result["shapes"])
    return result


def order(ctx) -> dict:
    """Section "order": ``output_order`` at each benchmark shape (r = GEMM_RANK) while time is left."""
    def measure(n: int, d_in: int, d_out: int) -> dict:
        t = _tensors((n, d_in, d_out, GEMM_RANK), ctx.device)
        return {"n": n, "d_in": d_in, "d_out": d_out, **output_order(t, ctx.device)}

    result = _each_shape(ctx, measure)
    result["summary"] = "low-rank term first / after the GEMM: " + ", ".join(
        f"{s['d_in']}x{s['d_out']} y {s['y']['first_vs_after']:.2f}x dx {s['dx']['first_vs_after']:.2f}x"
        for s in result["shapes"])
    return result


def model_bytes(kind: str, n: int, d_in: int, d_out: int, r: int, elem: int) -> int:
    """Fewest bytes a skinny kernel of ``kind`` moves (see the module docstring)."""
    f32 = 4
    return {"shrink_x": n * d_in * elem + r * d_in * elem + n * r * f32,
            "shrink_dy": n * d_out * elem + r * d_out * elem + n * r * f32,
            "dy_columns": n * d_out * elem + r * d_out * elem + n * r * f32 + d_out * r * f32,
            "down_grad": n * d_in * elem + n * r * f32 + r * d_in * f32}[kind]


def kernel_kind(name: str, phase: str) -> Optional[str]:
    """The byte model of a kernel, from its name and phase (fwd/bwd); None for others."""
    name = name.lower()
    if "shrink" in name:
        return "shrink_x" if phase == "fwd" else "shrink_dy"
    if "dy_col" in name or "dy_pass" in name:
        return "dy_columns"
    if "down_grad" in name:
        return "down_grad"
    return None


def _ceiling(ctx) -> float:
    env = ctx.report["sections"].get("env", {})
    return env.get("copy_gbs") or copy_gbs(ctx.device, 2**30)


def _skinny_case(case: tuple, plan: str, ceiling: float, device: torch.device) -> dict:
    n, d_in, d_out, r = case
    t = _tensors(case, device)
    params = [t["x"], t["a"], t["b"]]
    forward = _plan_forward(t, plan)
    y = forward()
    phases = {"fwd": gpu_events(forward, REPEATS),
              "bwd": gpu_events(lambda: torch.autograd.grad(y, params, t["dy"], retain_graph=True), REPEATS)}
    kernels = []
    for phase, events in phases.items():
        for name, row in per_name(events, REPEATS).items():
            kind = kernel_kind(name, phase)
            us = row["us"] / row["calls"]
            gbs = model_bytes(kind, n, d_in, d_out, r, t["x"].element_size()) / (us * 1e-6) / 1e9 if kind else None
            kernels.append({"phase": phase, "name": name, "kind": kind, "us": us, "calls": row["calls"],
                            "gbs": gbs, "of_copy": gbs / ceiling if gbs else None})
    return {"n": n, "d_in": d_in, "d_out": d_out, "r": r, "kernels": kernels}


#: dropout probability of the skinny products timed with a mask (bench_model's)
SKINNY_DROPOUT = 0.05


def skinny_against_cublas(case: tuple, device: torch.device) -> dict:
    """Per skinny product of ``case`` (n, d_in, d_out, r): {"triton": ms, "cublas": ms, "ratio": triton / cublas}
    (see the module docstring; factors in x's dtype, as the case builds them)."""
    from fastlora.kernels.philox import draw_seed
    from fastlora.kernels.triton.products import triton_only
    from fastlora.kernels.triton.shrink import shrink
    from fastlora.kernels.triton.skinny import down_grad, dy_pass

    t = {k: v.detach() for k, v in _tensors(case, device).items()}
    x, a, b, dy = t["x"], t["a"], t["b"], t["dy"]
    n, r, p = x.shape[0], a.shape[0], SKINNY_DROPOUT
    v, dt = torch.randn(n, r, device=device), torch.randn(n, r, device=device)  # fp32, as the plan's
    seed = draw_seed(device)
    pairs = {
        "shrink": (lambda: shrink(x, a, None), lambda: torch.mm(x, a.t())),
        "dy_pass": (lambda: dy_pass(dy, b.t(), None, v, False, v_scale=SCALE),
                    lambda: (torch.mm(dy, b), torch.mm(dy.t(), v.to(dy.dtype)))),
        "down_grad": (lambda: down_grad(dt, x), lambda: torch.mm(dt.to(x.dtype).t(), x)),
        "shrink_dropout": (lambda: shrink(x, a, None, p, seed), lambda: torch.mm(F.dropout(x, p), a.t())),
        "down_grad_dropout": (lambda: down_grad(dt, x, p, seed),
                              lambda: torch.mm(dt.to(x.dtype).t(), F.dropout(x, p))),
    }
    result = {}
    for name, (triton_fn, cublas_fn) in pairs.items():
        with triton_only():
            triton_ms = median_ms(triton_fn, device)
        ms = {"triton": triton_ms, "cublas": median_ms(cublas_fn, device)}
        result[name] = {**ms, "ratio": ms["triton"] / ms["cublas"]}
    return result


def dy_read_twice(n: int, d_out: int, r: int, dtype: torch.dtype) -> bool:
    """Whether the dy pass of this case reads dy twice (its single pass is not the cheaper), with the
    tiles this process launches."""
    from fastlora.kernels.triton.skinny import column_blocks, one_pass_is_cheaper

    dy = torch.empty(n, d_out, dtype=dtype, device="meta")
    return not one_pass_is_cheaper(dy, r, column_blocks(d_out, r, dtype))


def _each_skinny_case(ctx, result: dict, measure: Callable[[tuple], dict]) -> dict:
    """``result`` with "cases": measure(case) of each of ``SKINNY_CASES`` while ITEM_RESERVE_S is left (the
    report rewritten after each), and "skipped": the cases left for time."""
    result.update(cases=[], skipped=[])
    for case in SKINNY_CASES:
        if not ctx.has(ITEM_RESERVE_S):
            result["skipped"].append({"case": list(case), "reason": "time budget"})
            continue
        result["cases"].append(measure(case))
        ctx.partial(result)
    return result


def skinny_bandwidth(ctx) -> dict:
    plan = "cublas" if "cublas" in ctx.plans else "triton"
    ceiling = _ceiling(ctx)
    result = _each_skinny_case(ctx, {"plan": plan, "copy_gbs": ceiling},
                               lambda case: _skinny_case(case, plan, ceiling, ctx.device))
    skinny = [k["of_copy"] for c in result["cases"] for k in c["kernels"] if k["of_copy"] is not None]
    result["summary"] = (f"{len(skinny)} skinny kernels at {min(skinny):.0%}-{max(skinny):.0%} of copy GB/s"
                         if skinny else "no skinny kernel recognised by name")
    return result


def products(ctx) -> dict:
    """Section "products": ``skinny_against_cublas`` and ``dy_read_twice`` at each skinny case while time is left."""
    def measure(case: tuple) -> dict:
        n, d_in, d_out, r = case
        return {"n": n, "d_in": d_in, "d_out": d_out, "r": r,
                "dy_read_twice": dy_read_twice(n, d_out, r, DTYPES[ctx.device.type]),
                "against_cublas": skinny_against_cublas(case, ctx.device)}

    result = _each_skinny_case(ctx, {}, measure)
    result["summary"] = "Triton / cuBLAS: " + "; ".join(
        f"r={c['r']} {c['d_in']}x{c['d_out']} " + " ".join(f"{name} {row['ratio']:.2f}x"
                                                          for name, row in c["against_cublas"].items())
        for c in result["cases"])
    return result


def trace(ctx) -> dict:
    case = QUICK_CASES[0] if ctx.quick else TRACE_CASE
    t = _tensors(case, ctx.device)
    result = {"case": list(case), "plans": {}, "skipped": []}
    for plan in (*ctx.plans, "auto"):
        if not ctx.has(ITEM_RESERVE_S / 2):
            result["skipped"].append({"plan": plan, "reason": "time budget"})
            continue
        step = forward_backward(_plan_forward(t, plan), [t["x"], t["a"], t["b"]], t["dy"])
        if ctx.device.type == "cuda":
            events = gpu_events(step)
            result["plans"][plan] = {"launches": len(events), "total_us": sum(us for _, us in events),
                                     "top": top(per_name(events), TOP)}
        else:
            result["plans"][plan] = {"top_cpu_ops": cpu_ops(step, TOP)}
        ctx.partial(result)
    result["summary"] = ", ".join(f"{plan}: {row['launches']} launches, {row['total_us']:.0f} us"
                                  if "launches" in row else f"{plan}: {len(row['top_cpu_ops'])} CPU ops"
                                  for plan, row in result["plans"].items())
    return result

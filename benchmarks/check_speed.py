"""GPU check, section "speed": the adapted-Linear benchmark's cases in the time left.

Each case is ``bench_case`` of benchmarks/bench_adapted_linear.py (base, every plan, auto,
PEFT, gate off, half the ranks pruned, dropout, every method; ratios from the same run);
variants that no longer fit the budget are listed under the case's "skipped_for_time".
Each case also gets its "targets" (benchmarks/speed_targets.py) and, under "floors", the
byte/FLOP floor of base and of every plan (benchmarks/byte_model.py) next to the measured
medians: floor = sum over the plan's kernels of max(bytes / bandwidth, FLOPs / peak), and
measured / floor, the distance to that limit (>= 1 up to the model's approximations).
Peaks: the documented ones of a known GPU (``byte_model.DEVICE_PEAKS``), else the copy
bandwidth and matmul FLOP/s measured by section "env" (none without it: no floors).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import byte_model
from .bench_adapted_linear import FULL_RANKS, FULL_SHAPES, bench_case, method_note
from .speed_targets import targets

QUICK_CASES = [(64, 32, 48, 4)]
# time that must be left to start a case / a variant (a first call may compile and autotune kernels)
CASE_RESERVE_S = {"cuda": 30.0, "cpu": 2.0}
VARIANT_RESERVE_S = {"cuda": 12.0, "cpu": 0.5}
#: benchmark variant -> the byte model's plan it runs (plain LoRA: A and B trained, x's gradient, no bias)
MODELLED = {"base": "base", **{f"fastlora_{plan}": plan for plan in byte_model.PLANS}}


def cases(quick: bool) -> list[tuple[int, int, int, int]]:
    """(n, d_in, d_out, r) of every case."""
    return QUICK_CASES if quick else [(n, d_in, d_out, r) for n, d_in, d_out in FULL_SHAPES for r in FULL_RANKS]


def device_peaks(report: dict) -> Optional[dict]:
    """{"source", "bandwidth" (bytes/s), "flops" (FLOP/s)} for the floors of the report's device."""
    documented = byte_model.device_peaks(report["device"])
    if documented is not None:
        key, bandwidth, flops = documented
        return {"source": f"documented {key}", "bandwidth": bandwidth, "flops": flops}
    env = report["sections"].get("env", {})
    if env.get("copy_gbs") and env.get("matmul"):
        return {"source": f"measured (env: copy, {env['matmul']['dtype']} matmul)",
                "bandwidth": env["copy_gbs"] * 1e9, "flops": env["matmul"]["tflops"] * 1e12}
    return None


def floors(case: dict, peaks: dict) -> dict:
    """variant -> {"fwd_floor_ms", "fwd_bwd_floor_ms", "fwd_vs_floor", "fwd_bwd_vs_floor"} for the
    measured variants the byte model describes (``MODELLED``), at the case's shape and dtype."""
    elem = torch.empty(0, dtype=getattr(torch, case["dtype"])).element_size()
    shape = byte_model.Shape(case["n"], case["d_in"], case["d_out"], case["r"], elem)
    model = byte_model.floors(shape, peaks["bandwidth"], peaks["flops"])
    out = {}
    for name, res in case["results"].items():
        if name in MODELLED:
            row = model[MODELLED[name]]
            fwd, step = row["fwd_us"] / 1e3, row["step_us"] / 1e3
            out[name] = {"fwd_floor_ms": fwd, "fwd_bwd_floor_ms": step,
                         "fwd_vs_floor": res["fwd_ms"] / fwd, "fwd_bwd_vs_floor": res["fwd_bwd_ms"] / step}
    return out


def run(ctx) -> dict:
    kind = ctx.device.type
    peaks = device_peaks(ctx.report)
    result = {"method": method_note(ctx.device), "peaks": peaks, "cases": [], "skipped": []}
    for n, d_in, d_out, r in cases(ctx.quick):
        if not ctx.has(CASE_RESERVE_S[kind]):
            result["skipped"].append({"n": n, "d_in": d_in, "d_out": d_out, "r": r, "reason": "time budget"})
            continue
        print(f"N={n} {d_in}->{d_out} r={r}", flush=True)
        case = bench_case(n, d_in, d_out, r, ctx.device, keep_going=lambda: ctx.has(VARIANT_RESERVE_S[kind]),
                          plans=ctx.plans)
        case["targets"] = targets(case, ctx.plans)
        case["floors"] = floors(case, peaks) if peaks else {}
        for name, row in case["floors"].items():
            print(f"  {name:38s} floor fwd {row['fwd_floor_ms']:8.3f} ms (x{row['fwd_vs_floor']:.2f})  "
                  f"fwd+bwd {row['fwd_bwd_floor_ms']:8.3f} ms (x{row['fwd_bwd_vs_floor']:.2f})", flush=True)
        result["cases"].append(case)
        ctx.partial(result)
    measured = sum(len(c["results"]) + len(c["methods"]) for c in result["cases"])
    verdicts = [t["met"] for c in result["cases"] for t in c["targets"] if t["met"] is not None]
    result["summary"] = (f"{len(result['cases'])} cases, {measured} variants measured, "
                         f"{sum(len(c['errors']) for c in result['cases'])} failed, "
                         f"{sum(len(c['skipped_for_time']) for c in result['cases'])} variants and "
                         f"{len(result['skipped'])} cases skipped for time; "
                         f"targets met {sum(verdicts)}/{len(verdicts)}")
    return result

"""GPU check, section "speed": the adapted-Linear benchmark's cases in the time left.

Each case is ``bench_case`` of benchmarks/bench_adapted_linear.py (base, every plan, auto,
PEFT, gate off, half the ranks pruned, dropout, every method; ratios from the same run);
variants that no longer fit the budget are listed under the case's "skipped_for_time".
Each case also gets its "targets" (benchmarks/speed_targets.py).
"""
from __future__ import annotations

from .bench_adapted_linear import FULL_RANKS, FULL_SHAPES, bench_case, device_plans, method_note
from .speed_targets import targets

QUICK_CASES = [(64, 32, 48, 4)]
# time that must be left to start a case / a variant (a first call may compile and autotune kernels)
CASE_RESERVE_S = {"cuda": 30.0, "cpu": 2.0}
VARIANT_RESERVE_S = {"cuda": 12.0, "cpu": 0.5}


def cases(quick: bool) -> list[tuple[int, int, int, int]]:
    """(n, d_in, d_out, r) of every case."""
    return QUICK_CASES if quick else [(n, d_in, d_out, r) for n, d_in, d_out in FULL_SHAPES for r in FULL_RANKS]


def run(ctx) -> dict:
    kind = ctx.device.type
    result = {"method": method_note(ctx.device), "cases": [], "skipped": []}
    for n, d_in, d_out, r in cases(ctx.quick):
        if not ctx.has(CASE_RESERVE_S[kind]):
            result["skipped"].append({"n": n, "d_in": d_in, "d_out": d_out, "r": r, "reason": "time budget"})
            continue
        print(f"N={n} {d_in}->{d_out} r={r}", flush=True)
        case = bench_case(n, d_in, d_out, r, ctx.device, keep_going=lambda: ctx.has(VARIANT_RESERVE_S[kind]))
        case["targets"] = targets(case, device_plans(ctx.device))
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

"""The performance targets of one adapted Linear, read off a benchmark case (measured, never
asserted): each is reported with its limit, the measured value and whether it is met.

Ratios are forward + backward medians (or peak memory) of the ``auto`` variants against base,
PEFT and the fastest plan, from the same run. Targets bound to a shape apply only there.
"""
from __future__ import annotations

from typing import Optional

# (name, variant, ratio key, limit, (d_in, d_out, r) the target applies to or None for every case)
TARGETS = (
    ("fwd+bwd vs base, 4096x4096 r=16", "fastlora_auto", "fwd_bwd_ms_vs_base", 1.10, (4096, 4096, 16)),
    ("fwd+bwd vs base, 4096x4096 r=64", "fastlora_auto", "fwd_bwd_ms_vs_base", 1.15, (4096, 4096, 64)),
    ("fwd+bwd vs base, 4096x11008 r=16", "fastlora_auto", "fwd_bwd_ms_vs_base", 1.06, (4096, 11008, 16)),
    ("fwd+bwd vs PEFT (>= 1.3x faster)", "fastlora_auto", "fwd_bwd_ms_vs_peft", 1 / 1.3, None),
    ("fwd+bwd vs PEFT, dropout (>= 1.5x faster)", "fastlora_auto_dropout", "fwd_bwd_ms_vs_peft", 1 / 1.5, None),
    ("gate off fwd+bwd vs base", "fastlora_auto_gate_off", "fwd_bwd_ms_vs_base", 1.01, None),
    ("peak memory vs PEFT", "fastlora_auto", "fwd_bwd_peak_mib_vs_peft", 1.0, None),
    ("peak memory vs PEFT, dropout", "fastlora_auto_dropout", "fwd_bwd_peak_mib_vs_peft", 0.60, None),
)
#: auto against the fastest forced plan: within this factor (two medians of one run differ by noise)
BEST_PLAN_SLACK = 1.02


def _row(name: str, limit: float, value: Optional[float]) -> dict:
    return {"target": name, "limit": limit, "value": value, "met": None if value is None else value <= limit}


def targets(case: dict, plans: tuple[str, ...]) -> list[dict]:
    """The targets that apply to ``case`` (a ``bench_case`` result); value None when not measured."""
    shape = (case["d_in"], case["d_out"], case["r"])
    rows = [_row(name, limit, case["ratios"].get(variant, {}).get(key))
            for name, variant, key, limit, where in TARGETS if where in (None, shape)]
    results = case["results"]
    timed = [results[f"fastlora_{plan}"]["fwd_bwd_ms"] for plan in plans if f"fastlora_{plan}" in results]
    best = min(timed) if timed else None
    auto = results.get("fastlora_auto", {}).get("fwd_bwd_ms")
    value = auto / best if auto is not None and best else None
    rows.append(_row(f"auto fwd+bwd vs the fastest plan (noise slack {BEST_PLAN_SLACK})", BEST_PLAN_SLACK, value))
    return rows

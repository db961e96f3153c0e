"""What a gpu_check run decides for the defaults that wait on a GPU measurement.

    python -m benchmarks.decisions benchmarks/results/gpu_check_<gpu>.json

Each decision names the setting, the value the run supports and the rows it reads; nothing is
changed (the settings are one-line edits, committed with the JSON as their source):

- ``fastlora.kernels.plans.SIZE_RULE``: section "crossover"'s ``size_rule`` (the base-GEMM size from
  which the cublas plan beats the torch plan at every larger size), taken when the torch plan is at
  least PEFT's speed at every measured size below it (it is what those layers would run);
- ``fastlora.kernels.triton.products.DY_TWICE``: "cublas" when section "products"'s ``against_cublas``
  row "dy_pass" has the Triton kernels at least ``MARGIN`` slower than the two GEMMs at every case where
  the dy pass reads dy twice (the case's ``dy_read_twice``, from the tiles the GPU ran), else "triton";
- ``fastlora.kernels.triton.products.UNMASKED``: "cublas" when the rows "shrink" and "down_grad" (no
  dropout) have the Triton kernels at least ``MARGIN`` slower at every case, else "triton";
- the cublas plan's output order (information: no setting): section "order"'s low-rank term written
  first against added after the GEMM, by addmm against the Triton expand;
- whether a model's step waits on the host (information): section "bench_model"'s host time per step
  over its step time, per model and variant (from ``HOST_BOUND`` on, the device waited for the host
  part of the step: fewer launches and less Python per layer would pay there, fewer bytes would not);
- how far the adapters' cost is from its floor (information): per model and adapted variant, what it adds
  to the frozen model's step against the byte/FLOP floor of the adapted Linears' extra work (the cublas
  plan's for fastlora's variants, PEFT's ops for PEFT's), from section "bench_model".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from .report_text import added_over_base

#: how much slower the Triton kernels must be before a GEMM replaces them (timing noise of do_bench medians)
MARGIN = 0.05
#: host time per step over step time from which a step is reported as waiting on the host
HOST_BOUND = 0.9


def size_rule(report: dict) -> dict:
    """{"setting", "value" (torch_below or None), "why"} from section "crossover"."""
    section = report["sections"].get("crossover", {})
    rule = section.get("size_rule")
    setting = "fastlora.kernels.plans.SIZE_RULE"
    if section.get("status") != "ok" or not section.get("rows"):
        return {"setting": setting, "value": None, "why": "section crossover did not run"}
    cut = f" (sweep {section['cut']})" if section.get("cut") else ""
    if rule is None:
        return {"setting": setting, "value": None, "why": "the cublas plan beats the torch plan at every measured "
                                                          "size, or at no size consistently" + cut}
    below = [row for row in section["rows"] if row["n"] * row["d"] ** 2 < rule and "torch" in row["vs_peft"]]
    slower = [f"N={row['n']} d={row['d']} {row['vs_peft']['torch']:.2f}x" for row in below
              if row["vs_peft"]["torch"] > 1.0 + MARGIN]
    if slower:
        return {"setting": setting, "value": None,
                "why": f"torch_below = {rule} would send layers to a torch plan slower than PEFT: {', '.join(slower)}"}
    return {"setting": setting, "value": rule,
            "why": f"the cublas plan wins from {rule} multiply-adds on; below it the torch plan is at least PEFT's "
                   f"speed ({len(below)} sizes){cut}"}


def _by_gemm_everywhere(rows: list[tuple[str, float]]) -> Optional[bool]:
    """True when every (label, Triton / GEMM ratio) is at least 1 + MARGIN; None without rows."""
    return None if not rows else all(ratio >= 1.0 + MARGIN for _, ratio in rows)


def _product_decision(setting: str, rows: list[tuple[str, float]], absent: str) -> dict:
    by_gemm = _by_gemm_everywhere(rows)
    evidence = ", ".join(f"{label} {ratio:.2f}x" for label, ratio in rows)
    if by_gemm is None:
        return {"setting": setting, "value": "triton", "why": absent}
    return {"setting": setting, "value": "cublas" if by_gemm else "triton",
            "why": f"Triton / GEMM: {evidence} (cublas when every ratio >= {1 + MARGIN:.2f})"}


def skinny_products(report: dict) -> list[dict]:
    """The DY_TWICE and UNMASKED decisions from section "products"'s ``against_cublas`` rows."""
    cases = report["sections"].get("products", {}).get("cases", [])

    def label(case: dict) -> str:
        return f"N={case['n']} {case['d_in']}x{case['d_out']} r={case['r']}"

    twice = [(label(c) + " dy_pass", c["against_cublas"]["dy_pass"]["ratio"]) for c in cases if c["dy_read_twice"]]
    unmasked = [(label(c) + " " + name, c["against_cublas"][name]["ratio"]) for c in cases
                for name in ("shrink", "down_grad")]
    return [_product_decision("fastlora.kernels.triton.products.DY_TWICE", twice,
                              "no measured case where the dy pass reads dy twice"),
            _product_decision("fastlora.kernels.triton.products.UNMASKED", unmasked,
                              "section products did not run")]


def output_order(report: dict) -> list[str]:
    """Section "order"'s ratios, one line per shape and output."""
    return [f"output order, N={s['n']} {s['d_in']}x{s['d_out']} {name}: term first / after "
            f"{s[name]['first_vs_after']:.2f}x, expand / addmm {s[name]['expand_vs_addmm']:.2f}x"
            for s in report["sections"].get("order", {}).get("shapes", []) for name in ("y", "dx") if name in s]


def host_share(report: dict) -> list[str]:
    """Section "bench_model"'s host time over step time, one line per model and variant."""
    lines = []
    for model, entry in report["sections"].get("bench_model", {}).get("models", {}).items():
        for variant, row in entry.get("variants", {}).items():
            if row.get("host_vs_step") is not None:
                bound = "; waits on the host" if row["host_vs_step"] >= HOST_BOUND else ""
                lines.append(f"host share, {model} {variant}: host {row['host_ms']:.1f} ms of a "
                             f"{row['step_ms']:.1f} ms step ({row['host_vs_step']:.2f}){bound}")
    return lines


def adapter_work(report: dict) -> list[str]:
    """Section "bench_model": what each adapted variant adds to the frozen step, against its floor."""
    lines = []
    for model, entry in report["sections"].get("bench_model", {}).get("models", {}).items():
        floors = entry.get("floors_ms")
        for variant, added in (added_over_base(entry.get("variants", {})) if floors else {}).items():
            plan = "torch" if variant.startswith("peft") or "-torch" in variant else "cublas"
            floor = floors[plan] - floors["base"]
            lines.append(f"adapter work, {model} {variant}: adds {added:.2f} ms to the frozen step, "
                         f"{added / floor:.1f}x its floor ({floor:.2f} ms, {plan} plan's kernels)")
    return lines


def decide(report: dict) -> dict:
    return {"decisions": [size_rule(report), *skinny_products(report)],
            "information": output_order(report) + host_share(report) + adapter_work(report)}


def render(result: dict) -> str:
    lines = [f"{d['setting']} = {d['value']!r}: {d['why']}" for d in result["decisions"]]
    return "\n".join(lines + result["information"])


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decisions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a gpu_check JSON report")
    args = parser.parse_args(argv)
    result = decide(json.loads(args.report.read_text()))
    print(render(result))
    return result


if __name__ == "__main__":
    main()

"""The compact table the GPU check prints last: one line per section, then what failed, the
whole-model table of section bench_model, the one-pass kernels per programs per row block, then
the speed cases (medians, ratios vs base and PEFT, peak memory, launches, byte floors)."""
from __future__ import annotations

from .bench_model import render as models_table
from .report_text import cell, error_line, item_name

MAX_FAILURES = 12
MAX_WIDTH = 200  # characters of a failure line


def _failures(report: dict) -> list[str]:
    lines = []
    correctness = report["sections"].get("correctness", {})
    for item in correctness.get("items", []):
        if not item["pass"]:
            what = item_name(item)
            why = error_line(item["error"]) if "error" in item else \
                f"max error {item['max_error']:.2e} >= {item['tolerance']:.0e} ({item['errors']})"
            lines.append(f"  correctness {what}: {why}"[:MAX_WIDTH])
    for m, entry in report["sections"].get("bench_model", {}).get("models", {}).items():
        losses = entry.get("losses")
        if losses and not losses["agree"]:
            lines.append(f"  bench_model {m}: no-dropout losses differ from {losses['reference']}'s by up to "
                         f"{max(losses['max_abs_diff'].values()):.2e} (tolerance {losses['tolerance']:.2e})")
    for item in report["sections"].get("compile", {}).get("errors", []):
        lines.append(f"  compile {item_name(item)}: {error_line(item['error'])}"[:MAX_WIDTH])
    graphs = report["sections"].get("graphs", {})
    for group in ("syncs", "method_syncs", "graphs"):
        for name, row in graphs.get(group, {}).items():
            if not row["pass"]:
                why = error_line(row["error"]) if "error" in row else str(row)
                lines.append(f"  {group} {name}: {why}"[:MAX_WIDTH])
    return lines[:MAX_FAILURES] + ([f"  ... {len(lines) - MAX_FAILURES} more"] if len(lines) > MAX_FAILURES else [])


def _speed(report: dict) -> list[str]:
    """Per case and variant: medians, ratios, peak memory, launches and, for base and each plan, the
    byte/FLOP floors of forward and forward + backward with measured / floor ("x")."""
    speed = report["sections"].get("speed", {})
    peaks = speed.get("peaks")
    lines = [f"floors at {peaks['bandwidth'] / 1e12:.3g} TB/s, {peaks['flops'] / 1e12:.3g} TFLOP/s "
             f"({peaks['source']})"] if peaks and speed.get("cases") else []
    for case in speed.get("cases", []):
        lines.append(f"speed N={case['n']} {case['d_in']}->{case['d_out']} r={case['r']} {case['dtype']}"
                     f"  (auto: {case.get('auto_default', '?')} by rule; tuned: {case['auto_choices'] or 'none'})")
        lines.append(f"  {'variant':28s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'xbase':>6s} {'xpeft':>6s} "
                     f"{'peak MiB':>8s} {'launch':>6s} {'fwd floor':>9s} {'x':>5s} {'f+b floor':>9s} {'x':>5s}")
        ratios = {**case["ratios"], **{f"method {k}": v for k, v in case["method_ratios"].items()}}
        rows = {**case["results"], **{f"method {k}": v for k, v in case["methods"].items()}}
        for name, res in rows.items():
            ratio, floor = ratios.get(name, {}), case.get("floors", {}).get(name, {})
            vs_base, vs_peft = ratio.get("fwd_bwd_ms_vs_base"), ratio.get("fwd_bwd_ms_vs_peft")
            lines.append(f"  {name:28s} {res['fwd_ms']:8.3f} {res['fwd_bwd_ms']:8.3f} {cell(vs_base, '6.3f')} "
                         f"{cell(vs_peft, '6.3f')} {cell(res['fwd_bwd_peak_mib'], '8.1f')} "
                         f"{cell(res['fwd_bwd_launches'], '6d')} {cell(floor.get('fwd_floor_ms'), '9.3f')} "
                         f"{cell(floor.get('fwd_vs_floor'), '5.2f')} {cell(floor.get('fwd_bwd_floor_ms'), '9.3f')} "
                         f"{cell(floor.get('fwd_bwd_vs_floor'), '5.2f')}")
        lines += [f"  {name:28s} failed: {error_line(tb)[:100]}" for name, tb in case["errors"].items()]
        lines += [f"  target {t['target']}: {cell(t['value'], '.3f')} vs limit {t['limit']:.3f} "
                  f"{'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'}"
                  for t in case.get("targets", [])]
    return lines


def _onepass_groups(report: dict) -> list[str]:
    """Section gemm's one-pass forward and input-gradient medians per programs-per-row-block count, one
    line per kernel and shape."""
    return [f"onepass {kind} ms by programs per row block, N={shape['n']} {shape['d_in']}->{shape['d_out']}: "
            + "  ".join(f"{label} {ms:.3f}" for label, ms in shape[f"onepass_groups_{kind}_ms"].items())
            for shape in report["sections"].get("gemm", {}).get("shapes", []) for kind in ("fwd", "bwd")
            if f"onepass_groups_{kind}_ms" in shape]


def _output_orders(report: dict) -> list[str]:
    """Section order's timing of the cublas plan's output order (``check_kernels.output_order``), one line
    per output and shape."""
    return [f"output {name} ms, N={shape['n']} {shape['d_in']}->{shape['d_out']}: GEMM {row['gemm']:.3f}, "
            f"into the output {row['gemm_into']:.3f}; low-rank term after {row['term_after']:.3f}, "
            f"first {row['term_first']:.3f} ({row['first_vs_after']:.2f}x), by the expand kernel "
            f"{row['term_first_expand']:.3f} ({row['expand_vs_addmm']:.2f}x)"
            for shape in report["sections"].get("order", {}).get("shapes", []) for name in ("y", "dx")
            if name in shape for row in (shape[name],)]


def _models(report: dict) -> list[str]:
    """Section bench_model's table (benchmarks/bench_model.py: ``render``)."""
    section = report["sections"].get("bench_model", {})
    if not section.get("models"):
        return []
    return models_table(section).splitlines()


def render(report: dict) -> str:
    """The table as text."""
    lines = [f"gpu_check on {report['device']} (plans {', '.join(report['plans'])})",
             f"{'section':12s} {'status':8s} {'s':>6s}  summary"]
    for name, sec in report["sections"].items():
        note = sec.get("summary") or sec.get("reason") or (error_line(sec["traceback"]) if "traceback" in sec else "")
        lines.append(f"{name:12s} {sec['status']:8s} {cell(sec.get('seconds'), '6.1f')}  {note}"[:MAX_WIDTH])
    failures = _failures(report)
    if failures:
        lines += ["failures:", *failures]
    return "\n".join(lines + _models(report) + _output_orders(report) + _onepass_groups(report) + _speed(report))

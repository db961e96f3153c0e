"""Whole-model training steps: the frozen base, PEFT's LoRA, fastlora.accelerate over PEFT, and
fastlora.inject, on a Llama-shaped decoder and a BERT-base-shaped encoder (built from configs).

    python -m benchmarks.bench_model [--model llama|bert|all] [--device cuda|cpu] [--quick] [--out PATH]
                                     [--budget-s 120] [--first-step VARIANT,...]

Models and variants: benchmarks/model_setups.py (LoRA r=16, alpha=32, dropout 0.05; fp32 adapters
under autocast, PEFT's default, and bf16 adapters). Per variant (benchmarks/train_step.py): the
median device and host time of a step (forward under bf16 autocast, backward, fused AdamW) over
``--steps`` steps after ``--warmup``, peak memory, GPU launches of a step, its top kernels, and
the time of its first step in this run (cold only for the first variant that compiles a kernel).
Ratios: step time vs base and vs PEFT with adapters of the same precision, host time and peak
memory vs PEFT. Per model on a GPU with documented peaks (benchmarks/byte_model.py): the byte/FLOP
floor of the step's adapted Linears, frozen and with adapters on the cublas plan and with PEFT's ops,
next to what each variant measured over the frozen model. Per model: the no-dropout loss curves of
PEFT and fastlora from the same adapters (benchmarks/loss_agreement.py), and for the ``--first-step``
variants the first step in a fresh process on empty Triton and plan caches, then on the caches it
filled (benchmarks/first_step.py).

Time budget (``--budget-s``): jobs run in priority order (every variant's steps, then the loss
curves, then the first steps, then the ``LOW_PRIORITY`` variants' steps) and those that no longer
fit are listed as skipped. The JSON (benchmarks/results/bench_model_<gpu>[_quick].json, CPU:
bench_model_cpu[_quick].json) is rewritten after every job. On the CPU (one thread; ``--quick``:
2-layer models, hidden 64) the figures check the script; they are not GPU speeds.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from . import byte_model
from .bench_adapted_linear import RESULTS, device_name, pick_device, slug, version
from .first_step import first_steps
from .isolated import Child, is_cuda_fault, read_json, write_json
from .loss_agreement import loss_curves
from .model_setups import DROPOUT, LOW_PRIORITY, MODELS, VARIANTS, R, adapt, build_model, make_batch, trainable
from .report_text import added_over_base, cell, error_line
from .train_step import first_step_s, make_step, profile, release, steady

WARMUP, STEPS, CURVE_STEPS = 3, 10, 8
DEFAULT_BUDGET_S = 120.0
#: first-step variants, in priority order (each costs two fresh processes)
FIRST_STEP = ("accelerate_fp32", "inject_bf16", "peft_fp32")
QUICK_FIRST_STEP = ("accelerate_fp32",)
#: seconds that must be left to start a job of each kind, per device type
RESERVE_S = {"steady": {"cuda": 8.0, "cpu": 0.5}, "losses": {"cuda": 10.0, "cpu": 1.0},
             "first_step": {"cuda": 25.0, "cpu": 8.0}}
SECTION_MARGIN_S = 15.0  # of a gpu_check section's time, left for the child's start and its last job
CPU_NOTE = "CPU run: these figures check the script; they are not GPU speeds."


def variant_result(model_name: str, variant: str, quick: bool, device: torch.device, warmup: int, steps: int) -> dict:
    """Steady step times, memory and profile of one variant (see the module docstring)."""
    spec = MODELS[model_name]
    model = adapt(build_model(spec, quick, device), variant, spec, DROPOUT)
    step = make_step(model, make_batch(spec, model, quick, device), device)
    first = first_step_s(step, device)
    result = {"trainable_parameters": sum(p.numel() for p in trainable(model)), "first_step_in_run_s": first,
              **steady(step, device, warmup, steps), "profile": profile(step, device)}
    del model, step
    release(device)
    return result


def model_info(model_name: str, quick: bool) -> dict:
    """Parameters, batch, LoRA targets and the (d_in, d_out) of every adapted Linear inside the model's
    decoder or encoder layers, which see every token of the batch ("linear_shapes"; BERT's pooler, which
    sees one token per sequence, is left out). Built on the meta device: no memory, no init."""
    spec = MODELS[model_name]
    with torch.device("meta"):
        model = spec.build(quick, True)
    sequences, tokens = spec.quick_batch if quick else spec.batch
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "batch": {"sequences": sequences, "tokens": tokens}, "targets": list(spec.targets),
            "linear_shapes": _per_token_linears(model, spec.targets)}


def _per_token_linears(model: torch.nn.Module, targets: tuple[str, ...]) -> list[list[int]]:
    """[d_in, d_out] of each target nn.Linear inside a decoder or encoder layer (a "layers" or "layer" part
    in its qualified name): the adapted layers that see every token of the batch."""
    out = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and parts[-1] in targets and {"layers", "layer"} & set(parts):
            out.append([module.in_features, module.out_features])
    return out


def floors_ms(entry: dict, device: str) -> Optional[dict]:
    """The byte/FLOP floor of a training step's adapted Linears (benchmarks/byte_model.py: forward +
    backward, plain LoRA at the benchmark's rank, no dropout) at the documented peaks of the GPU named
    ``device``: {"peaks": its key, "base": the frozen layers' ms, "cublas" / "torch" / ...: the same layers
    with adapters}; the torch plan's kernels are PEFT's ops. None for a device without documented peaks."""
    peaks = byte_model.device_peaks(device)
    if peaks is None:
        return None
    key, bandwidth, peak = peaks
    tokens = entry["batch"]["sequences"] * entry["batch"]["tokens"]
    shapes = [byte_model.Shape(tokens, d_in, d_out, R) for d_in, d_out in entry["linear_shapes"]]
    return {"peaks": key, **byte_model.model_floors(shapes, bandwidth, peak)}


def ratios(variants: dict) -> dict:
    """variant -> step time vs base and vs PEFT with adapters of the same precision, host time and peak
    memory vs that PEFT (None where either side is missing)."""
    def ratio(a: dict, b: Optional[dict], key: str) -> Optional[float]:
        return a[key] / b[key] if b and a.get(key) is not None and b.get(key) else None

    out = {}
    for name, res in variants.items():
        if name == "base":
            continue
        peft = None if name.startswith("peft") else variants.get("peft_" + name.split("_")[1])
        out[name] = {"step_vs_base": ratio(res, variants.get("base"), "step_ms"),
                     "step_vs_peft": ratio(res, peft, "step_ms"), "host_vs_peft": ratio(res, peft, "host_ms"),
                     "peak_vs_peft": ratio(res, peft, "peak_mib")}
    return out


def jobs(models: list[str], quick: bool, device: torch.device, first_step: tuple[str, ...], warmup: int,
         steps: int) -> list[tuple[str, str, str, Callable[[float], object]]]:
    """(model, kind, variant or "", run(seconds left)) of every job, in priority order."""
    def steady_jobs(variants):
        return [(m, "steady", v, lambda left, m=m, v=v: variant_result(m, v, quick, device, warmup, steps))
                for m in models for v in variants]

    out = steady_jobs([v for v in VARIANTS if v not in LOW_PRIORITY])
    out += [(m, "losses", "", lambda left, m=m: loss_curves(MODELS[m], quick, device, CURVE_STEPS)) for m in models]
    out += [(m, "first_step", v, lambda left, m=m, v=v: first_steps(m, v, device.type, quick, left))
            for v in first_step for m in models]
    return out + steady_jobs(LOW_PRIORITY)


def run(models: list[str], quick: bool, device: torch.device, budget_s: float, first_step: tuple[str, ...],
        report: dict, save: Callable[[], None], warmup: int = WARMUP, steps: int = STEPS) -> dict:
    """Every job while the budget lasts, into ``report["models"]`` (saved after each job)."""
    deadline = time.monotonic() + budget_s
    for m in models:
        entry = report["models"][m] = {**model_info(m, quick), "variants": {}, "ratios": {}, "losses": None,
                                       "first_step": {}, "errors": {}, "skipped": [], "job_seconds": {}}
        entry["floors_ms"] = floors_ms(entry, report["device"])
    fault = None
    for m, kind, variant, job in jobs(models, quick, device, first_step, warmup, steps):
        entry, name = report["models"][m], f"{kind} {variant}".strip()
        left = deadline - time.monotonic()
        in_process = kind != "first_step"
        if left < RESERVE_S[kind][device.type] or (fault and in_process):
            reason = f"the CUDA context faulted in {fault}" if fault and in_process else \
                f"time budget ({left:.0f} s left)"
            entry["skipped"].append({"job": name, "reason": reason})
            continue
        print(f"{m}: {name}", flush=True)
        start = time.monotonic()
        try:
            result = job(left)
        except Exception:  # noqa: BLE001 - one failing job must not stop the others
            entry["errors"][name] = traceback.format_exc(limit=-12)
            print(f"  failed: {error_line(entry['errors'][name])}", flush=True)
            fault = fault or (f"{m} {name}" if is_cuda_fault(entry["errors"][name]) else None)
        else:
            if kind == "steady":
                entry["variants"][variant] = result
                entry["ratios"] = ratios(entry["variants"])
            elif kind == "losses":
                entry["losses"] = result
            else:
                entry["first_step"][variant] = result
        entry["job_seconds"][name] = time.monotonic() - start
        save()
    return report


def render(report: dict) -> str:
    """The tables printed at the end: per model, each variant's figures, the loss agreement, first steps."""
    lines = [f"bench_model on {report['device']}" + (f"  ({CPU_NOTE})" if report["device"].startswith("cpu") else "")]
    for m, entry in report["models"].items():
        lines.append(f"{m}: {entry['class']}, {entry['parameters'] / 1e6:.1f}M parameters, batch "
                     f"{entry['batch']['sequences']} x {entry['batch']['tokens']}")
        lines.append(f"  {'variant':21s} {'step ms':>9s} {'host ms':>9s} {'xbase':>6s} {'xpeft':>6s} "
                     f"{'host xpeft':>10s} {'peak MiB':>9s} {'launches':>8s} {'1st step s':>10s}")
        for name, res in entry["variants"].items():
            r = entry["ratios"].get(name, {})
            lines.append(f"  {name:21s} {res['step_ms']:9.2f} {res['host_ms']:9.2f} "
                         f"{cell(r.get('step_vs_base'), '6.2f')} {cell(r.get('step_vs_peft'), '6.2f')} "
                         f"{cell(r.get('host_vs_peft'), '10.2f')} "
                         f"{cell(res['peak_mib'], '9.0f')} {cell(res['profile']['launches'], '8d')} "
                         f"{res['first_step_in_run_s']:10.2f}")
        if entry.get("floors_ms"):
            lines.append(floor_line(entry))
        losses = entry["losses"]
        if losses:
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in losses["max_abs_diff"].items())
            lines.append(f"  no-dropout losses vs {losses['reference']} over {losses['steps']} steps: max |diff| "
                         f"{diffs} (tolerance {losses['tolerance']:.2e}; loss fell {losses['loss_drop']:.3f}): "
                         f"{'agree' if losses['agree'] else 'DISAGREE'}")
        for name, runs in entry["first_step"].items():
            cells = [f"{run} " + (f"{r['first_step_s']:.2f} s (then {r['second_step_s']:.3f} s)" if "first_step_s" in r
                                  else "failed") for run, r in runs.items()]
            lines.append(f"  first step {name}: " + "; ".join(cells))
        lines += [f"  {name} failed: {error_line(tb)[:120]}" for name, tb in entry["errors"].items()]
        lines += [f"  skipped {s['job']}: {s['reason']}" for s in entry["skipped"]]
    return "\n".join(lines)


def floor_line(entry: dict) -> str:
    """The adapted Linears' floor per step next to what each adapted variant measured over the frozen model."""
    floors, variants = entry["floors_ms"], entry["variants"]
    line = (f"  adapted Linears' floor per step at {floors['peaks']}'s documented peaks (fwd + bwd, no dropout): "
            f"frozen {floors['base']:.2f} ms; adapters add {floors['cublas'] - floors['base']:.2f} ms on the cublas "
            f"plan, {floors['torch'] - floors['base']:.2f} ms with PEFT's ops")
    measured = ", ".join(f"{name} {added:.2f}" for name, added in added_over_base(variants).items())
    return line + (f"; measured over the frozen model's step (ms): {measured}" if measured else "")


def outcome(report: dict) -> tuple[str, str]:
    """(status, summary) of a report as a gpu_check section: "fail" when PEFT's and fastlora's
    no-dropout losses disagree for a model, "pass" when they agree for every model, else "ok"."""
    parts, agree = [], []
    for m, entry in report.get("models", {}).items():
        vs_peft = [f"{name} x{r['step_vs_peft']:.2f}" for name, r in entry["ratios"].items() if r.get("step_vs_peft")]
        losses = entry["losses"]
        agree.append(None if losses is None else losses["agree"])
        verdict = "losses not compared" if losses is None else "losses agree" if losses["agree"] else \
            "LOSSES DISAGREE"
        parts.append(f"{m}: {len(entry['variants'])} variants ({', '.join(vs_peft) or 'no ratio'} PEFT's step), "
                     f"{verdict}")
    status = "fail" if False in agree else "pass" if agree and None not in agree else "ok"
    return status, "; ".join(parts) or "no model measured"


def section(ctx) -> dict:
    """gpu_check section "bench_model": this benchmark in a child process (a fault stays there) within
    the section's time (``--quick``: no first-step processes); its report, status and summary."""
    with tempfile.TemporaryDirectory(prefix="fastlora_bench_model_") as tmp:
        out = Path(tmp) / "bench_model.json"
        args = ["--device", ctx.device.type, "--budget-s", f"{max(ctx.left() - SECTION_MARGIN_S, 0.0):.0f}",
                "--out", str(out)] + (["--quick", "--first-step", "none"] if ctx.quick else [])
        child = Child("benchmarks.bench_model", args, out)
        while child.running() and ctx.left() > 0:
            time.sleep(1.0)
            partial = read_json(out)
            if partial:
                ctx.partial(partial)
        child.kill()
        report = child.report()
    result = report["result"]
    if result is None:
        return {"status": "error", "traceback": f"exit status {report['returncode']}: {report['output']}"}
    status, summary = outcome(result)
    if report["timed_out"]:
        summary += "; stopped at the section's deadline"
    elif report["returncode"] != 0:
        status, summary = "error", f"{summary}; exit status {report['returncode']}: {report['output'][-300:]}"
    return {**result, "status": status, "summary": summary, "process_s": report["seconds"]}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="2-layer models, hidden 64 (a check of the script)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/bench_model_<device>[_quick].json)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget (s)")
    parser.add_argument("--first-step", default=None,
                        help=f"comma-separated variants timed in fresh processes (default {','.join(FIRST_STEP)}; "
                             f"with --quick {','.join(QUICK_FIRST_STEP)}; 'none' for none)")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: a thread pool adds only wake-ups (and noise on a shared machine)
    if args.first_step is None:
        first_step = QUICK_FIRST_STEP if args.quick else FIRST_STEP
    else:
        first_step = () if args.first_step == "none" else tuple(args.first_step.split(","))
    if set(first_step) - set(VARIANTS) or args.steps < 1 or args.warmup < 0:
        parser.error(f"--first-step takes variants of {list(VARIANTS)}; --steps >= 1, --warmup >= 0")
    models = list(MODELS) if args.model == "all" else [args.model]
    name = device_name(device)
    out = args.out or RESULTS / (f"bench_model_{slug(name) if device.type == 'cuda' else 'cpu'}"
                                 f"{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": name, "torch": torch.__version__, "triton": version("triton"), "peft": version("peft"),
              "transformers": version("transformers"), "quick": args.quick, "warmup": args.warmup,
              "steps": args.steps, "budget_s": args.budget_s, "dropout": DROPOUT, "variants": list(VARIANTS),
              "first_step_variants": list(first_step), "models": {}}
    if device.type == "cpu":
        report["note"] = CPU_NOTE
    start = time.monotonic()
    run(models, args.quick, device, args.budget_s, first_step, report, lambda: write_json(out, report),
        args.warmup, args.steps)
    report["seconds"] = time.monotonic() - start
    write_json(out, report)
    print(render(report))
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()

"""Which feature makes the one-pass plan fault at the odd shape: every on/off combination of its
features, each in a process of its own.

    python -m benchmarks.onepass_bisect [--device cuda|cpu] [--budget-s 300] [--jobs N] [--out PATH]
                                        [--combos all,none,middle+dropout,...] [--no-sanitizer]

The case: ``adapted_linear(..., backend="onepass")`` forward and backward (gradients of x and A
always) at the correctness section's odd shape, n=1000, d_in=520, d_out=700, r=12 in bf16 (where
its one-pass item hit an illegal memory access), with a bias, and each combination of ``FLAGS``:
a middle factor, rank weights, dropout (0.1, fixed seed), dB (lora_b requires grad) and dbias
(the bias requires grad): 32 combinations, all on first, then by the number of features on
(``--combos``: only those named, features joined by "+", "all" or "none").

Each runs in ``python -m benchmarks.onepass_bisect --combo a+b+...`` with ``CUDA_LAUNCH_BLOCKING=1``
and ``TRITON_PRINT_AUTOTUNING=1``, ``--jobs`` at a time (each compiles its own kernels into the
shared Triton cache), and compares the output and every gradient with float64
(benchmarks/check_correctness.py: ``compare``). Status: pass; fail (ran, error above tolerance);
fault (a CUDA fault, or the process died by a signal); error (another exception); timeout;
skipped (time budget). Non-passing ones keep the last lines of their output (the traceback) and
the last autotuner configuration the child started to time (a fault during autotuning hits in
that one).

Then the first faulting combination with the fewest features runs once more under
``compute-sanitizer --tool memcheck`` (when it is on the PATH or in CUDA's bin folder), with
PyTorch's caching allocator off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: memcheck cannot see an
access that stays inside a cached block); the first ``SANITIZER_LINES`` lines of its output are
kept. JSON: benchmarks/results/onepass_bisect_<gpu>.json, rewritten as results come in.

On the CPU (a check of this script): the Triton interpreter (``TRITON_INTERPRET=1`` in the
children), float32 and the quick odd shape (37 x 29 -> 23, r=3).
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

FLAGS = ("middle", "rank_weights", "dropout", "db", "dbias")
SHAPE = (1000, 520, 700, 12)
QUICK_SHAPE = (37, 29, 23, 3)
SANITIZER_LINES = 60
COMBO_TIMEOUT_S = {"cuda": 300.0, "cpu": 120.0}
START_RESERVE_S = {"cuda": 20.0, "cpu": 3.0}  # time that must be left to start a combination
SANITIZER_TIMEOUT_S = 240.0
POLL_S = 0.5
STATUSES = ("pass", "fail", "fault", "error", "timeout", "skipped")


def combos() -> list[tuple[str, ...]]:
    """Every subset of FLAGS: all of them first, then by size (the smallest faulting one names the cause)."""
    subsets = [c for k in range(len(FLAGS) + 1) for c in itertools.combinations(FLAGS, k)]
    return [FLAGS] + [c for c in subsets if c != FLAGS]


def combo_name(combo: tuple[str, ...]) -> str:
    return "+".join(combo) or "none"


def parse_combo(name: str) -> tuple[str, ...]:
    """The flags of a combination's name ("all", "none" or flags joined by "+"), in FLAGS order."""
    flags = FLAGS if name == "all" else () if name == "none" else tuple(name.split("+"))
    unknown = set(flags) - set(FLAGS)
    if unknown:
        raise ValueError(f"unknown flags {sorted(unknown)}: a combination joins flags of {list(FLAGS)} by '+'")
    return tuple(f for f in FLAGS if f in flags)


# ----- one combination (the child) -----

def run_combo(combo: tuple[str, ...], device_name: str) -> dict:
    """Forward and backward of the one-pass plan with ``combo`` on; the float64 comparison."""
    import torch

    from .check_correctness import TOLERANCE, case_inputs, compare

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPE if device.type == "cuda" else QUICK_SHAPE
    features = {"bias", *(f for f in combo if f in ("middle", "rank_weights", "dropout"))}
    tensors, kw = case_inputs(features, shape, dtype, device)
    tensors["lora_b"].requires_grad_("db" in combo)
    tensors["bias"].requires_grad_("dbias" in combo)
    dy = torch.randn(shape[0], shape[2], device=device).to(dtype)
    result = compare(tensors, kw, dy, "onepass", TOLERANCE[dtype])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), **result}


def child_main(combo: tuple[str, ...], device: str, out: Path) -> int:
    from .isolated import is_cuda_fault, write_json

    start = time.monotonic()
    report = {"combo": list(combo)}
    try:
        report.update(run_combo(combo, device))
        report["status"] = "pass" if report["pass"] else "fail"
    except Exception:  # noqa: BLE001 - the finding of this script
        error = traceback.format_exc(limit=-12)
        report.update({"status": "fault" if is_cuda_fault(error) else "error", "error": error})
    report["seconds"] = time.monotonic() - start
    write_json(out, report)
    return 0


# ----- the bisection (the parent) -----

def classify(child: dict, output: str = "") -> dict:
    """A finished child's row: its own report, or a fault / timeout / error it could not write; when it
    did not pass, the last lines of its output and, from all of it (``output``), the last autotuner
    configuration it started to time ("Autotuning kernel ... with config ...": the one running when a
    fault hit during autotuning)."""
    result = child["result"]
    if child["timed_out"]:
        row = {"status": "timeout"}
    elif result is None or "status" not in result:
        code = child["returncode"]
        died = code is not None and code < 0
        why = f"killed by {signal.Signals(-code).name}" if died else f"exit status {code}, no report"
        row = {"status": "fault" if died else "error", "error": why}
    else:
        row = dict(result)
    if row["status"] != "pass":
        row["output"] = child["output"]
        tuned = [line for line in output.splitlines() if line.startswith("Autotuning kernel")]
        if tuned:
            row["last_autotuned"] = tuned[-1]
    return row


def sanitizer_path() -> Optional[str]:
    """compute-sanitizer on the PATH, else in CUDA's bin folder; None when neither has it."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = Path(home or "") / "bin" / "compute-sanitizer"
        if home and candidate.is_file():
            return str(candidate)
    return None


def _child_env(device: str) -> dict:
    if device == "cuda":
        return {"CUDA_LAUNCH_BLOCKING": "1", "TRITON_PRINT_AUTOTUNING": "1"}
    return {"TRITON_INTERPRET": "1"}


def bisect(device: str, budget_s: float, jobs: int, folder: Path, selected: list[tuple[str, ...]],
           on_change=lambda rows: None) -> dict:
    """combo name -> row (see ``classify``) of each of ``selected``, ``jobs`` children at a time."""
    from .isolated import Child

    deadline = time.monotonic() + budget_s
    pending = list(selected)
    rows = {combo_name(c): {"status": "skipped", "reason": "not started"} for c in pending}
    running: dict[str, Child] = {}
    stopped = set()  # stopped at the deadline: not a finding about the combination
    while pending or running:
        for name, child in list(running.items()):
            if not child.running():
                rows[name] = {"status": "skipped", "reason": "time budget (stopped while running)"} \
                    if name in stopped else classify(child.report(), child.output())
                del running[name]
                on_change(rows)
            elif time.monotonic() > deadline:
                stopped.add(name)
                child.kill()
            elif time.monotonic() - child.start > COMBO_TIMEOUT_S[device]:
                child.kill()
        left = deadline - time.monotonic()
        while pending and len(running) < jobs and left >= START_RESERVE_S[device]:
            combo = pending.pop(0)
            name = combo_name(combo)
            rows[name] = {"status": "running"}
            running[name] = Child("benchmarks.onepass_bisect", ["--combo", name, "--device", device,
                                                                "--out", str(folder / f"{name}.json")],
                                  folder / f"{name}.json", _child_env(device))
        if pending and left < START_RESERVE_S[device]:
            for combo in pending:
                rows[combo_name(combo)] = {"status": "skipped", "reason": f"time budget ({left:.0f} s left)"}
            pending = []
        time.sleep(POLL_S)
    return rows


def first_fault(rows: dict) -> Optional[str]:
    """The faulting combination with the fewest features (the first in ``combos`` order among equals)."""
    faults = [name for name, row in rows.items() if row["status"] == "fault"]
    return min(faults, key=lambda name: (len(parse_combo(name)), list(rows).index(name)), default=None)


def sanitize(name: str, device: str, timeout_s: float, folder: Path) -> dict:
    """The combination ``name`` once more under compute-sanitizer memcheck: the head of its output."""
    from .isolated import Child

    tool = sanitizer_path()
    if tool is None:
        return {"combo": name, "ran": False, "reason": "compute-sanitizer is not on the PATH nor in CUDA's bin"}
    out = folder / "sanitizer.json"
    env = {**_child_env(device), "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    child = Child("benchmarks.onepass_bisect", ["--combo", name, "--device", device, "--out", str(out)], out, env,
                  prefix=(tool, "--tool", "memcheck"))
    child.wait(timeout_s)
    lines = child.output().splitlines()
    return {"combo": name, "ran": True, "returncode": child.proc.returncode, "timed_out": child.timed_out,
            "seconds": child.report()["seconds"], "output_head": lines[:SANITIZER_LINES], "output_lines": len(lines)}


def summary(rows: dict, sanitizer: Optional[dict]) -> str:
    counts = {s: sum(row["status"] == s for row in rows.values()) for s in STATUSES}
    text = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    first = first_fault(rows)
    text += f"; smallest faulting combination: {first}" if first else "; no fault"
    if sanitizer and sanitizer.get("ran"):
        text += f"; memcheck ran ({sanitizer['output_lines']} lines of output)"
    return text


def run(device: str, budget_s: float, jobs: int, use_sanitizer: bool, report: dict, save,
        selected: Optional[list[tuple[str, ...]]] = None) -> dict:
    """The bisection of ``selected`` (default: every combination), then memcheck of the first fault,
    into ``report`` (saved as results come in)."""
    deadline = time.monotonic() + budget_s
    with tempfile.TemporaryDirectory(prefix="fastlora_onepass_bisect_") as tmp:
        def on_change(rows):
            report["combos"] = rows
            save()

        rows = bisect(device, budget_s, jobs, Path(tmp), selected or combos(), on_change)
        report["combos"] = rows
        first = first_fault(rows)
        left = deadline - time.monotonic()
        if not use_sanitizer or first is None or device != "cuda":
            why = "off" if not use_sanitizer else "no faulting combination" if first is None else "CUDA only"
            report["sanitizer"] = {"ran": False, "reason": why}
        elif left < START_RESERVE_S[device]:
            report["sanitizer"] = {"combo": first, "ran": False, "reason": f"time budget ({left:.0f} s left)"}
        else:
            report["sanitizer"] = sanitize(first, device, min(left, SANITIZER_TIMEOUT_S), Path(tmp))
    report["summary"] = summary(rows, report["sanitizer"])
    save()
    return report


def section(ctx) -> dict:
    """gpu_check section "onepass_bisect" (not in the default run): the bisection in the section's time."""
    report = {"shape": list(SHAPE if ctx.device.type == "cuda" else QUICK_SHAPE), "flags": list(FLAGS)}
    return run(ctx.device.type, ctx.left(), os.cpu_count() or 1, True, report, lambda: ctx.partial(report))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onepass_bisect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--combos", default=None, help=f"comma-separated combinations to run (flags of {list(FLAGS)} "
                                                       "joined by '+', 'all' or 'none'; default: every one)")
    parser.add_argument("--combo", default=None, help="run this one combination in this process and write its --out")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="combinations at a time")
    parser.add_argument("--no-sanitizer", action="store_true", help="skip the compute-sanitizer run")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/onepass_bisect_<device>.json)")
    args = parser.parse_args(argv)
    import torch

    from .bench_adapted_linear import RESULTS, device_name, pick_device, slug
    from .isolated import write_json
    from .report_text import error_line

    device = pick_device(args.device)
    try:
        selected = [parse_combo(name) for name in args.combos.split(",")] if args.combos else None
        combo = parse_combo(args.combo) if args.combo is not None else None
    except ValueError as error:
        parser.error(str(error))
    if combo is not None:
        if args.out is None:
            parser.error("--combo needs --out")
        return child_main(combo, device.type, args.out)
    name = device_name(device)
    out = args.out or RESULTS / f"onepass_bisect_{slug(name) if device.type == 'cuda' else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = SHAPE if device.type == "cuda" else QUICK_SHAPE
    report = {"device": name, "torch": torch.__version__, "shape": list(shape), "flags": list(FLAGS)}
    run(device.type, args.budget_s, max(args.jobs, 1), not args.no_sanitizer, report, lambda: write_json(out, report),
        selected)
    print(f"{name}: {report['summary']}")
    for combo, row in report["combos"].items():
        print(f"  {combo:40s} {row['status']}" + (f"  {error_line(row['error'])[:100]}"
                                                  if row.get("error") else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One short GPU run that answers the performance questions of fastlora, in sections.

    python benchmarks/gpu_check.py [--out PATH] [--budget-s 450] [--only a,b] [--device cpu --quick]

Sections, in this order (each isolated: a failing one records its traceback and the others
still run; the JSON report is rewritten to --out after every item):

1. env: versions (python, torch, triton, peft, CUDA, driver), the device, copy bandwidth,
   cuBLAS bf16 TFLOP/s (benchmarks/check_env.py);
2. bench_model: the whole-model training step of base, PEFT, fastlora.accelerate and
   fastlora.inject on a Llama-shaped and a BERT-shaped model, with the no-dropout loss
   agreement and first steps on cold and warm caches, then accelerate on the torch plan
   (benchmarks/bench_model.py, in a child process; ``--quick``: no first-step processes);
3. host: the host time per adapted layer of a forward + backward through a stack of 8 layers at a
   size where the device work is negligible, PEFT's against fastlora's on the cublas and the torch
   plan, launches included (benchmarks/bench_host.py --stack 8, a child process per plan);
   crossover: one layer's training calls back to back over widths 256-4096 and 512-8192 tokens,
   PEFT against the cublas and the torch plan: from which size the cublas plan pays for its host
   path, the number ``fastlora.kernels.plans.SIZE_RULE`` takes (benchmarks/bench_crossover.py, in a
   child process);
   order: the cublas plan's output order at the benchmark shapes: the GEMM with beta 0 and 1, the
   low-rank term added after the GEMM or written first for the GEMM to accumulate into, by addmm or
   by the Triton expand (benchmarks/check_kernels.py);
4. compile: the speed section's and then the correctness items' Triton kernels compiled by one
   process per CPU core into Triton's cache, every autotuner configuration, with registers and
   spills (benchmarks/compile_check.py): the sections after it load instead of compiling one
   configuration after another (a cold run otherwise spends minutes compiling);
   products: each skinny product (shrink, dy pass, dA; without and with dropout) timed by its Triton
   kernel and by torch's GEMM on the same operands at the skinny cases, the input of
   benchmarks/decisions.py for ``fastlora.kernels.triton.products`` (benchmarks/check_kernels.py);
5. speed: forward and forward + backward medians, peak memory and launches of base, every
   checked plan (``check_plans``: on CUDA the plans auto runs, unless --plans names others),
   auto, PEFT and every method on one Linear (benchmarks/bench_adapted_linear.py), and next
   to base and each plan its byte/FLOP floor and measured / floor (benchmarks/byte_model.py;
   documented peaks of an H100/H200, else those section env measured);
6. correctness: every checked plan and every method, bf16 and fp16 (fp32 with TF32 off), output and every
   gradient against float64, each plan in a child process of its own: a kernel fault costs
   one item, not the run (benchmarks/correctness_section.py);
7. graphs: host syncs under ``torch.cuda.set_sync_debug_mode("error")`` and CUDA-graph capture
   and replay with dropout (benchmarks/check_graphs.py);
8. gemm: the fused Triton GEMM vs cuBLAS, and the persistent one-pass forward and input
   gradient for several programs per row block; 9. skinny: GB/s of the skinny kernels vs the
   copy ceiling; 10. trace: the top kernels of one step (benchmarks/check_kernels.py);
11. onepass_bisect, only when named in ``--only``: each feature combination of the one-pass
   input gradient at the odd shape in its own process, then compute-sanitizer on the first
   that faults (benchmarks/onepass_bisect.py).

Time budget (--budget-s, counted from start): a section gets at most its share of the
budget (the rest rolls over) and skips, with the reason, the items that no longer fit. Shares
(``SECTIONS``; of the default 450 s): env 4% (18 s), bench_model 30% (135 s), host 8%, crossover 8%,
order 2%, compile 25%, products 3%, speed 25%, correctness 30%, graphs 8%, gemm 5%, skinny 4%, trace 3%;
they add up to more than the whole, so the earlier sections come first and the later ones get what is left.
Sections run in this process share its CUDA context: after one of them reports a CUDA fault
(an illegal memory access leaves the context unusable), the others are skipped with that
reason; bench_model, host, crossover, correctness and onepass_bisect run in child processes and still run.
The exit status is 1 when a check section (bench_model's loss agreement, correctness, graphs)
fails or errors, 2 when the run was stopped (SIGTERM or Ctrl-C: the report and table still
cover what finished), else 0. ``--device cpu --quick`` runs what a CPU can (torch plan, tiny
shapes and models; every plan under TRITON_INTERPRET=1) so the script itself is tested
without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

START = time.monotonic()  # a run as a script counts its budget from here (the imports included)
ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script path: import from the repository root, not benchmarks/
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from benchmarks import (  # noqa: E402
    bench_crossover,
    bench_host,
    bench_model,
    check_env,
    check_graphs,
    check_kernels,
    check_report,
    check_speed,
    compile_check,
    correctness_section,
    onepass_bisect,
)
from benchmarks.bench_adapted_linear import RESULTS, device_name, pick_device, slug  # noqa: E402
from benchmarks.isolated import is_cuda_fault, kill_live_children, write_text  # noqa: E402
from fastlora.kernels import PLANS  # noqa: E402
from fastlora.kernels.eligibility import triton_interpreter_on  # noqa: E402
from fastlora.kernels.plans import AUTO_CANDIDATES  # noqa: E402


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[["Context"], dict]
    share: float  # of the budget, at most
    check: bool  # a pass/fail section: its failure fails the run
    needs_cuda: bool
    isolated: bool  # runs its device work in child processes (unharmed by a fault of this one's context)
    default: bool = True  # in a run without --only


SECTIONS = (
    Section("env", check_env.run, 0.04, False, False, False),
    Section("bench_model", bench_model.section, 0.3, True, False, True),
    Section("host", bench_host.section, 0.08, False, False, True),
    Section("crossover", bench_crossover.section, 0.08, False, False, True),
    Section("order", check_kernels.order, 0.02, False, True, False),
    Section("compile", compile_check.section, 0.25, False, True, False),
    Section("products", check_kernels.products, 0.03, False, True, False),
    Section("speed", check_speed.run, 0.25, False, False, False),
    Section("correctness", correctness_section.run, 0.3, True, False, True),
    Section("graphs", check_graphs.run, 0.08, True, True, False),
    Section("gemm", check_kernels.gemm_vs_cublas, 0.05, False, True, False),
    Section("skinny", check_kernels.skinny_bandwidth, 0.04, False, True, False),
    Section("trace", check_kernels.trace, 0.03, False, False, False),
    Section("onepass_bisect", onepass_bisect.section, 1.0, False, True, True, default=False),
)
MIN_SECTION_S = 5.0
DEFAULT_BUDGET_S = 450.0
CHECKS = {s.name for s in SECTIONS if s.check}


@dataclass
class Context:
    """What a section sees: the device, the plans to check, its own deadline, the report so far."""
    device: torch.device
    quick: bool
    plans: tuple[str, ...]
    deadline: float
    report: dict
    save: Callable[[], None]
    name: str = ""
    fault: Optional[str] = None  # the section in this process that reported a CUDA fault
    start: float = field(default_factory=time.monotonic)  # when the run began (its budget counts from it)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def has(self, seconds: float) -> bool:
        return self.left() >= seconds

    def partial(self, result: dict) -> None:
        """Record the section's result so far (rewritten to the report file)."""
        self.report["sections"][self.name] = {**result, "status": "running"}
        self.save()


def check_plans(device: torch.device) -> tuple[str, ...]:
    """Plans to check by default. On CUDA the plans ``auto`` runs (``plans.AUTO_CANDIDATES``: the
    default path first): a GPU window is short, and compiling, timing and checking the opt-in triton
    and onepass plans (hundreds of autotuner configurations) would leave the default path's sections
    without time; ``--plans`` adds them. Under the Triton interpreter every plan (a check of the
    script), else the torch plan."""
    if device.type == "cuda":
        return AUTO_CANDIDATES
    return PLANS if triton_interpreter_on() else ("torch",)


def run_section(section: Section, ctx: Context, budget_end: float) -> dict:
    """The section's result with "status" (pass/fail/ok/error/skipped) and "seconds"."""
    start = time.monotonic()
    left = budget_end - start
    if section.needs_cuda and ctx.device.type != "cuda":
        return {"status": "skipped", "reason": "needs a CUDA device"}
    if ctx.fault and not section.isolated:
        return {"status": "skipped", "reason": f"the CUDA context of this process faulted in section {ctx.fault}"}
    if left < MIN_SECTION_S:
        return {"status": "skipped", "reason": f"time budget ({left:.0f} s left)"}
    ctx.name, ctx.deadline = section.name, start + min(left, section.share * (budget_end - ctx.start))
    try:
        result = section.run(ctx)
        result.setdefault("status", "ok")
    except Exception:  # noqa: BLE001 - one failing section must not stop the others
        result = {"status": "error", "traceback": traceback.format_exc()}
    result["seconds"] = time.monotonic() - start
    if ctx.device.type == "cuda" and not section.isolated and is_cuda_fault(json.dumps(result, default=str)):
        ctx.fault = section.name
    return result


def main(argv: Optional[list[str]] = None, start: Optional[float] = None) -> int:
    """The run (see the module docstring); its budget counts from ``start`` (time.monotonic(); default now)."""
    start = time.monotonic() if start is None else start
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a check of the script itself)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report (default benchmarks/results/gpu_check_<device>[_quick].json)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget from start (s)")
    optional = [s.name for s in SECTIONS if not s.default]
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {[s.name for s in SECTIONS]} "
                                                     f"(default: all but {optional})")
    parser.add_argument("--plans", default=None, help=f"comma-separated plans of {list(PLANS)} to check (default: "
                                                      f"{list(AUTO_CANDIDATES)} on CUDA, see ``check_plans``)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    only = set(args.only.split(",")) if args.only else {s.name for s in SECTIONS if s.default}
    unknown = only - {s.name for s in SECTIONS}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    plans = tuple(args.plans.split(",")) if args.plans else check_plans(device)
    if set(plans) - set(PLANS):
        parser.error(f"unknown plans {sorted(set(plans) - set(PLANS))}")
    name = device_name(device)
    out = args.out or RESULTS / f"gpu_check_{slug(name) if device.type == 'cuda' else 'cpu'}" \
                                f"{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": name, "quick": args.quick, "budget_s": args.budget_s, "plans": list(plans),
              "sections": {}}

    def save() -> None:  # file paths in tracebacks relative to the repository / site-packages
        text = json.dumps(report, indent=2, default=str) + "\n"
        for prefix in (str(ROOT) + os.sep, sysconfig.get_paths()["purelib"] + os.sep):
            text = text.replace(json.dumps(prefix)[1:-1], "")
        write_text(out, text)  # atomic: a kill mid-write keeps the previous report

    budget_end = start + args.budget_s
    ctx = Context(device, args.quick, plans, budget_end, report, save, start=start)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        for section in SECTIONS:
            if section.name not in only:
                continue
            print(f"== {section.name} ({budget_end - time.monotonic():.0f} s of budget left)", flush=True)
            report["sections"][section.name] = run_section(section, ctx, budget_end)
            save()
    except (Terminated, KeyboardInterrupt) as stop:  # keep what finished: the running section stays "running"
        report["terminated"] = f"{type(stop).__name__} {stop} in section {ctx.name}"
        kill_live_children()  # and what they started: nothing outlives the run on the GPU
    failed = [name for name, sec in report["sections"].items()
              if name in CHECKS and sec["status"] in ("fail", "error")]
    report["failed_checks"] = failed
    report["seconds"] = time.monotonic() - start
    save()
    print(check_report.render(report))
    print(f"wrote {out} ({report['seconds']:.0f} s); failed checks: {failed or 'none'}"
          + (f"; {report['terminated']}" if "terminated" in report else ""))
    return 1 if failed else 2 if "terminated" in report else 0


class Terminated(BaseException):
    """SIGTERM (e.g. a time limit) stops the run; the report and table are still written."""


def _terminate(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main(start=START))

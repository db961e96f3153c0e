"""GPU check, section "correctness", with every plan in a child process of its own.

Each plan's items (benchmarks/check_correctness.py; plan "auto" holds the layer items) run in
``python -m benchmarks.check_correctness --plan P`` (on CUDA with ``CUDA_LAUNCH_BLOCKING=1``, so
that a kernel fault is raised by the item that launched it), the plans' children side by side.
A child rewrites its JSON before and after every item. A fault that leaves the child's CUDA
context unusable (an illegal memory access: every later CUDA call of that process fails), or a
child that dies, costs one item: it is recorded as failed with "fault": true and the child's
last output, and a new child goes on from the next item. Other plans are not touched: each
child has its own CUDA context. After ``MAX_FAULTS`` faults a plan's remaining items are
skipped. Children still running at the section's deadline are stopped; their unfinished item
is listed as skipped for time.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .isolated import Child, read_json

POLL_S = 0.5
PUBLISH_S = 2.0  # how often the items of running children go into the report
MAX_FAULTS = 8
STOP_MARGIN_S = 5.0  # the children's budget ends this much before the section's deadline


@dataclass
class PlanRun:
    """The progress of one plan over its children."""
    plan: str
    start: int = 0
    items: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    faults: int = 0
    runs: int = 0
    exit_statuses: list = field(default_factory=list)  # of its children (None: stopped for time)
    done: bool = False
    child: Optional[Child] = None

    def summary(self) -> dict:
        return {"runs": self.runs, "faults": self.faults, "items": len(self.items), "skipped": len(self.skipped),
                "exit_statuses": self.exit_statuses}


def _start(run: PlanRun, ctx, folder: Path) -> None:
    out = folder / f"{run.plan}_{run.runs}.json"
    args = ["--plan", run.plan, "--device", ctx.device.type, "--start", str(run.start),
            "--budget-s", f"{max(ctx.left() - STOP_MARGIN_S, 0.0):.1f}", "--out", str(out)]
    env = {"CUDA_LAUNCH_BLOCKING": "1"} if ctx.device.type == "cuda" else None
    run.child = Child("benchmarks.check_correctness", args + (["--quick"] if ctx.quick else []), out, env)
    run.runs += 1


def _collect(run: PlanRun) -> None:
    """Take the finished child's items; decide whether a new child goes on and from where."""
    report = run.child.report()
    run.child = None
    run.exit_statuses.append(report["returncode"])
    result = report["result"]
    if result is None:  # it died before its first item: not an item's fault, and a new child would too
        run.items.append({"kind": "child", "plan": run.plan, "pass": False,
                          "error": f"the child process wrote no report (exit status {report['returncode']}); "
                                   f"its last output:\n{report['output']}"})
        run.done = True
        return
    run.items += result["items"]
    run.skipped += result["skipped"]
    running = result["running"]
    if report["timed_out"] or (running is None and report["returncode"] == 0):
        if running is not None:
            run.skipped.append({**running, "reason": "time budget (stopped while running)"})
        run.done = True
        return
    if running is not None:  # it died inside this item
        run.items.append({**running, "pass": False, "fault": True,
                          "error": f"the child process died (exit status {report['returncode']}) during this "
                                   f"item; its last output:\n{report['output']}"})
        next_index = running["index"] + 1
    else:  # FAULT_EXIT (or another status) after its last item
        next_index = result["items"][-1]["index"] + 1 if result["items"] else run.start + 1
    run.faults += 1
    if run.faults >= MAX_FAULTS and next_index < result["total"]:
        run.skipped.append({"kind": "remaining", "plan": run.plan, "from_index": next_index,
                            "reason": f"{MAX_FAULTS} faults in this plan"})
    run.done = run.faults >= MAX_FAULTS or next_index >= result["total"]
    run.start = next_index


def run(ctx) -> dict:
    """Every plan's items in children (see the module docstring); pass when every item ran and passed."""
    runs = [PlanRun(plan) for plan in (*ctx.plans, "auto")]
    result = {"items": [], "skipped": [], "children": {}}
    with tempfile.TemporaryDirectory(prefix="fastlora_correctness_") as tmp:
        folder = Path(tmp)
        try:
            published = time.monotonic()
            while not all(r.done for r in runs):
                for r in runs:
                    if r.child is None and not r.done:
                        _start(r, ctx, folder)
                    elif r.child is not None and not r.child.running():
                        _collect(r)
                        if not r.done:
                            _start(r, ctx, folder)
                if time.monotonic() - published > PUBLISH_S:
                    _publish(result, runs, ctx)
                    published = time.monotonic()
                if ctx.left() < 0:
                    for r in runs:
                        if r.child is not None:
                            r.child.kill()
                            _collect(r)
                        r.done = True
                time.sleep(POLL_S)
        finally:
            for r in runs:
                if r.child is not None:
                    r.child.kill()
    _publish(result, runs, ctx)
    failed = [i for i in result["items"] if not i["pass"]]
    faults = sum(bool(i.get("fault")) for i in result["items"])
    result["status"] = "fail" if failed or not result["items"] else "pass"
    result["summary"] = (f"{len(result['items']) - len(failed)}/{len(result['items'])} items pass, "
                         f"{faults} faults, {len(result['skipped'])} skipped")
    return result


def _publish(result: dict, runs: list[PlanRun], ctx) -> None:
    """The items so far, plan by plan (those of running children too), into the report."""
    running = {r.plan: (read_json(r.child.out) or {}).get("items", []) if r.child else [] for r in runs}
    result["items"] = [item for r in runs for item in (*r.items, *running[r.plan])]
    result["skipped"] = [item for r in runs for item in r.skipped]
    result["children"] = {r.plan: r.summary() for r in runs}
    ctx.partial(result)

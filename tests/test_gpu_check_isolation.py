"""gpu_check's isolation on the CPU: a correctness item that crashes its process, or raises what a
CUDA fault raises, costs that item only (the plan's child is replaced and goes on from the next
item; the other plans' children are untouched), and after a CUDA fault in gpu_check's own process
the sections that share its context are skipped while those in child processes still run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import check_correctness, gpu_check

ROOT = Path(__file__).resolve().parent.parent
#: loaded by every Python process started with it on PYTHONPATH: the torch plan fails on the quick "odd" shape
#: (37 tokens) as FAKE_FAULT says: "crash" kills the process (as a segfault does), "cuda" raises what an
#: illegal memory access raises
SITECUSTOMIZE = '''
import os, signal
mode = os.environ.get("FAKE_FAULT")
if mode:
    import fastlora.kernels as kernels
    real = kernels.adapted_linear

    def faulty(x, *args, **kwargs):
        if x.shape[0] == 37 and kwargs.get("backend") == "torch":
            if mode == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(x, *args, **kwargs)

    kernels.adapted_linear = faulty
'''
ODD_CASES = {case for case, (shape, _) in check_correctness.CASES.items() if shape == "odd"}  # 37 tokens (quick)


def _faulty_run(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, dict]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FAKE_FAULT=mode, PYTHONPATH=str(hooks), FASTLORA_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--only", "correctness", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["crash", "cuda"])
def test_a_faulting_item_costs_only_itself(tmp_path, mode):
    proc, report = _faulty_run(tmp_path, mode)
    assert proc.returncode == 1 and report["failed_checks"] == ["correctness"], proc.stdout + proc.stderr
    section = report["sections"]["correctness"]
    torch_items = [i for i in section["items"] if i["plan"] == "torch"]
    faults = [i for i in section["items"] if i.get("fault")]
    assert {i["case"] for i in faults} == ODD_CASES and all(i["plan"] == "torch" for i in faults)
    why = "died (exit status -11)" if mode == "crash" else "illegal memory access"
    assert all(why in i["error"] for i in faults), faults
    # one child per fault plus the first; every item after a fault still ran (and passed)
    faulted = len(ODD_CASES)
    statuses = [-11 if mode == "crash" else 3] * faulted + [0]  # 3: check_correctness.FAULT_EXIT
    assert section["children"]["torch"] == {"runs": faulted + 1, "faults": faulted, "items": 22, "skipped": 0,
                                            "exit_statuses": statuses}
    assert [i["index"] for i in torch_items] == list(range(22))
    assert all(i["pass"] for i in torch_items if i not in faults)
    assert section["children"]["auto"] == {"runs": 1, "faults": 0, "items": 7, "skipped": 0,
                                           "exit_statuses": [0]}  # untouched
    assert section["summary"].endswith(f"items pass, {faulted} faults, 0 skipped")


def _ctx(report: dict) -> gpu_check.Context:
    """A context as on a GPU (no CUDA call is made: the sections below are stand-ins)."""
    return gpu_check.Context(torch.device("cuda"), False, ("torch",), float("inf"), report, lambda: None)


def test_a_cuda_fault_in_this_process_skips_the_sections_that_share_its_context():
    report = {"sections": {}}
    ctx = _ctx(report)
    end = gpu_check.START + 10**6
    faulting = gpu_check.Section("speed", lambda c: {"errors": {"x": "CUDA error: an illegal memory access"}},
                                 1.0, False, False, False)
    in_process = gpu_check.Section("trace", lambda c: {"summary": "ran"}, 1.0, False, False, False)
    isolated = gpu_check.Section("correctness", lambda c: {"status": "pass"}, 1.0, True, False, True)
    assert gpu_check.run_section(faulting, ctx, end)["status"] == "ok" and ctx.fault == "speed"
    skipped = gpu_check.run_section(in_process, ctx, end)
    assert skipped == {"status": "skipped", "reason": "the CUDA context of this process faulted in section speed"}
    assert gpu_check.run_section(isolated, ctx, end)["status"] == "pass"


def test_an_error_that_is_no_fault_skips_nothing():
    ctx = _ctx({"sections": {}})
    end = gpu_check.START + 10**6
    gpu_check.run_section(gpu_check.Section("speed", lambda c: 1 / 0, 1.0, False, False, False), ctx, end)
    assert ctx.fault is None


def test_onepass_bisect_is_not_in_the_default_run_and_needs_cuda(tmp_path):
    assert [s.name for s in gpu_check.SECTIONS if not s.default] == ["onepass_bisect"]
    out = tmp_path / "r.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "onepass_bisect", "--out", str(out)]) == 0
    section = json.loads(out.read_text())["sections"]["onepass_bisect"]
    assert section == {"status": "skipped", "reason": "needs a CUDA device"}


def test_a_child_killed_for_time_takes_the_processes_it_started_with_it(tmp_path):
    from benchmarks import isolated

    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"  # the child (a shell here) starts a process of its own
    child = isolated.Child("benchmarks.isolated", [], tmp_path / "out.json", prefix=("bash", "-c", script, "shell"))
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert child in isolated.LIVE and grandchild in isolated.descendants(child.proc.pid)
    isolated.kill_live_children()
    assert child.report()["timed_out"] and child not in isolated.LIVE
    for _ in range(100):  # SIGKILL is delivered at once; the zombie is reaped by init
        state = Path(f"/proc/{grandchild}/stat")
        if not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"process {grandchild} started by the child is still running")

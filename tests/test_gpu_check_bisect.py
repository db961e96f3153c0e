"""benchmarks/onepass_bisect.py on the CPU: the one-pass plan under the Triton interpreter (float32,
the quick odd shape), each combination in its own process; its plumbing, not a GPU fault."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import onepass_bisect as ob

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bisect.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTLORA_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.onepass_bisect", "--device", "cpu", "--jobs", "2",
                           "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text())


def test_combinations_all_first_then_by_size():
    combos = ob.combos()
    assert len(combos) == len(set(combos)) == 2 ** len(ob.FLAGS)
    assert combos[0] == ob.FLAGS and combos[1] == ()
    sizes = [len(c) for c in combos[1:]]
    assert sizes == sorted(sizes)
    assert ob.parse_combo("dbias+middle") == ("middle", "dbias") and ob.parse_combo("all") == ob.FLAGS
    with pytest.raises(ValueError, match="unknown flags"):
        ob.parse_combo("middle+bias")


def test_classify_a_child():
    ran = {"timed_out": False, "returncode": 0, "output": "", "result": {"status": "pass", "max_error": 0.001}}
    assert ob.classify(ran) == {"status": "pass", "max_error": 0.001}
    killed = {"timed_out": False, "returncode": -signal.SIGSEGV, "output": "tail", "result": None}
    assert ob.classify(killed) == {"status": "fault", "error": "killed by SIGSEGV", "output": "tail"}
    silent = {"timed_out": False, "returncode": 1, "output": "ImportError", "result": None}
    assert ob.classify(silent)["status"] == "error"
    assert ob.classify({**silent, "timed_out": True, "returncode": None})["status"] == "timeout"
    raised = {**ran, "result": {"status": "fault", "error": "CUDA error: an illegal memory access"}}
    output = "Autotuning kernel _k with config BLOCK_M: 64\nAutotuning kernel _k with config BLOCK_M: 128\nTraceback"
    row = ob.classify(raised, output)
    assert row["output"] == "" and row["last_autotuned"] == "Autotuning kernel _k with config BLOCK_M: 128"
    assert "last_autotuned" not in ob.classify(ran, output)


def test_first_fault_is_the_one_with_fewest_features():
    rows = {name: {"status": status} for name, status in
            [("middle+rank_weights+dropout+db+dbias", "fault"), ("none", "pass"), ("middle", "pass"),
             ("dropout", "fault"), ("db", "fault"), ("middle+dropout", "fault")]}
    assert ob.first_fault(rows) == "dropout"
    assert ob.first_fault({"none": {"status": "pass"}}) is None


def test_runs_the_named_combinations_in_their_own_processes(tmp_path):
    pytest.importorskip("triton")
    proc, report = _run(tmp_path, "--combos", "all,none", "--budget-s", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["shape"] == list(ob.QUICK_SHAPE) and report["flags"] == list(ob.FLAGS)
    rows = report["combos"]
    assert list(rows) == ["middle+rank_weights+dropout+db+dbias", "none"]
    assert all(row["status"] == "pass" and row["dtype"] == "float32" for row in rows.values()), rows
    assert set(rows["none"]["errors"]) == {"y", "d_x", "d_lora_a"}
    assert set(rows["middle+rank_weights+dropout+db+dbias"]["errors"]) == {
        "y", "d_x", "d_bias", "d_lora_a", "d_lora_b", "d_middle", "d_rank_weights"}
    assert report["sanitizer"] == {"ran": False, "reason": "no faulting combination"}
    assert report["summary"] == "2 pass; no fault"


def test_a_spent_budget_skips_every_combination(tmp_path):
    proc, report = _run(tmp_path, "--budget-s", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(report["combos"]) == 32 and {row["status"] for row in report["combos"].values()} == {"skipped"}
    assert report["summary"] == "32 skipped; no fault"

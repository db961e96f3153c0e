"""The adapted-Linear benchmark (benchmarks/bench_adapted_linear.py) as a CPU smoke check:
every raw variant and every method is run and reported consistently (no timing thresholds:
timing belongs to the benchmark itself)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_adapted_linear import main, peft_layer, run_jobs
from benchmarks.bench_methods import METHODS
from fastlora.kernels import PLANS, adapted_linear

ROOT = Path(__file__).resolve().parent.parent

CPU_VARIANTS = ("base", "fastlora_torch", "fastlora_auto", "fastlora_auto_gate_off", "fastlora_auto_half_masked",
                "fastlora_auto_dropout")
PEFT_VARIANTS = ("peft", "peft_dropout")
TIMES = ("fwd_ms", "fwd_bwd_ms")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench") / "x.json"
    returned = main(["--device", "cpu", "--quick", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored == returned
    return stored


def _check_ratios(ratios: dict, res: dict, base: dict, peft: dict) -> None:
    """Every ratio equals the quotient of the stored medians; peak ratios are null on CPU."""
    for k in TIMES:
        assert ratios[f"{k}_vs_base"] == pytest.approx(res[k] / base[k])
        assert ratios[f"{k}_vs_peft"] == pytest.approx(res[k] / peft[k])
    assert ratios["fwd_bwd_peak_mib_vs_peft"] is None


def test_report_header(report):
    assert report["plans"] == ["torch"]
    assert report["torch"] == torch.__version__
    assert report["quick"] is True
    assert sorted(report["skipped"]) == sorted(f"fastlora_{plan}" for plan in PLANS if plan != "torch")
    assert len(report["cases"]) == 1
    assert report["cases"][0]["dtype"] == "float32"


def test_every_variant_and_method_measured(report):
    case = report["cases"][0]
    assert set(case["results"]) == {*CPU_VARIANTS, *PEFT_VARIANTS}
    assert case["skipped_for_time"] == [] and case["errors"] == {}
    assert set(case["methods"]) == set(METHODS) == {"lora", "selective_lora", "selective_lora_off",
                                                    "rank_selective_lora", "curlora", "neat", "cascade_lora"}
    for res in (*case["results"].values(), *case["methods"].values()):
        for k in TIMES:
            assert math.isfinite(res[k]) and res[k] > 0
        assert res["fwd_bwd_peak_mib"] is None and res["fwd_bwd_launches"] is None


def test_method_ranks(report):
    r = report["cases"][0]["r"]
    ranks = {name: res["active_rank"] for name, res in report["cases"][0]["methods"].items()}
    assert ranks == {"lora": r, "selective_lora": r, "selective_lora_off": 0, "rank_selective_lora": r // 2,
                     "curlora": r, "neat": r, "cascade_lora": r}


def test_ratios_are_quotients_of_the_medians(report):
    case = report["cases"][0]
    results, base = case["results"], case["results"]["base"]
    assert set(case["ratios"]) == set(results) - {"base"}
    for name, ratios in case["ratios"].items():
        if name in PEFT_VARIANTS:
            assert ratios == pytest.approx({f"{k}_vs_base": results[name][k] / base[k] for k in TIMES})
            continue
        peft = results["peft_dropout" if name.endswith("_dropout") else "peft"]
        _check_ratios(ratios, results[name], base, peft)
    assert set(case["method_ratios"]) == set(METHODS)
    for name, ratios in case["method_ratios"].items():
        _check_ratios(ratios, case["methods"][name], base, results["peft"])


def test_peft_layer_computes_the_same_output():
    """The PEFT reference gets the same W, A, B and scale as the fastlora variants."""
    pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(16, 32, generator=gen), torch.randn(24, 32, generator=gen)
    a, b = torch.randn(4, 32, generator=gen), torch.randn(24, 4, generator=gen)
    layer = peft_layer(weight, a, b, 2.0, 0.0)
    expected = adapted_linear(x, weight, None, a, b, scale=2.0, backend="torch")
    torch.testing.assert_close(layer(x), expected)
    assert [p.shape for p in layer.parameters() if p.requires_grad] == [a.shape, b.shape]


def test_run_jobs_records_failures_and_skips():
    """One failing variant is reported with its traceback, the others still run; once the
    budget says stop, the rest are listed as skipped."""
    calls = iter([True, True, False])
    row = {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0, "fwd_bwd_peak_mib": None}
    results, skipped, errors = run_jobs({"bad": lambda: 1 / 0, "good": lambda: row, "late": lambda: row},
                                        lambda: next(calls))
    assert results == {"good": row} and skipped == ["late"]
    assert list(errors) == ["bad"] and "ZeroDivisionError" in errors["bad"]


def test_host_path_benchmark(tmp_path):
    """benchmarks/bench_host.py --quick: every variant timed, ratios to PEFT of the same dropout, the aten
    operators of one call counted (the frozen Linear's forward and input gradient: a handful)."""
    pytest.importorskip("peft")
    from benchmarks import bench_host

    out = tmp_path / "host.json"
    report = bench_host.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    rows = report["variants"]
    assert set(rows) == {"linear", *(f"{layer}{suffix}" for layer in ("peft", "accelerate", "inject")
                                     for suffix in ("", "_dropout", "_autocast", "_no_grad"))}
    for name, row in rows.items():
        assert math.isfinite(row["us_per_call"]) and row["us_per_call"] > 0
        assert len(row["us_rounds"]) == bench_host.QUICK["rounds"]
        peft = rows["peft" + bench_host.suffix_of(name)]
        assert row["vs_peft"] == pytest.approx(row["us_per_call"] / peft["us_per_call"])
        paired = sorted(mine / theirs for mine, theirs in zip(row["us_rounds"], peft["us_rounds"]))
        assert row["vs_peft_paired"] == pytest.approx(paired[len(paired) // 2])  # an odd number of rounds
        first, third = row["vs_peft_quartiles"]
        assert paired[0] <= first <= row["vs_peft_paired"] <= third <= paired[-1]
        assert row["aten_ops"] == sum(row["ops"].values()) > 0 and row["python_top"]
    assert rows["peft"]["vs_peft"] == 1.0 and rows["inject_dropout"]["dropout"] == bench_host.DROPOUT
    assert rows["inject_autocast"]["autocast"] == "bfloat16" and rows["inject"]["autocast"] is None
    assert rows["inject"]["grad"] and not rows["inject_no_grad"]["grad"]
    assert 2 <= rows["linear"]["aten_ops"] < rows["peft"]["aten_ops"]
    assert rows["peft_no_grad"]["aten_ops"] < rows["peft"]["aten_ops"]  # the forward alone


def test_host_path_benchmark_on_a_stack_of_layers(tmp_path):
    """--stack 3: each variant is three layers in sequence; a call runs them all (three times the frozen
    Linear's operators), and the time per layer is the call's over three."""
    pytest.importorskip("peft")
    from benchmarks import bench_host

    single = bench_host.main(["--quick", "--out", str(tmp_path / "one.json")])["variants"]
    report = bench_host.main(["--quick", "--stack", "3", "--out", str(tmp_path / "three.json")])
    rows = report["variants"]
    assert report["stack"] == 3 and set(rows) == set(single)
    assert rows["linear"]["aten_ops"] == 3 * single["linear"]["aten_ops"]
    for row in rows.values():
        assert row["us_per_layer"] == pytest.approx(row["us_per_call"] / 3) and row["us_per_layer"] > 0
    t = bench_host.host_tensors(torch.Generator().manual_seed(0))
    stacks = bench_host.layers(t, stack=3)
    expected = stacks["peft"](t["x"])
    for name in ("accelerate", "inject"):
        assert len(stacks[name]) == 3
        torch.testing.assert_close(stacks[name](t["x"]), expected)


def test_host_path_of_the_torch_plan_dispatches_no_more_aten_operators_than_peft(monkeypatch):
    """The torch plan as a CPU user runs it (outside the Triton interpreter, whose dropout is the kernels'
    Philox in torch ops): per forward + backward, fastlora's layers dispatch PEFT's aten operators or fewer in
    every setting, and cast less under autocast (operator counts, not times)."""
    pytest.importorskip("peft")
    from benchmarks import bench_host

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = bench_host.host_tensors(torch.Generator().manual_seed(0))
    ops = {name: bench_host.count_ops(bench_host.call_of(layer, t, bench_host.SETTINGS[bench_host.suffix_of(name)]))
           for name, layer in bench_host.layers(t).items()}
    for suffix in bench_host.SETTINGS:
        for name in ("inject" + suffix, "accelerate" + suffix):
            assert sum(ops[name].values()) <= sum(ops["peft" + suffix].values()), (name, ops[name])
    assert ops["inject_dropout"]["bernoulli_"] == ops["peft_dropout"]["bernoulli_"] == 1  # torch's own dropout
    assert ops["inject_autocast"]["_to_copy"] < ops["peft_autocast"]["_to_copy"]


def test_host_path_layers_compute_the_same_output():
    """Without dropout, PEFT's layer, its accelerated twin and the injected AdapterLinear give one output."""
    pytest.importorskip("peft")
    from benchmarks import bench_host

    t = bench_host.host_tensors(torch.Generator().manual_seed(0))
    layers = bench_host.layers(t)
    expected = layers["peft"](t["x"])
    for name in ("accelerate", "inject"):
        torch.testing.assert_close(layers[name](t["x"]), expected)


def test_host_path_of_the_cublas_plan_with_offline_triton(tmp_path):
    """--plan cublas (re-run without the Triton interpreter, every kernel compiled for sm_90 by the offline
    driver, every launch stopped at the driver): fastlora's variants count the Triton launches of one
    forward + backward (shrink and its split sum; dy pass, dA, their sums; with dropout the expand too),
    PEFT's none; the compiled kernels are listed with their registers."""
    pytest.importorskip("peft")
    out = tmp_path / "host_cublas.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_host", "--plan", "cublas", "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["variants"]
    assert report["plan"] == "cublas" and rows["peft"]["triton_launches"] == 0
    for name in ("inject", "accelerate"):
        assert rows[name]["triton_launches"] > 0 and "_shrink_kernel" in rows[name]["launches"]
        assert rows[name + "_dropout"]["launches"].get("_fused_linear_kernel") == 1  # the expand with dropout
        assert rows[name + "_no_grad"]["launches"] == {"_shrink_kernel": 1}  # the forward alone
        assert math.isfinite(rows[name]["us_per_call"]) and rows[name]["aten_ops"] < rows["peft"]["aten_ops"]
        # fp32 adapters under bf16 autocast: casts of x, W and v, of B for addmm, and of dx back to fp32 (the
        # input gradient with dropout is the expand kernel: no cast of A); none of A or of a factor's gradient
        assert rows[name + "_autocast"]["ops"]["_to_copy"] == 5 < rows["peft_autocast"]["ops"]["_to_copy"]


def test_counted_triton_counts_each_launch_and_runs_it(monkeypatch):
    """bench_host counts Triton launches by kernel name and lets each run (on a GPU, or up to the driver)."""
    triton_jit = pytest.importorskip("triton.runtime.jit")
    from collections import Counter
    from types import SimpleNamespace

    from benchmarks.host_instruments import counted_triton

    ran = []
    monkeypatch.setattr(triton_jit.JITFunction, "run", lambda self, *args, **kwargs: ran.append((args, kwargs)) or 7)
    original = triton_jit.JITFunction.run
    kernel = SimpleNamespace(fn=SimpleNamespace(__name__="_some_kernel"))
    launches = Counter()
    with counted_triton(launches):
        assert triton_jit.JITFunction.run(kernel, 1, 2, grid=(3,)) == 7
        triton_jit.JITFunction.run(kernel, grid=(1,))
    assert launches == {"_some_kernel": 2} and ran == [((1, 2), {"grid": (3,)}), ((), {"grid": (1,)})]
    assert triton_jit.JITFunction.run is original

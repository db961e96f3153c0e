"""benchmarks/gpu_check.py run as a script on the CPU: its sections, budget, JSON report,
table and exit status (the GPU run itself cannot be tested here; no timing is asserted)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from benchmarks import byte_model
from benchmarks.bench_methods import METHODS
from benchmarks.check_correctness import CASES, QUICK_SHAPES
from benchmarks.check_kernels import kernel_kind, model_bytes
from benchmarks.check_report import render
from benchmarks.check_speed import device_peaks
from benchmarks.profiling import is_copy, per_name, top
from benchmarks.speed_targets import targets

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["env", "bench_model", "host", "crossover", "order", "compile", "products", "speed", "correctness",
            "graphs", "gemm", "skinny", "trace"]
CUDA_SECTIONS = {"order", "compile", "products", "graphs", "gemm", "skinny"}
PASS_SECTIONS = {"bench_model", "correctness"}  # check sections: "pass" when every check ran and passed


def _run(tmp_path: Path, *args: str, interpret: bool = False, cwd: Optional[Path] = None,
         timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    """gpu_check --device cpu --quick in a subprocess (from ``tmp_path`` unless ``cwd``): its result and report."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTLORA_CACHE_DIR"] = str(tmp_path / "cache")  # auto's plan cache: not the user's
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out), *args], cwd=cwd or tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    # a budget wide enough that a busy CPU does not cut a section short: what is checked is the report, not time
    return _run(tmp_path_factory.mktemp("gpu_check"), "--budget-s", "1200", timeout=1500)


def test_every_section_is_reported(cpu_run):
    proc, report = cpu_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(report["sections"]) == SECTIONS
    assert report["plans"] == ["torch"] and report["failed_checks"] == []
    for name, section in report["sections"].items():
        expected = "skipped" if name in CUDA_SECTIONS else ("pass" if name in PASS_SECTIONS else "ok")
        assert section["status"] == expected, (name, section)
    assert all(report["sections"][name]["reason"] == "needs a CUDA device" for name in CUDA_SECTIONS)
    for name in SECTIONS:  # the table printed last names every section
        assert name in proc.stdout.split("section")[-1]


def test_bench_model_section(cpu_run):
    """The whole-model benchmark ran in its child for both models (no first-step processes in a quick run)."""
    from benchmarks.model_setups import VARIANTS

    section = cpu_run[1]["sections"]["bench_model"]
    assert set(section["models"]) == {"llama", "bert"} and section["first_step_variants"] == []
    for entry in section["models"].values():
        assert len(entry["variants"]) == len(VARIANTS) and entry["errors"] == {} and entry["losses"]["agree"]
    assert "losses agree" in section["summary"]
    assert "no-dropout losses vs peft_fp32" in cpu_run[0].stdout.split("section")[-1]


def test_host_section(cpu_run):
    """The host-time benchmark ran in its child on the CPU's plan (torch; a GPU adds the cublas plan first)."""
    section = cpu_run[1]["sections"]["host"]
    assert list(section["plans"]) == ["torch"] and section["skipped"] == []
    report = section["plans"]["torch"]
    assert report["plan"] == "torch" and not report["gpu"] and report["stack"] == 8
    assert report["variants"]["peft"]["vs_peft"] == 1.0 and report["variants"]["inject"]["us_per_call"] > 0
    assert section["summary"].startswith("torch: inject ") and "x PEFT" in section["summary"]


def test_speed_section_with_peft_from_the_repository_root(tmp_path):
    """Run from the repository root (where a top-level package could shadow what peft imports), the speed
    section measures PEFT's layer too."""
    proc, report = _run(tmp_path, "--only", "env,correctness,speed", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(report["sections"]) == ["env", "speed", "correctness"]
    speed = report["sections"]["speed"]
    assert speed["status"] == "ok" and speed["cases"], speed
    case = speed["cases"][0]
    assert {"peft", "peft_dropout"} <= set(case["results"]) and case["errors"] == {}
    assert case["ratios"]["fastlora_auto"]["fwd_bwd_ms_vs_peft"] is not None
    assert report["sections"]["correctness"]["status"] == "pass"


def test_correctness_covers_every_case_and_method(cpu_run):
    items = cpu_run[1]["sections"]["correctness"]["items"]
    assert all(item["pass"] for item in items)
    quick_cases = {c for c, (shape, _) in CASES.items() if shape in QUICK_SHAPES}
    assert {i["case"] for i in items if i["kind"] == "op"} == quick_cases
    assert {i["method"] for i in items if i["kind"] == "method"} == set(METHODS)
    assert {i["method"] for i in items if i["kind"] == "layer"} == set(METHODS)
    assert {i["dtype"] for i in items} == {"bfloat16", "float32"}
    dropout = next(i for i in items if i.get("case") == "dropout")
    assert set(dropout["errors"]) == {"y", "d_x", "d_bias", "d_lora_a", "d_lora_b"}
    gate = next(i for i in items if i.get("case") == "gate_0")
    assert gate["errors"]["d_lora_a"] == 0.0 and 0 < gate["errors"]["d_gate"] < gate["tolerance"]


def test_env_trace_and_speed(cpu_run):
    sections = cpu_run[1]["sections"]
    assert sections["env"]["versions"]["torch"] and sections["env"]["copy_gbs"] > 0
    assert set(sections["trace"]["plans"]) == {"torch", "auto"}
    case = sections["speed"]["cases"][0]
    assert set(case["methods"]) == set(METHODS) and case["skipped_for_time"] == [] and case["errors"] == {}
    assert {row["target"] for row in case["targets"]} >= {"gate off fwd+bwd vs base", "peak memory vs PEFT"}
    assert case["ratios"]["fastlora_torch"]["fwd_bwd_ms_vs_base"] == pytest.approx(
        case["results"]["fastlora_torch"]["fwd_bwd_ms"] / case["results"]["base"]["fwd_bwd_ms"])


def test_speed_floors_next_to_the_medians(cpu_run):
    """Base and the plan measured get their byte/FLOP floors (a CPU has no documented peaks: those
    section env measured) and measured / floor, in the JSON and in the printed table."""
    proc, report = cpu_run
    env, speed = report["sections"]["env"], report["sections"]["speed"]
    assert speed["peaks"]["source"].startswith("measured")
    assert speed["peaks"]["bandwidth"] == env["copy_gbs"] * 1e9 and speed["peaks"]["flops"] == env["matmul"][
        "tflops"] * 1e12
    case = speed["cases"][0]
    model = byte_model.floors(byte_model.Shape(case["n"], case["d_in"], case["d_out"], case["r"], elem=4),
                              speed["peaks"]["bandwidth"], speed["peaks"]["flops"])
    assert set(case["floors"]) == {"base", "fastlora_torch"}
    table = proc.stdout.split("section")[-1]
    speed_table = table[table.index("speed N="):]  # after bench_model's table (which has a "base" row too)
    for name, plan in (("base", "base"), ("fastlora_torch", "torch")):
        row, res = case["floors"][name], case["results"][name]
        assert 0 < row["fwd_floor_ms"] < row["fwd_bwd_floor_ms"]
        assert row["fwd_floor_ms"] == pytest.approx(model[plan]["fwd_us"] / 1e3)
        assert row["fwd_bwd_floor_ms"] == pytest.approx(model[plan]["step_us"] / 1e3)
        assert row["fwd_vs_floor"] == pytest.approx(res["fwd_ms"] / row["fwd_floor_ms"])
        assert row["fwd_bwd_vs_floor"] == pytest.approx(res["fwd_bwd_ms"] / row["fwd_bwd_floor_ms"])
        line = next(line for line in speed_table.splitlines() if line.split()[:1] == [name])
        assert line.split()[-4:] == [f"{row['fwd_floor_ms']:.3f}", f"{row['fwd_vs_floor']:.2f}",
                                     f"{row['fwd_bwd_floor_ms']:.3f}", f"{row['fwd_bwd_vs_floor']:.2f}"]
    assert "fwd floor" in table and "TFLOP/s (measured" in table


def test_documented_peaks_of_known_gpus():
    """H100/H200 floors use the datasheet peaks whatever section env measured; other devices use env's."""
    env = {"copy_gbs": 100.0, "matmul": {"dtype": "bfloat16", "tflops": 50.0}}
    for name, key in (("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                      ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200 NVL", "H200 NVL")):
        peaks = device_peaks({"device": name, "sections": {"env": env}})
        assert peaks == {"source": f"documented {key}", "bandwidth": byte_model.DEVICE_PEAKS[key][0],
                         "flops": byte_model.DEVICE_PEAKS[key][1]}
    assert byte_model.DEVICE_PEAKS["H200"] == (4.8e12, 989.5e12)
    assert device_peaks({"device": "NVIDIA A100-SXM4-80GB", "sections": {"env": env}}) == {
        "source": "measured (env: copy, bfloat16 matmul)", "bandwidth": 100e9, "flops": 50e12}
    assert device_peaks({"device": "NVIDIA A100-SXM4-80GB", "sections": {}}) is None


def test_budget_skips_what_does_not_fit(tmp_path):
    proc, report = _run(tmp_path, "--budget-s", "0", "--only", "env,correctness")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # nothing failed: nothing ran
    assert {s["status"] for s in report["sections"].values()} == {"skipped"}
    assert report["sections"]["env"]["reason"].startswith("time budget")


def test_failed_check_sets_the_exit_status(tmp_path):
    """The triton plan without a GPU or the interpreter raises in every op item: the items record
    their tracebacks (paths relative to the repository), the section fails, the exit status is 1."""
    proc, report = _run(tmp_path, "--only", "correctness", "--plans", "triton")
    assert proc.returncode == 1 and report["failed_checks"] == ["correctness"]
    failed = [i for i in report["sections"]["correctness"]["items"] if not i["pass"]]
    assert failed and all("Traceback" in i["error"] for i in failed)
    assert "benchmarks/check_correctness.py" in failed[0]["error"] and str(ROOT) not in json.dumps(report)
    assert "failures:" in proc.stdout


def test_triton_interpreter_plans(tmp_path):
    """The "triton" and "cublas" plans (real Triton kernels, interpreted) pass the correctness section."""
    pytest.importorskip("triton")
    proc, report = _run(tmp_path, "--only", "correctness", "--plans", "triton,cublas", interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = report["sections"]["correctness"]["items"]
    assert {i["plan"] for i in items} == {"triton", "cublas", "auto"}
    assert {i["dtype"] for i in items} == {"float16", "float32"}
    assert all(i["pass"] for i in items)


def test_kernel_byte_models():
    assert kernel_kind("_shrink_kernel", "fwd") == "shrink_x" and kernel_kind("_shrink_kernel", "bwd") == "shrink_dy"
    assert kernel_kind("_dy_columns_kernel", "bwd") == "dy_columns"
    assert kernel_kind("_down_grad_kernel", "bwd") == "down_grad"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16", "fwd") is None
    # x (N, d_in) read once dominates the shrink: 8192 x 4096 bf16 plus A and the fp32 output
    assert model_bytes("shrink_x", 8192, 4096, 11008, 16, 2) == 8192 * 4096 * 2 + 16 * 4096 * 2 + 8192 * 16 * 4


def test_profile_tables():
    events = [("k1", 10.0), ("k2", 30.0), ("k1", 20.0), ("Memset (Device)", 1.0)]
    table = per_name(events, repeats=2)
    assert table["k1"] == {"calls": 1.0, "us": 15.0}
    rows = top(table, 2)
    assert [r["name"] for r in rows] == ["k1", "k2"] and rows[0]["share"] == pytest.approx(15 / 30.5)
    assert is_copy("Memset (Device)") and is_copy("Memcpy DtoD (Device -> Device)") and not is_copy("k1")


def test_table_lists_failures():
    cuda_error = ("Traceback ...\ntorch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
                  "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
                  "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
    losses = {"reference": "peft_fp32", "steps": 8, "max_abs_diff": {"accelerate_fp32": 0.5, "inject_fp32": 0.01},
              "tolerance": 0.02, "loss_drop": 1.0, "agree": False}
    model = {"class": "LlamaForCausalLM", "parameters": 1e6, "batch": {"sequences": 1, "tokens": 8}, "variants": {},
             "ratios": {}, "losses": losses, "first_step": {}, "errors": {}, "skipped": []}
    report = {"device": "GPU", "plans": ["triton"], "sections": {
        "bench_model": {"status": "fail", "seconds": 1.0, "summary": "llama: LOSSES DISAGREE", "device": "GPU",
                        "models": {"llama": model}},
        "correctness": {"status": "fail", "seconds": 1.0, "summary": "0/1", "items": [
            {"kind": "op", "case": "plain", "dtype": "bfloat16", "plan": "triton", "pass": False,
             "max_error": 0.5, "tolerance": 0.01, "errors": {"y": 0.5}},
            {"kind": "op", "case": "odd", "dtype": "bfloat16", "plan": "onepass", "pass": False, "fault": True,
             "error": cuda_error}]},
        "graphs": {"status": "fail", "seconds": 1.0, "syncs": {"triton/plain": {"pass": False, "error": "sync"}},
                   "method_syncs": {}, "graphs": {}},
        "speed": {"status": "error", "traceback": "Traceback ...\nRuntimeError: boom"}}}
    text = render(report)
    assert "correctness op plain bfloat16 triton: max error 5.00e-01" in text
    assert "correctness op odd bfloat16 onepass: torch.AcceleratorError: CUDA error: an illegal memory access" in text
    assert "syncs triton/plain: sync" in text and "RuntimeError: boom" in text
    assert "bench_model llama: no-dropout losses differ from peft_fp32's by up to 5.00e-01" in text
    assert ": DISAGREE" in text  # the model table


class _Ctx:
    """The slice of gpu_check's section context the kernel sections read."""
    device = torch.device("cpu")
    quick = True
    plans = ("triton", "cublas", "torch", "onepass")
    report = {"sections": {"env": {"copy_gbs": 100.0}}}

    def has(self, seconds):
        return True

    def partial(self, result):
        pass


def test_crossover_section(cpu_run):
    """The sweep's quick CPU run: PEFT and the torch plan timed at each shape, host time within the wall time."""
    _, report = cpu_run
    rows = report["sections"]["crossover"]["rows"]
    assert [(row["n"], row["d"]) for row in rows] == [(16, 32), (16, 64)]
    for row in rows:
        assert set(row["ms"]) == {"peft", "torch"} and all(ms > 0 for ms in row["ms"].values())
        assert all(row["host_us"][name] <= 1e3 * row["ms"][name] * 1.01 for name in row["ms"])
        assert row["fastest"] in row["ms"]


def test_a_gpu_checks_the_plans_auto_runs_unless_told():
    """On CUDA the default run checks auto's plans (the opt-in ones by --plans), and section gemm, which
    compares the triton plan's GEMM with cuBLAS's, skips without it."""
    from benchmarks import check_kernels
    from benchmarks.gpu_check import check_plans
    from fastlora.kernels.plans import AUTO_CANDIDATES

    assert check_plans(torch.device("cuda")) == AUTO_CANDIDATES == ("cublas", "torch")
    ctx = _Ctx()
    ctx.plans = AUTO_CANDIDATES
    assert check_kernels.gemm_vs_cublas(ctx) == {"status": "skipped",
                                                 "reason": "the triton plan is not checked (--plans)"}


def test_crossover_is_the_width_from_which_cublas_keeps_winning():
    from benchmarks.bench_crossover import crossover

    def row(n, d, cublas, peft):
        return {"n": n, "d": d, "ms": {"cublas": cublas, "peft": peft, "torch": 1.0}}

    rows = [row(512, 256, 2.0, 1.0), row(512, 512, 0.9, 1.0), row(512, 768, 1.1, 1.0), row(512, 1024, 0.5, 1.0),
            row(2048, 256, 0.5, 1.0), row(2048, 512, 0.6, 1.0), row(8192, 256, 2.0, 1.0)]
    assert crossover(rows, "peft") == {"512": 1024, "2048": 256, "8192": None}


def test_size_rule_is_the_size_from_which_cublas_keeps_beating_the_torch_plan():
    from benchmarks.bench_crossover import size_rule

    def row(n, d, cublas):
        return {"n": n, "d": d, "ms": {"cublas": cublas, "peft": 1.0, "torch": 1.0}}

    # sizes n d^2: 512 x 256^2 = 2^25, 2048 x 256^2 = 2^27, 512 x 1024^2 = 2^29, 2048 x 1024^2 = 2^31
    rows = [row(2048, 1024, 0.5), row(512, 256, 1.5), row(512, 1024, 0.8), row(2048, 256, 1.2)]
    assert size_rule(rows) == 512 * 1024 ** 2
    rows[1] = row(512, 256, 0.9)  # a win below a loss does not count: the rule is one threshold
    assert size_rule(rows) == 512 * 1024 ** 2
    assert size_rule([row(512, 256, 0.9), row(2048, 1024, 0.5)]) is None  # cublas wins everywhere
    assert size_rule([row(512, 256, 0.9), row(2048, 1024, 1.5)]) is None  # cublas loses at the largest size
    assert size_rule([{"n": 512, "d": 256, "ms": {"peft": 1.0, "torch": 0.9}}]) is None  # no cublas rows (CPU)


def test_kernel_sections_logic(monkeypatch):
    """The CUDA-only sections "gemm", "order", "skinny" and "products" on tiny CPU shapes (Triton plans interpreted, the
    one-pass forward and input gradient for every programs-per-row-block count of the sweep), with the
    profiler replaced by fixed kernel times: their bookkeeping, not the GPU."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on CPU")
    from benchmarks import check_kernels

    def events(fn, repeats=1):
        fn()
        return [("_fused_linear_kernel", 100.0), ("_shrink_kernel", 10.0), ("_dy_columns_kernel", 5.0),
                ("_fused_linear_kernel", 90.0), ("Memset (Device)", 1.0)] * repeats

    monkeypatch.setattr(check_kernels, "gpu_events", events)
    monkeypatch.setattr(check_kernels, "FULL_SHAPES", [(32, 16, 24)])
    monkeypatch.setattr(check_kernels, "SKINNY_CASES", [(32, 16, 24, 4)])
    gemm = check_kernels.gemm_vs_cublas(_Ctx())
    shape = gemm["shapes"][0]
    assert shape["gemm_ratio"] == 1.0 and shape["triton_gemms"]["names"] == ["_fused_linear_kernel"]
    assert set(shape["fwd_ms"]) == {"base", "triton_gate_0", "triton", "cublas", "torch", "onepass"}
    for kind in ("fwd", "bwd"):
        assert set(shape[f"onepass_groups_{kind}_ms"]) == {"default", "1", "2", "4", "8", "per_tile"}
        assert all(ms > 0 for ms in shape[f"onepass_groups_{kind}_ms"].values())
    orders = check_kernels.order(_Ctx())
    for output in ("y", "dx"):
        order = orders["shapes"][0][output]
        assert all(order[k] > 0 for k in ("gemm", "gemm_into", "term_after", "term_first", "term_first_expand"))
        assert order["first_vs_after"] == order["term_first"] / order["term_after"]
    assert orders["summary"].startswith("low-rank term first / after the GEMM: 16x24 y ")
    table = render({"device": "GPU", "plans": ["onepass"], "sections": {"gemm": {"status": "ok", **gemm},
                                                                         "order": {"status": "ok", **orders}}})
    assert "output dx ms, N=32 16->24: GEMM " in table
    assert "onepass fwd ms by programs per row block, N=32 16->24: default " in table
    assert "onepass bwd ms by programs per row block, N=32 16->24: default " in table
    skinny = check_kernels.skinny_bandwidth(_Ctx())
    kernels = {(k["phase"], k["name"]): k for k in skinny["cases"][0]["kernels"]}
    shrink = kernels[("fwd", "_shrink_kernel")]
    assert shrink["kind"] == "shrink_x" and shrink["gbs"] == pytest.approx(
        check_kernels.model_bytes("shrink_x", 32, 16, 24, 4, 4) / 10e-6 / 1e9)
    assert shrink["of_copy"] == pytest.approx(shrink["gbs"] / 100.0)
    assert kernels[("bwd", "_shrink_kernel")]["kind"] == "shrink_dy"
    assert kernels[("fwd", "_fused_linear_kernel")]["gbs"] is None
    products = check_kernels.products(_Ctx())
    case = products["cases"][0]
    assert case["dy_read_twice"] is False  # r = 4: the single pass (interpreter tiles)
    against = case["against_cublas"]
    assert set(against) == {"shrink", "dy_pass", "down_grad", "shrink_dropout", "down_grad_dropout"}
    for row in against.values():
        assert row["triton"] > 0 and row["cublas"] > 0 and row["ratio"] == row["triton"] / row["cublas"]
    assert products["summary"].startswith("Triton / cuBLAS: r=4 16x24 shrink ")


def test_speed_targets():
    """Targets read off a case: shape-bound ones only at their shape; unmeasured ones stay open."""
    ms = lambda t: {"fwd_ms": t, "fwd_bwd_ms": t, "fwd_bwd_peak_mib": None}  # noqa: E731
    case = {"d_in": 4096, "d_out": 4096, "r": 16,
            "results": {"fastlora_triton": ms(1.2), "fastlora_cublas": ms(1.0), "fastlora_auto": ms(1.05)},
            "ratios": {"fastlora_auto": {"fwd_bwd_ms_vs_base": 1.05, "fwd_bwd_ms_vs_peft": 0.8,
                                         "fwd_bwd_peak_mib_vs_peft": None}}}
    rows = {row["target"]: row for row in targets(case, ("triton", "cublas"))}
    assert rows["fwd+bwd vs base, 4096x4096 r=16"]["met"] is True
    assert not any("r=64" in name or "11008" in name for name in rows)
    assert rows["fwd+bwd vs PEFT (>= 1.3x faster)"]["met"] is False
    assert rows["peak memory vs PEFT"]["met"] is None and rows["gate off fwd+bwd vs base"]["value"] is None
    best = next(row for name, row in rows.items() if name.startswith("auto fwd+bwd vs the fastest plan"))
    assert best["value"] == pytest.approx(1.05) and best["met"] is False


def test_graph_section_logic(monkeypatch):
    """The CUDA-only section "graphs" on CPU with the torch plan: device syncs are no-ops and a
    "captured graph" re-runs its step on each replay, so the bookkeeping (sync items, replay
    comparisons, fresh dropout masks, verdicts) runs without a GPU."""
    from benchmarks import check_graphs

    class Rerun:
        def __init__(self, step):
            self.step = step

        def replay(self):
            return [o.clone() for o in self.step()]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(check_graphs, "Captured", Rerun)
    ctx = _Ctx()
    ctx.plans = ("torch",)
    result = check_graphs.run(ctx)
    assert result["status"] == "pass", result
    assert set(result["syncs"]) == {f"{p}/{v}" for p in ("torch", "auto") for v in check_graphs.SYNC_VARIANTS}
    assert set(result["method_syncs"]) == set(METHODS)
    graph = result["graphs"]["torch"]
    assert graph["unseeded_replays_differ"] and graph["seeded_replay_bitwise_equal"]
    assert graph["no_dropout_replay_vs_eager"] == 0.0


def test_stopped_run_keeps_its_report(tmp_path, monkeypatch):
    """SIGTERM (a time limit) inside a section: the report keeps what finished, the running
    section stays "running" with its partial result, the table is printed, exit status 2."""
    from benchmarks import gpu_check

    def stopped(ctx):
        ctx.partial({"items": [{"kind": "op", "pass": True}]})
        gpu_check._terminate(signal.SIGTERM, None)

    sections = (gpu_check.Section("env", lambda ctx: {"summary": "ok"}, 0.1, False, False, False),
                gpu_check.Section("correctness", stopped, 0.5, True, False, True))
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "r.json")])
    finally:
        signal.signal(signal.SIGTERM, handler)
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 2 and report["failed_checks"] == []
    assert report["sections"]["env"]["status"] == "ok"
    assert report["sections"]["correctness"] == {"items": [{"kind": "op", "pass": True}], "status": "running"}
    assert report["terminated"] == "Terminated SIGTERM in section correctness"


def test_a_run_started_in_process_counts_its_budget_from_its_own_start(tmp_path, monkeypatch):
    """main() called long after the module was imported (as in this test session) still has its whole budget."""
    from benchmarks import gpu_check

    sections = (gpu_check.Section("env", lambda ctx: {"summary": f"{ctx.deadline - ctx.start:.0f} s"}, 0.5, False,
                                  False, False),)
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    monkeypatch.setattr(gpu_check, "START", gpu_check.START - 10 * gpu_check.DEFAULT_BUDGET_S)
    assert gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "100", "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sections"]["env"]["status"] == "ok" and report["sections"]["env"]["summary"] == "50 s"
    assert report["seconds"] < 100


def test_a_failing_crossover_shape_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from benchmarks import bench_crossover

    measure = bench_crossover.measure_shape

    def flaky(n, d, device, repeats):
        if d == 32:
            raise RuntimeError("boom")
        return measure(n, d, device, repeats)

    monkeypatch.setattr(bench_crossover, "measure_shape", flaky)
    report = bench_crossover.run(torch.device("cpu"), True, tmp_path / "crossover.json")
    assert [row["d"] for row in report["rows"]] == [64]
    assert "RuntimeError: boom" in report["errors"]["N=16 d=32"]
    assert report["summary"].endswith("; 1 shapes failed")


def test_the_crossover_sweep_goes_from_the_smallest_gemm_up_and_stops_at_its_budget(tmp_path, monkeypatch):
    import time

    from benchmarks import bench_crossover

    sizes = [n * d * d for n, d in bench_crossover.shapes(quick=False)]
    assert sizes == sorted(sizes) and len(sizes) == len(bench_crossover.WIDTHS) * len(bench_crossover.TOKENS)
    measure = bench_crossover.measure_shape

    def slow(n, d, device, repeats):
        time.sleep(0.3)
        return measure(n, d, device, repeats)

    monkeypatch.setattr(bench_crossover, "measure_shape", slow)
    out = tmp_path / "crossover.json"
    report = bench_crossover.run(torch.device("cpu"), True, out, budget_s=0.2)
    assert [row["d"] for row in report["rows"]] == [32]  # the second shape's turn comes after the budget
    assert report["cut"] == "1 of 2 shapes run (time budget): up to N=16 d=32"
    assert json.loads(out.read_text())["summary"].endswith("; " + report["cut"])
    assert bench_crossover.run(torch.device("cpu"), True, out, budget_s=0.0)["rows"] == []

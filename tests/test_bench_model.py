"""benchmarks/bench_model.py on the CPU (``--quick``: 2-layer models, hidden 64): every variant of
both models measured with finite numbers, PEFT's and fastlora's no-dropout losses agree step by
step (and would not with other adapters), and the first step in fresh processes on cold and warm
caches. No timing is asserted: on the CPU the figures check the script."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from benchmarks import loss_agreement  # noqa: E402
from benchmarks.bench_model import CPU_NOTE, main, render  # noqa: E402
from benchmarks.first_step import first_steps  # noqa: E402
from benchmarks.model_setups import ADAPTED, LOW_PRIORITY, MODELS, VARIANTS  # noqa: E402

STEPS = 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_model") / "report.json"
    returned = main(["--device", "cpu", "--quick", "--first-step", "none", "--warmup", "1", "--steps", str(STEPS),
                     "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["models"].keys() == returned["models"].keys()
    return stored


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_every_variant_of_both_models_is_measured(report):
    assert set(report["models"]) == set(MODELS) and report["note"] == CPU_NOTE
    for name, entry in report["models"].items():
        assert entry["errors"] == {} and entry["skipped"] == [], name
        assert list(entry["variants"]) == list(VARIANTS)
        for variant, res in entry["variants"].items():
            assert all(_finite_positive(res[k]) for k in ("step_ms", "host_ms", "first_step_in_run_s")), variant
            assert len(res["steps_ms"]) == STEPS and all(_finite_positive(t) for t in res["steps_ms"])
            assert res["peak_mib"] is None and res["profile"]["launches"] is None  # CPU: no allocator peak, no GPU
            assert res["profile"]["top_cpu_ops"]
        counts = {v: entry["variants"][v]["trainable_parameters"] for v in VARIANTS}
        assert counts["base"] == 0 and len({counts[v] for v in ADAPTED}) == 1 and counts["peft_fp32"] > 0


def test_ratios_are_quotients_of_the_medians(report):
    for entry in report["models"].values():
        v, r = entry["variants"], entry["ratios"]
        assert set(r) == set(ADAPTED)
        step = {name: res["step_ms"] for name, res in v.items()}
        assert r["accelerate_bf16"]["step_vs_base"] == pytest.approx(step["accelerate_bf16"] / step["base"])
        assert r["inject_fp32"]["step_vs_peft"] == pytest.approx(step["inject_fp32"] / step["peft_fp32"])
        torch_plan = r["accelerate-torch_fp32"]["step_vs_peft"]
        assert torch_plan == pytest.approx(step["accelerate-torch_fp32"] / step["peft_fp32"])
        host = {name: res["host_ms"] for name, res in v.items()}
        assert r["inject_bf16"]["host_vs_peft"] == pytest.approx(host["inject_bf16"] / host["peft_bf16"])
        assert r["peft_fp32"]["step_vs_peft"] is None and r["accelerate_fp32"]["peak_vs_peft"] is None


def test_no_dropout_losses_of_peft_and_fastlora_agree(report):
    for name, entry in report["models"].items():
        losses = entry["losses"]
        assert set(losses["curves"]) == {"peft_fp32", "accelerate_fp32", "inject_fp32"}
        assert all(len(c) == losses["steps"] and all(math.isfinite(x) for x in c) for c in losses["curves"].values())
        worst = max(losses["max_abs_diff"].values())
        assert losses["agree"] and worst <= losses["tolerance"], (name, losses)
        assert losses["loss_drop"] > 10 * worst, (name, losses)  # a difference is small next to what training did


def test_the_loss_check_sees_other_adapters(monkeypatch):
    """Without PEFT's factors copied in, inject's adapters (lora_B = 0, its own A) train another curve."""
    monkeypatch.setattr(loss_agreement, "copy_factors", lambda source, target: None)
    torch.set_num_threads(1)
    losses = loss_agreement.loss_curves(MODELS["llama"], True, torch.device("cpu"), steps=4)
    assert losses["max_abs_diff"]["accelerate_fp32"] <= losses["tolerance"]
    assert losses["max_abs_diff"]["inject_fp32"] > losses["tolerance"] and not losses["agree"]


def test_render_names_every_variant(report):
    text = render(report)
    assert CPU_NOTE in text and text.count(": agree") == len(MODELS)
    for variant in VARIANTS:
        assert f"  {variant} " in text


def test_budget_skips_every_job(tmp_path):
    report = main(["--device", "cpu", "--quick", "--model", "bert", "--budget-s", "0",
                   "--out", str(tmp_path / "r.json")])
    entry = report["models"]["bert"]
    assert entry["variants"] == {} and entry["losses"] is None
    core = [f"steady {v}" for v in VARIANTS if v not in LOW_PRIORITY]
    assert [s["job"] for s in entry["skipped"]] == core + ["losses", "first_step accelerate_fp32"] + [
        f"steady {v}" for v in LOW_PRIORITY]  # the job order: low-priority variants last
    assert all(s["reason"].startswith("time budget") for s in entry["skipped"])


def test_first_step_in_fresh_processes_on_cold_and_warm_caches():
    runs = first_steps("llama", "accelerate_fp32", "cpu", quick=True, timeout_s=300)
    assert list(runs) == ["cold", "warm"]
    for run in runs.values():
        assert "error" not in run, run
        assert run["model"] == "llama" and run["variant"] == "accelerate_fp32"
        assert all(_finite_positive(run[k]) for k in ("import_s", "build_s", "first_step_s", "second_step_s",
                                                       "process_s"))


def test_the_adapted_linears_floor_is_the_byte_model_over_every_per_token_layer():
    """The floor of a step's adapted Linears: Llama's 7 targets in each of its 8 layers, BERT's query, key,
    value and three dense layers in each of its 12 (not the pooler, which sees one token per sequence); at
    the documented peaks that the GPU's name selects, each plan's floor is the byte model's summed over
    those layers at the batch's tokens; a device without documented peaks gets none."""
    from benchmarks import byte_model
    from benchmarks.bench_model import floor_line, floors_ms, model_info

    llama, bert = model_info("llama", False), model_info("bert", False)
    assert len(llama["linear_shapes"]) == 8 * 7 and llama["linear_shapes"].count([2048, 512]) == 8 * 2  # k, v
    assert llama["linear_shapes"].count([5632, 2048]) == 8  # down
    assert len(bert["linear_shapes"]) == 12 * 6 and bert["linear_shapes"].count([3072, 768]) == 12
    floors = floors_ms(llama, "NVIDIA H100 80GB HBM3")
    bandwidth, peak = byte_model.DEVICE_PEAKS["H100"]
    shapes = [byte_model.Shape(4 * 1024, d_in, d_out, 16) for d_in, d_out in llama["linear_shapes"]]
    for plan in ("base", "cublas", "torch"):
        kernels = [byte_model.base_kernels(s, True) if plan == "base" else byte_model.plan_kernels(plan, s)
                   for s in shapes]
        assert floors[plan] == pytest.approx(1e3 * sum(byte_model.floor_seconds(k, bandwidth, peak) for k in kernels))
    assert floors["peaks"] == "H100" and floors["base"] < floors["cublas"] < floors["torch"]
    assert floors_ms(llama, "cpu (x86_64)") is None
    entry = {**llama, "floors_ms": floors, "variants": {"base": {"step_ms": 30.0}, "peft_fp32": {"step_ms": 64.5}}}
    line = floor_line(entry)
    assert f"adapters add {floors['cublas'] - floors['base']:.2f} ms on the cublas plan" in line
    assert line.endswith("peft_fp32 34.50")

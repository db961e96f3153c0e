"""The continual-learning benchmark (benchmarks/continual): quick mode end to end, and the
verdict logic on hand-made runs."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks.continual.__main__ import main  # noqa: E402
from benchmarks.continual.methods import FULL, METHODS, available_methods  # noqa: E402
from benchmarks.continual.metrics import MATCH_TOLERANCE, matched_comparison, output_drift  # noqa: E402
from benchmarks.continual.model import MLP  # noqa: E402
from benchmarks.continual.runner import VERDICT_METHODS  # noqa: E402

VERDICTS = ("forgets less than lora", "forgets more than lora", "no clear difference from lora")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("continual")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as the CLI does: tiny matmuls, no contention
    try:
        main(["--quick", "--seeds", "1", "--out-dir", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "continual_split_quick.json").read_text())


def test_quick_run_writes_json_and_plot(quick):
    out, result = quick
    assert (out / "continual_split_quick.png").stat().st_size > 10_000
    assert result["seeds"] == [0]
    ran, notes = available_methods()
    assert list(result["methods"]) == [spec.name for spec in ran]
    assert len(result["skipped"]) + len(ran) == len(METHODS) and result["skipped"] == notes
    assert {"lora", FULL} <= set(result["methods"])


def test_accuracies_and_pretraining_are_sane(quick):
    _, result = quick
    assert result["pretrained"]["test_a"]["mean"] > 0.9      # chance is 0.2 (5 classes)
    for run in result["runs"]:
        for point in run["trajectory"]:
            assert all(0.0 <= point[k] <= 1.0 for k in ("val_a", "val_b", "test_a", "test_b"))
    for name, row in result["methods"].items():
        assert 0.0 <= row["test_b"]["mean"] <= 1.0 and 0.0 <= row["test_a"]["mean"] <= 1.0
        assert row["drop_a"]["mean"] == pytest.approx(result["pretrained"]["test_a"]["mean"] - row["test_a"]["mean"])
        assert row["kl"]["mean"] >= 0.0 and row["rel_l2"]["mean"] >= 0.0
        assert row["seconds"]["mean"] > 0.0


def test_every_method_starts_from_the_pretrained_model(quick):
    """Step 0 (before any update) scores exactly as the pretrained model: adapters start at zero.
    LoRASC starts on its NoisyTune-perturbed backbone: close to the pretrained scores, not equal."""
    _, result = quick
    pre = result["pretrained"]
    for run in result["runs"]:
        start = run["trajectory"][0]
        assert start["step"] == 0
        tolerance = 0.05 if run["method"] == "cascade_lora" else 1e-5
        assert start["test_a"] == pytest.approx(pre["test_a"]["mean"], abs=tolerance)
        assert start["test_b"] == pytest.approx(pre["test_b"]["mean"], abs=tolerance)


def test_training_changes_outputs_and_parameter_counts(quick):
    _, result = quick
    methods = result["methods"]
    total = sum(p.numel() for p in MLP().parameters())
    assert methods[FULL]["trainable"] == total
    assert all(0 < row["trainable"] < total for name, row in methods.items() if name != FULL)
    assert methods[FULL]["kl"]["mean"] > 0.0 and methods["lora"]["kl"]["mean"] > 0.0
    assert methods[FULL]["test_b"]["mean"] > result["pretrained"]["test_b"]["mean"]
    assert methods["lora"]["test_b"]["mean"] > result["pretrained"]["test_b"]["mean"]


def test_a_verdict_for_each_named_method(quick):
    _, result = quick
    for name, label in VERDICT_METHODS.items():
        lines = [line for line in result["verdict"] if line.startswith(f"{label} ({name})")]
        assert len(lines) == 1
        if name in result["methods"]:
            assert result["matched"][name]["verdict"] in VERDICTS
            assert any(v in lines[0] for v in VERDICTS)
        else:
            assert "not run" in lines[0]


def test_output_drift():
    torch.manual_seed(0)
    logits = torch.randn(7, 10)
    assert output_drift(logits, logits) == {"kl": pytest.approx(0.0, abs=1e-7), "rel_l2": 0.0}
    other = logits + torch.randn(7, 10)
    drift = output_drift(logits, other)
    p = logits.double().softmax(-1)
    kl = (p * (p.log() - other.double().log_softmax(-1))).sum(-1).mean()
    rel = (other - logits).double().norm(dim=-1).mean() / logits.double().norm(dim=-1).mean()
    assert drift["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert drift["rel_l2"] == pytest.approx(float(rel), rel=1e-5)


def _run(method, seed, lr, points):
    trajectory = [{"step": 0, "val_a": 1.0, "val_b": 0.1, "test_a": 1.0, "test_b": 0.1}]
    trajectory += [{"step": i + 1, "val_a": a, "val_b": b, "test_a": a, "test_b": b} for i, (a, b) in enumerate(points)]
    return SimpleNamespace(method=method, seed=seed, lr=lr, trajectory=trajectory, final=trajectory[-1])


def test_matched_comparison_matches_at_the_level_both_reach():
    """Per seed the target is min(best task-B) - tolerance: 0.8 (X's best) - 0.01; LoRA's retention at >= 0.8
    is 0.5, X's is 0.7 (+0.2 each seed) -> forgets less; swapped -> forgets more."""
    runs = []
    for seed in range(3):
        runs += [_run("lora", seed, 1e-2, [(0.9, 0.5), (0.5, 0.8), (0.3, 0.95)]),
                 _run("lora", seed, 1e-3, [(0.95, 0.3), (0.9, 0.6)]),
                 _run("x", seed, 1e-2, [(0.9, 0.6), (0.7, 0.8)])]
    comparison = matched_comparison(runs, "x")
    assert comparison["verdict"] == "forgets less than lora"
    assert comparison["target_val_b"] == pytest.approx(0.8 - MATCH_TOLERANCE)
    assert comparison["diff_test_a"]["mean"] == pytest.approx(0.2)
    assert [s["baseline_point"]["lr"] for s in comparison["seeds"]] == [1e-2] * 3
    assert matched_comparison(runs, "lora", baseline="x")["verdict"] == "forgets more than x"
    noisy = [r for r in runs if r.method == "lora"] + [
        _run("x", s, 1e-2, [(a, 0.8)]) for s, a in enumerate((0.4, 0.6, 0.55))]
    assert matched_comparison(noisy, "x")["verdict"] == "no clear difference from lora"
    assert math.isfinite(matched_comparison(noisy, "x")["threshold"])

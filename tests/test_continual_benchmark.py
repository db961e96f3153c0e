"""The continual-learning benchmark (benchmarks/continual): the task sequences, quick mode end to
end, and the metrics, selection and comparison on hand-made matrices."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks.continual.__main__ import main  # noqa: E402
from benchmarks.continual.data import load_scenario  # noqa: E402
from benchmarks.continual.methods import ABLATIONS, FULL, METHODS, available_methods  # noqa: E402
from benchmarks.continual.metrics import (  # noqa: E402
    average_accuracy,
    average_forgetting,
    compare,
    forgetting_per_task,
    learning_accuracy,
)
from benchmarks.continual.model import MLP  # noqa: E402
from benchmarks.continual.train import select  # noqa: E402

LABELS = {"full_finetune": "full fine-tuning", "lora": "LoRA", "selective_lora": "Selective LoRA",
          "rank_selective_lora": "CoDyRA", "curlora": "CURLoRA", "neat": "NEAT", "cascade_lora": "LoRASC"}
# LoRASC's fresh adapter starts on a NoisyTune-perturbed backbone: close to the previous model, not equal.
START_TOLERANCE = {"cascade_lora": 0.1}
ROUNDED = 1e-4      # the JSON's runs keep 5 digits; one test image is worth more than 0.01


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


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    """The ablations beside their methods and LoRA, quick, at 12 steps a task (--steps: 3 epochs of 4
    batches; CoDyRA's schedule spans the task, so it thresholds within them)."""
    out = tmp_path_factory.mktemp("continual_ablations")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["--quick", "--ablations", "--steps", "12", "--out-dir", str(out), "--no-progress", "--methods",
              "lora", "selective_lora", "rank_selective_lora", "cascade_lora"])
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "continual_split_ablations_quick.json").read_text())


@pytest.mark.parametrize("name", ["split", "permuted"])
def test_scenarios_are_sequences_of_four_tasks_on_disjoint_images(name):
    scenario = load_scenario(name, seed=3)
    assert len(scenario.tasks) == 4
    for task in scenario.tasks:
        for split in (task.train, task.val, task.test):
            assert split.x.shape == (len(split.y), 64) and 0 <= int(split.y.min())
            assert int(split.y.max()) < len(task.classes)
        train = {tuple(row) for row in task.train.x.tolist()}
        assert not any(tuple(row) in train for row in task.test.x.tolist()[:50])
    classes = [tuple(t.classes.tolist()) for t in scenario.tasks]
    if name == "split":
        assert classes == [(0, 1, 2, 3), (4, 5), (6, 7), (8, 9)]
    else:
        assert classes == [tuple(range(10))] * 4
        first = scenario.tasks[0].train.x
        for task in scenario.tasks[1:]:
            assert torch.equal(task.train.y, scenario.tasks[0].train.y)
            assert torch.equal(task.train.x.sort(1).values, first.sort(1).values)     # the same pixels,
            assert not torch.equal(task.train.x, first)                              # moved


def test_quick_run_writes_json_and_plot_with_the_papers_names(quick):
    out, result = quick
    assert (out / "continual_split_quick.png").stat().st_size > 10_000
    assert result["seeds"] == [0] and len(result["tasks"]) == 4
    ran, notes = available_methods()
    assert list(result["methods"]) == [spec.name for spec in ran]
    assert len(result["skipped"]) + len(ran) == len(METHODS) and result["skipped"] == notes
    assert {"lora", FULL} <= set(result["methods"])
    assert result["labels"] == {name: LABELS[name] for name in result["methods"]}
    assert set(result["comparisons"]) == set(result["methods"]) - {"lora"}
    assert len(result["verdict"]) == len(result["comparisons"])


def test_accuracy_matrices_have_one_row_per_stage_and_one_column_per_task(quick):
    _, result = quick
    size = len(result["tasks"])
    assert len(result["runs"]) == len(result["methods"])
    for run in result["runs"]:
        for matrix in (run["test"], run["val"]):
            assert len(matrix) == size and all(len(row) == size for row in matrix)
            assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
        assert len(run["start"]) == len(run["lrs"]) == len(run["candidates"]) == len(run["stats"]) == size - 1
        assert run["test"][0] == pytest.approx([c["mean"] for c in result["pretrained"]], abs=ROUNDED)
        for mean_row, row in zip(result["methods"][run["method"]]["matrix"]["mean"], run["test"]):
            assert mean_row == pytest.approx(row, abs=ROUNDED)
    assert result["pretrained"][0]["mean"] > 0.9       # the pretraining task (chance 0.25)


def test_every_method_starts_each_task_from_the_merged_previous_model(quick):
    """Task t starts (after next_task: W <- W + what the method keeps, fresh zero adapters) scoring as
    the model task t - 1 ended with; task 1 starts from the pretrained model."""
    _, result = quick
    for run in result["runs"]:
        tolerance = START_TOLERANCE.get(run["method"], ROUNDED)
        for t, start in enumerate(run["start"]):
            assert start == pytest.approx(run["test"][t], abs=tolerance), (run["method"], t)
        for stats in run["stats"]:      # fresh adapters each task: step counts restart (3 epochs x 4 batches)
            assert stats.get("optimizer_steps", 12.0) == 12.0, run["method"]
        if run["method"] == "cascade_lora":
            assert [s["cascades"] for s in run["stats"]] == [2.0] * 3     # a stage per epoch, each task anew


def test_training_improves_the_current_task(quick):
    """Each task ends at least where it started and, over the sequence, clearly above (2-way tasks
    start near 0.5; the quick budget is 12 steps a task). Where Selective LoRA switched every block
    off (TAPS's penalty can, in a short budget), the task ends exactly where it started."""
    _, result = quick
    for run in result["runs"]:
        gains = []
        for t, start in enumerate(run["start"], 1):
            gains.append(run["test"][t][t] - start[t])
            if run["stats"][t - 1].get("active", 1.0) == 0.0:
                assert run["test"][t] == pytest.approx(start, abs=ROUNDED), (run["method"], t)
            else:
                assert gains[-1] >= -ROUNDED, (run["method"], t)
        assert sum(gains) / len(gains) > 0.1, run["method"]
    methods = result["methods"]
    assert methods["lora"]["learning_accuracy"]["mean"] > 0.9
    assert methods[FULL]["learning_accuracy"]["mean"] > 0.9


def test_summary_metrics_follow_from_the_matrices(quick):
    _, result = quick
    for run in result["runs"]:
        row, r = result["methods"][run["method"]], run["test"]
        last = r[-1]
        forgetting = [max(r[i][j] for i in range(j, 3)) - last[j] for j in range(3)]
        assert row["forgetting"]["mean"] == pytest.approx(sum(forgetting) / 3, abs=ROUNDED)
        assert [c["mean"] for c in row["forgetting_per_task"]] == pytest.approx(forgetting, abs=ROUNDED)
        assert row["average_accuracy"]["mean"] == pytest.approx(sum(last) / 4, abs=ROUNDED)
        assert row["learning_accuracy"]["mean"] == pytest.approx((r[1][1] + r[2][2] + r[3][3]) / 3, abs=ROUNDED)


def test_parameter_counts(quick):
    _, result = quick
    methods = result["methods"]
    total = sum(p.numel() for p in MLP().parameters())
    assert methods[FULL]["trainable"] == total
    assert all(0 < row["trainable"] < total for name, row in methods.items() if name != FULL)


# A hand-computed matrix: R[0][1] (task 1 before it is learned) is high and must not count as forgetting;
# task 0 peaks after stage 1, not when it was learned.
MATRIX = [[0.90, 0.99, 0.20],
          [0.95, 0.80, 0.30],
          [0.60, 0.75, 0.90]]


def test_forgetting_average_and_learning_accuracy_of_a_hand_computed_matrix():
    assert forgetting_per_task(MATRIX) == pytest.approx([0.95 - 0.60, 0.80 - 0.75])
    assert average_forgetting(MATRIX) == pytest.approx(0.20)
    assert average_accuracy(MATRIX) == pytest.approx(0.75)
    assert learning_accuracy(MATRIX) == pytest.approx(0.85)
    assert forgetting_per_task([[0.5, 0.1], [0.7, 0.9]]) == pytest.approx([-0.2])   # backward transfer


def test_select_keeps_the_best_current_task_then_the_best_retention():
    candidates = [{"lr": 1e-3, "val": [0.9, 0.8, 0.7]}, {"lr": 1e-2, "val": [0.5, 0.6, 0.9]},
                  {"lr": 3e-2, "val": [0.8, 0.7, 0.9]}, {"lr": 1e-1, "val": [0.8, 0.7, 0.9]}]
    assert select(candidates, 2) == 2       # ties on task 2: better earlier tasks, then the smaller lr
    assert select(candidates, 1) == 0


def _runs(method, matrices):
    return [SimpleNamespace(method=method, seed=seed, test=m) for seed, m in enumerate(matrices)]


def _matrix(forget, learn):
    """A 3 x 3 matrix with learning accuracy ``learn`` and average forgetting ``forget``."""
    return [[0.9, 0.1, 0.1], [0.9, learn, 0.1], [0.9 - 2 * forget, learn, learn]]


def test_compare_verdicts():
    lora = _runs("lora", [_matrix(0.20, 0.9), _matrix(0.22, 0.9), _matrix(0.18, 0.9)])
    cases = {"forgets less than lora": [0.10, 0.12, 0.08], "forgets more than lora": [0.30, 0.31, 0.29],
             "no clear difference from lora": [0.10, 0.30, 0.20]}
    for verdict, forget in cases.items():
        comparison = compare(lora + _runs("x", [_matrix(f, 0.9) for f in forget]), "x")
        assert comparison["verdict"] == verdict
        assert comparison["forgetting"]["mean"] == pytest.approx(sum(forget) / 3 - 0.2)
    weak = compare(lora + _runs("x", [_matrix(0.0, 0.6) for _ in range(3)]), "x")
    assert weak["verdict"] == "learns less than lora" and weak["learning_accuracy"]["mean"] == pytest.approx(-0.3)


def test_ablations_are_compared_with_their_method_and_with_lora(ablations):
    result = ablations
    names = {"lora", "selective_lora", "rank_selective_lora", "cascade_lora"} | {s.name for s in ABLATIONS}
    assert set(result["methods"]) == names and result["settings"]["steps_per_task"] == 12
    assert result["ablation_of"] == {s.name: s.ablation_of for s in ABLATIONS}
    assert set(result["ablation_comparisons"]) == {s.name for s in ABLATIONS}
    for name, comparison in result["ablation_comparisons"].items():
        assert comparison["baseline"] == result["ablation_of"][name]
    assert len(result["ablation_verdict"]) == len(ABLATIONS)
    assert set(result["comparisons"]) == names - {"lora"}


def test_rule_activity_is_recorded_per_task(ablations):
    methods = ablations["methods"]
    expected = {"rank_selective_lora": {"active_ranks", "kappa"}, "selective_lora": {"active", "gate_changes"},
                "cascade_lora": {"cascades"}, "lora": set()}
    for name, keys in expected.items():
        activity = methods[name]["rule_activity"]
        assert set(activity) == keys, name
        assert all(len(cell["mean"]) == 3 for cell in activity.values())
    codyra = methods["rank_selective_lora"]["rule_activity"]["active_ranks"]["mean"]
    dense = methods["rank_selective_lora_no_threshold"]["rule_activity"]["active_ranks"]["mean"]
    assert dense == [8.0] * 3                   # kappa_max = 0: every rank kept
    assert all(k < 8.0 for k in codyra)         # the full schedule prunes within each task
    assert methods["rank_selective_lora_scale2"]["rule_activity"]["active_ranks"]["mean"] != [8.0] * 3
    for run in ablations["runs"]:
        if run["method"].startswith("rank_selective_lora"):
            assert all(s["total_steps"] == 12.0 and s["kappa"] == 0.0 for s in run["stats"])   # schedule done
    assert methods["cascade_lora_one_stage"]["rule_activity"]["cascades"]["mean"] == [0.0] * 3
    assert methods["cascade_lora_no_noise"]["rule_activity"]["cascades"]["mean"] == [2.0] * 3
    off = methods["selective_lora_no_penalty"]["rule_activity"]
    assert off["gate_changes"]["mean"] == [0.0] * 3 and off["active"]["mean"] == [1.0] * 3


def test_selective_lora_without_penalty_and_gate_flips_is_lora(ablations):
    """No penalty and no gate flip: the same init and batches as LoRA, the same accuracies."""
    runs = {run["method"]: run for run in ablations["runs"]}
    for row, lora_row in zip(runs["selective_lora_no_penalty"]["test"], runs["lora"]["test"]):
        assert row == pytest.approx(lora_row, abs=ROUNDED)

"""Continual-learning metrics of an accuracy matrix, their summary over seeds and the comparison
with LoRA.

R[i][j] is the test accuracy on task j after stage i (stage 0 = pretraining on task 0, stage t =
task t learned), i, j = 0..T. With T the last stage:
- average accuracy       A_T = mean_j R[T][j] over all T + 1 tasks (task 0 included);
- forgetting of task j   f_j = max_{j <= i < T} R[i][j] - R[T][j] (best accuracy it had once learned,
                         minus its final one), j = 0..T-1; average forgetting = mean_j f_j;
- learning accuracy      mean_{t >= 1} R[t][t] (how well each new task is learned when it ends).
Selection uses validation accuracies (see train.select); every reported number is a test accuracy.
"""
from __future__ import annotations

import math
from collections import defaultdict

# A difference counts only beyond both: 2 standard errors over seeds, and one point of accuracy.
MIN_EFFECT = 0.01


def forgetting_per_task(matrix: list[list[float]]) -> list[float]:
    """f_j for j = 0..T-1 of a (T+1) x (T+1) accuracy matrix."""
    last = len(matrix) - 1
    return [max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]


def average_forgetting(matrix: list[list[float]]) -> float:
    per_task = forgetting_per_task(matrix)
    return sum(per_task) / len(per_task)


def average_accuracy(matrix: list[list[float]]) -> float:
    return sum(matrix[-1]) / len(matrix[-1])


def learning_accuracy(matrix: list[list[float]]) -> float:
    return sum(matrix[t][t] for t in range(1, len(matrix))) / (len(matrix) - 1)


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def run_metrics(run) -> dict[str, float]:
    """The three summary metrics of one run's test accuracy matrix."""
    return {"average_accuracy": average_accuracy(run.test), "forgetting": average_forgetting(run.test),
            "learning_accuracy": learning_accuracy(run.test)}


def by_method(runs) -> dict[str, list]:
    """method -> its runs sorted by seed (methods in first-seen order)."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[run.method].append(run)
    return {name: sorted(rs, key=lambda r: r.seed) for name, rs in grouped.items()}


# What each method's rule did, from its adapters' extra_stats at the end of each task (means over the
# adapted layers): CoDyRA's ranks with w != 0 (of r) and kappa (0 once its schedule is done), Selective
# LoRA's blocks switched on (a fraction) and gate flips, LoRASC's stages folded within the task.
RULE_STATS = ("active_ranks", "kappa", "active", "gate_changes", "cascades")


def rule_activity(rs) -> dict[str, dict]:
    """key -> {"mean", "std"}: lists over tasks 1..T of that stat's mean and std over seeds (the stats
    of RULE_STATS the method reports)."""
    keys = [k for k in RULE_STATS if k in rs[0].stats[0]]
    activity = {}
    for key in keys:
        cells = [mean_std([r.stats[t].get(key, 0.0) for r in rs]) for t in range(len(rs[0].stats))]
        activity[key] = {"mean": [c["mean"] for c in cells], "std": [c["std"] for c in cells]}
    return activity


def summarize(runs) -> dict[str, dict]:
    """Per method over seeds: the three metrics, the accuracy matrix and per-task forgetting (mean and
    std elementwise), selected lrs per task, trainable parameters, training seconds, final adapter stats,
    the rule's activity at the end of each task (rule_activity)."""
    summary = {}
    for name, rs in by_method(runs).items():
        metrics = [run_metrics(r) for r in rs]
        size = len(rs[0].test)
        row = {key: mean_std([m[key] for m in metrics]) for key in metrics[0]}
        cells = [[mean_std([r.test[i][j] for r in rs]) for j in range(size)] for i in range(size)]
        row["matrix"] = {"mean": [[c["mean"] for c in line] for line in cells],
                         "std": [[c["std"] for c in line] for line in cells]}
        per_task = [forgetting_per_task(r.test) for r in rs]
        row["forgetting_per_task"] = [mean_std([f[j] for f in per_task]) for j in range(size - 1)]
        row["selected_lr"] = [r.lrs for r in rs]
        row["trainable"] = rs[0].trainable
        row["seconds"] = mean_std([r.seconds for r in rs])
        keys = sorted({k for r in rs for k in r.stats[-1]} - {"layers"})
        row["final_stats"] = {k: mean_std([r.stats[-1].get(k, 0.0) for r in rs])["mean"] for k in keys}
        row["rule_activity"] = rule_activity(rs)
        summary[name] = row
    return summary


def _paired(values: list[float]) -> dict:
    diff = mean_std(values)
    threshold = max(2.0 * diff["std"] / math.sqrt(len(values)), MIN_EFFECT)
    sign = 1 if diff["mean"] > threshold else -1 if diff["mean"] < -threshold else 0
    return {**diff, "threshold": threshold, "sign": sign}


def compare(runs, method: str, baseline: str = "lora") -> dict:
    """Paired per seed: method minus baseline in forgetting, learning accuracy and average accuracy.

    A difference is clear when |mean| > max(2 standard errors, MIN_EFFECT). Learning accuracy is
    matched unless clearly lower. Verdict: "forgets less" / "forgets more" (clear forgetting
    difference at matched learning accuracy), "learns less" (learning accuracy clearly lower: no
    matched comparison), else "no clear difference".
    """
    grouped = by_method(runs)
    ours = {r.seed: run_metrics(r) for r in grouped[method]}
    theirs = {r.seed: run_metrics(r) for r in grouped[baseline]}
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        raise ValueError(f"no common seeds for {method!r} and {baseline!r}")
    diffs = {key: _paired([ours[s][key] - theirs[s][key] for s in seeds])
             for key in ("forgetting", "learning_accuracy", "average_accuracy")}
    if diffs["learning_accuracy"]["sign"] < 0:
        verdict = f"learns less than {baseline}"
    elif diffs["forgetting"]["sign"] < 0:
        verdict = f"forgets less than {baseline}"
    elif diffs["forgetting"]["sign"] > 0:
        verdict = f"forgets more than {baseline}"
    else:
        verdict = f"no clear difference from {baseline}"
    return {"baseline": baseline, "seeds": seeds, **diffs, "verdict": verdict}


def verdict_line(label: str, comparison: dict) -> str:
    """One sentence stating the comparison's verdict with its numbers."""
    f, la, acc = (comparison[k] for k in ("forgetting", "learning_accuracy", "average_accuracy"))
    n = len(comparison["seeds"])
    caveat = " (one seed: no noise estimate)" if n == 1 else ""
    return (f"{label}: {comparison['verdict']}: forgetting {f['mean']:+.3f} ± {f['std']:.3f} "
            f"(threshold ±{f['threshold']:.3f}), learning accuracy {la['mean']:+.3f} ± {la['std']:.3f} "
            f"(±{la['threshold']:.3f}), average accuracy {acc['mean']:+.3f} ± {acc['std']:.3f}, "
            f"paired over {n} seed(s){caveat}.")


def lr_edge_notes(summary: dict, grids: dict[str, tuple]) -> list[str]:
    """A note for each method whose selected lr sits at an end of its grid (maybe under-tuned)."""
    notes = []
    for name, row in summary.items():
        grid = grids[name]
        if len(grid) < 2:
            continue
        chosen = [lr for lrs in row["selected_lr"] for lr in lrs]
        for edge, word in ((min(grid), "smallest"), (max(grid), "largest")):
            count = sum(lr == edge for lr in chosen)
            if count:
                notes.append(f"{name}: the selected lr is its grid's {word} ({edge:g}) in {count} of "
                             f"{len(chosen)} task runs; a wider grid might change its numbers.")
    return notes

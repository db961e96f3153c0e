"""Forgetting metrics, learning-rate selection, matched-accuracy comparison and the verdict.

Runs are objects with .method, .lr, .seed, .trajectory (points with step, val_a, val_b,
test_a, test_b) and .final (see train.Run). Selection always uses validation accuracies;
reported numbers are test accuracies.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

# A difference counts only beyond both: 2 standard errors over seeds, and one point of accuracy.
MIN_EFFECT = 0.01
# Task-B accuracies within this of each other count as matched (about 2 validation images).
MATCH_TOLERANCE = 0.01


def output_drift(reference: Tensor, logits: Tensor) -> dict[str, float]:
    """Drift of logits (N, C) from the pretrained ``reference`` (N, C) on the same inputs:
    kl = mean_n KL(softmax(reference_n) || softmax(logits_n)) (nats);
    rel_l2 = mean_n ||logits_n - reference_n|| / mean_n ||reference_n||."""
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                  reduction="batchmean")
    rel = (logits - reference).norm(dim=-1).mean() / reference.norm(dim=-1).mean()
    return {"kl": float(kl), "rel_l2": float(rel)}


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def group_runs(runs) -> dict[str, dict[int, list]]:
    """method -> seed -> runs (one per learning rate)."""
    grouped: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run.method][run.seed].append(run)
    return grouped


def select_run(runs):
    """The learning rate chosen for a (method, seed): best final task-B validation accuracy
    (ties: better task-A validation accuracy, then the smaller lr)."""
    return max(runs, key=lambda r: (r.final["val_b"], r.final["val_a"], -r.lr))


def summarize(runs) -> dict[str, dict]:
    """Per method, over seeds at each seed's selected lr: test_b, test_a, drop_a (pretrained
    test_a minus after), kl, rel_l2, seconds, trainable, adapter stats; plus every lr's means."""
    summary = {}
    for method, by_seed in group_runs(runs).items():
        chosen = [select_run(rs) for _, rs in sorted(by_seed.items())]
        row = {key: mean_std([r.final[key] for r in chosen]) for key in ("test_b", "test_a", "kl", "rel_l2")}
        row["drop_a"] = mean_std([r.trajectory[0]["test_a"] - r.final["test_a"] for r in chosen])
        row["seconds"] = mean_std([r.seconds for r in chosen])
        row["trainable"] = chosen[0].trainable
        row["selected_lr"] = [r.lr for r in chosen]
        keys = sorted({k for r in chosen for k in r.stats})
        row["stats"] = {k: mean_std([r.stats.get(k, 0.0) for r in chosen])["mean"] for k in keys}
        per_lr = defaultdict(list)
        for rs in by_seed.values():
            for r in rs:
                per_lr[r.lr].append(r)
        row["per_lr"] = {f"{lr:g}": {k: mean_std([r.final[k] for r in rs])["mean"]
                                      for k in ("test_b", "test_a", "kl")}
                         for lr, rs in sorted(per_lr.items())}
        summary[method] = row
    return summary


def _points(runs):
    return [(run, p) for run in runs for p in run.trajectory[1:]]


def best_retention_at(runs, target: float) -> dict:
    """Among all evaluations after training started (every lr, every epoch) whose task-B
    validation accuracy reaches ``target``, the one with the best task-A validation accuracy."""
    run, point = max(((r, p) for r, p in _points(runs) if p["val_b"] >= target),
                     key=lambda rp: (rp[1]["val_a"], rp[1]["val_b"]))
    return {"lr": run.lr, **point}


def matched_comparison(runs, method: str, baseline: str = "lora") -> dict:
    """Task-A retention of ``method`` minus ``baseline``'s at matched task-B accuracy, per seed.

    Per seed the target is the lower of the two methods' best task-B validation accuracy
    (the level both reach) minus MATCH_TOLERANCE; each method's point is its best task-A validation accuracy
    among evaluations reaching the target; the difference is of those points' test task-A
    accuracies. Verdict: "forgets less" / "forgets more" when the mean difference exceeds
    both 2 standard errors over seeds and MIN_EFFECT, else "no clear difference".
    """
    grouped = group_runs(runs)
    seeds = sorted(set(grouped[method]) & set(grouped[baseline]))
    if not seeds:
        raise ValueError(f"no common seeds for {method!r} and {baseline!r}")
    per_seed = []
    for seed in seeds:
        ours, theirs = grouped[method][seed], grouped[baseline][seed]
        reach = {m: max(p["val_b"] for _, p in _points(rs)) for m, rs in ((method, ours), (baseline, theirs))}
        target = min(reach.values()) - MATCH_TOLERANCE
        mine, base = best_retention_at(ours, target), best_retention_at(theirs, target)
        per_seed.append({"seed": seed, "target_val_b": target, "best_val_b": reach[method],
                         "baseline_best_val_b": reach[baseline], "point": mine, "baseline_point": base,
                         "diff_test_a": mine["test_a"] - base["test_a"]})
    diff = mean_std([s["diff_test_a"] for s in per_seed])
    standard_error = diff["std"] / math.sqrt(len(per_seed))
    threshold = max(2.0 * standard_error, MIN_EFFECT)
    verdict = (f"forgets less than {baseline}" if diff["mean"] > threshold else
               f"forgets more than {baseline}" if diff["mean"] < -threshold else
               f"no clear difference from {baseline}")
    return {"baseline": baseline, "seeds": per_seed, "diff_test_a": diff, "threshold": threshold,
            "verdict": verdict,
            "target_val_b": mean_std([s["target_val_b"] for s in per_seed])["mean"],
            "best_val_b": mean_std([s["best_val_b"] for s in per_seed])["mean"],
            "baseline_best_val_b": mean_std([s["baseline_best_val_b"] for s in per_seed])["mean"]}


def verdict_line(name: str, label: str, comparison: dict) -> str:
    """One sentence stating the comparison's verdict with its numbers."""
    d = comparison["diff_test_a"]
    n = len(comparison["seeds"])
    caveat = " (one seed: no noise estimate)" if n == 1 else ""
    reach = (f"; it reaches task-B val acc {comparison['best_val_b']:.3f} vs {comparison['baseline']}'s "
             f"{comparison['baseline_best_val_b']:.3f}")
    return (f"{label} ({name}): {comparison['verdict']} at matched task-B accuracy "
            f"(val acc >= {comparison['target_val_b']:.3f}): task-A test accuracy "
            f"{d['mean']:+.3f} ± {d['std']:.3f} over {n} seed(s), threshold ±{comparison['threshold']:.3f}"
            f"{caveat}{reach}.")


def lr_edge_notes(summary: dict, lr_grid) -> list[str]:
    """A note for each method whose selected lr sits at an end of the grid (maybe under-tuned)."""
    if len(lr_grid) < 2:
        return []
    notes = []
    for method, row in summary.items():
        for edge, word in ((min(lr_grid), "smallest"), (max(lr_grid), "largest")):
            count = sum(lr == edge for lr in row["selected_lr"])
            if count:
                notes.append(f"{method}: the selected lr is the grid's {word} ({edge:g}) in {count} of "
                             f"{len(row['selected_lr'])} seed(s); a wider grid might change its numbers.")
    return notes

"""Text table, JSON file and plot of a benchmark result (see runner.run_benchmark)."""
from __future__ import annotations

import json
from pathlib import Path


def _pm(cell: dict, digits: int = 3) -> str:
    return f"{cell['mean']:.{digits}f}±{cell['std']:.{digits}f}"


def format_table(result: dict) -> str:
    """Per method: the metrics (mean±std over seeds) and the mean accuracy matrix."""
    labels = result["labels"]
    header = (f"{'method':<18}" + "".join(f" {h:>13}" for h in ("learned", "final avg", "forgetting"))
              + f"{'trainable':>11}{'s/seq':>7}  final adapter stats")
    lines = [f"scenario {result['scenario']}: {result['description']}",
             "pretrained test accuracy per task: " + ", ".join(
                 f"{name} {_pm(cell)}" for name, cell in zip(result["tasks"], result["pretrained"])),
             header, "-" * len(header)]
    for name, row in result["methods"].items():
        cells = "".join(f" {_pm(row[k]):>13}" for k in ("learning_accuracy", "average_accuracy", "forgetting"))
        stats = ", ".join(f"{k}={v:.3g}" for k, v in row["final_stats"].items())
        lines.append(f"{labels[name]:<18}{cells}{row['trainable']:>11,}{row['seconds']['mean']:>7.2f}  {stats}")
    lines.append("\naccuracy matrices (row: after stage i, column: task j; mean over seeds):")
    for name, row in result["methods"].items():
        lrs = "; ".join("/".join(f"{lr:g}" for lr in lrs) for lrs in row["selected_lr"])
        lines.append(f"  {labels[name]} (lr per task, per seed: {lrs})")
        lines += ["    " + " ".join(f"{v:.3f}" for v in line) for line in row["matrix"]["mean"]]
    activity = [(name, row["rule_activity"]) for name, row in result["methods"].items() if row.get("rule_activity")]
    if activity:
        lines.append("\nrule activity at the end of each task (mean over adapted layers, then over seeds):")
        for name, stats in activity:
            cells = "; ".join(f"{k} " + "/".join(f"{v:.3g}" for v in cell["mean"]) for k, cell in stats.items())
            lines.append(f"  {labels[name]}: {cells}")
    return "\n".join(lines + [f"protocol: {result['protocol']}"])


def _rounded(value, digits: int = 5):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def save_json(result: dict, path: Path) -> None:
    """Indented JSON, except "runs": one compact line per run (floats rounded to 5 digits)."""
    head = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1)
    runs = ",\n".join("  " + json.dumps(_rounded(run), separators=(",", ":")) for run in result["runs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{head[:-2]},\n "runs": [\n{runs}\n ]\n}}\n')


def seen_average(matrix: list[list[float]]) -> list[float]:
    """Mean accuracy over the tasks learned so far, after each stage: mean_{j <= i} R[i][j]."""
    return [sum(row[:i + 1]) / (i + 1) for i, row in enumerate(matrix)]


def save_plot(result: dict, runs, path: Path) -> None:
    """Left: mean accuracy over the tasks seen so far after each stage (markers and error bars: mean
    ± std over seeds; faint lines: single seeds). Right: learning accuracy vs average forgetting
    (error bars: std over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import by_method, mean_std, run_metrics

    grouped = by_method(runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    for index, (name, label) in enumerate(result["labels"].items()):
        color, marker = plt.cm.tab10.colors[index % 10], "osD^vPX<>"[index % 9]
        curves = [seen_average(r.test) for r in grouped[name]]
        stages = range(len(curves[0]))
        for curve in curves:
            left.plot(stages, curve, color=color, alpha=0.15, linewidth=0.8)
        cells = [mean_std([c[i] for c in curves]) for i in stages]
        offset = (index - len(result["labels"]) / 2) * 0.03
        left.errorbar([i + offset for i in stages], [c["mean"] for c in cells], yerr=[c["std"] for c in cells],
                      color=color, marker=marker, capsize=3, label=label)
        metrics = [run_metrics(r) for r in grouped[name]]
        f, la = (mean_std([m[k] for m in metrics]) for k in ("forgetting", "learning_accuracy"))
        right.errorbar(f["mean"], la["mean"], xerr=f["std"], yerr=la["std"], color=color, marker=marker,
                       capsize=3, label=label)
    seeds = len(result["seeds"])
    left.set_xticks(list(range(len(result["tasks"]))))
    left.set_xticklabels(["pretrained"] + [f"after {t}" for t in result["tasks"][1:]], fontsize=8)
    left.set_ylabel("mean test accuracy over the tasks seen so far")
    left.set_title(f"error bars: mean ± std over {seeds} seed(s); faint lines: single seeds", fontsize=9)
    right.set_xlabel("average forgetting (best accuracy once learned - final; lower is better)")
    right.set_ylabel("learning accuracy (each new task when it ends)")
    right.set_title("error bars: std over seeds", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    right.legend(fontsize=8, loc="best")
    fig.suptitle(f"continual digits, {result['scenario']}: {result['description']}; "
                 f"{result['settings']['epochs_per_task']} epochs per task", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Text table, JSON file and trade-off plot of a benchmark result (see runner.run_benchmark)."""
from __future__ import annotations

import json
from pathlib import Path


def _pm(cell: dict, digits: int = 3) -> str:
    return f"{cell['mean']:.{digits}f}±{cell['std']:.{digits}f}"


def _stats(stats: dict) -> str:
    layers = stats.get("layers", 0.0)
    return ", ".join(f"{k}={v:g}" for k, v in stats.items() if k != "layers") + \
        (f" (mean per layer, {layers:g} layers)" if layers and len(stats) > 1 else "")


def format_table(result: dict) -> str:
    """The per-method table (mean±std over seeds at each seed's selected lr)."""
    pre = result["pretrained"]
    header = (f"{'method':<20}" + "".join(f" {h:>14}" for h in ("task-B acc", "task-A acc", "A drop", "KL(A)",
                                                                "rel L2(A)")) + f"{'trainable':>11}{'s/run':>7}  lr; stats")
    lines = [f"scenario {result['scenario']}: {result['description']}",
             f"pretrained: task-A test acc {_pm(pre['test_a'])}, task-B test acc (before fine-tuning) "
             f"{_pm(pre['test_b'])}", header, "-" * len(header)]
    for name, row in result["methods"].items():
        lrs = "/".join(f"{lr:g}" for lr in row["selected_lr"])
        cells = "".join(f" {_pm(row[k]):>14}" for k in ("test_b", "test_a", "drop_a", "kl", "rel_l2"))
        stats = _stats(row["stats"])
        lines.append(f"{name:<20}{cells}{row['trainable']:>11,}{row['seconds']['mean']:>7.2f}  lr {lrs}"
                     + (f"; {stats}" if stats else ""))
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


def save_plot(result: dict, runs, path: Path) -> None:
    """Task-B test accuracy vs task-A retention: mean±std per method at its selected lr, with
    its seed-averaged training trajectory (thin line from the pretrained point)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import group_runs, select_run

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    pre = result["pretrained"]
    ax.scatter([pre["test_a"]["mean"]], [pre["test_b"]["mean"]], marker="*", s=180, c="black",
               label="pretrained", zorder=3)
    for (name, row), color, marker in zip(result["methods"].items(), plt.cm.tab10.colors, "osD^vPX<>"):
        chosen = [select_run(rs) for rs in group_runs(runs)[name].values()]
        steps = len(chosen[0].trajectory)
        path_a = [sum(r.trajectory[i]["test_a"] for r in chosen) / len(chosen) for i in range(steps)]
        path_b = [sum(r.trajectory[i]["test_b"] for r in chosen) / len(chosen) for i in range(steps)]
        ax.plot(path_a, path_b, color=color, alpha=0.35, linewidth=1)
        ax.errorbar(row["test_a"]["mean"], row["test_b"]["mean"], xerr=row["test_a"]["std"],
                    yerr=row["test_b"]["std"], fmt=marker, color=color, alpha=0.85, capsize=3, label=name, zorder=3)
    ax.set_xlabel("task-A test accuracy after fine-tuning (retention)")
    ax.set_ylabel("task-B test accuracy")
    ax.set_title(f"continual digits, {result['scenario']}: {len(result['seeds'])} seed(s), "
                 f"{result['settings']['epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

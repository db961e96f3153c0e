"""The benchmark: pretrain on task 0, learn tasks 1..T with every method, compare forgetting."""
from __future__ import annotations

from dataclasses import asdict

from tqdm import tqdm

from .data import load_scenario
from .methods import available_methods
from .metrics import MIN_EFFECT, compare, lr_edge_notes, mean_std, summarize, verdict_line
from .model import pretrain
from .train import evaluate, run_sequence, steps_per_epoch

PROTOCOL = ("R[i][j] = test accuracy on task j after stage i (0 = pretrained); mean±std over seeds; "
            "per seed and task each method keeps the lr of its grid with the best validation accuracy on "
            "that task (ties: earlier tasks' validation accuracy, then the smaller lr), and the next task "
            "starts from that model after fastlora.next_task; average accuracy = mean of the last row, "
            "forgetting = mean over tasks 0..T-1 of (best accuracy since learned - final), learning "
            "accuracy = mean of R[t][t], t >= 1; comparisons with LoRA are paired per seed and a "
            f"difference counts beyond max(2 standard errors, {MIN_EFFECT}); learning accuracy is matched "
            "unless clearly lower.")


def run_benchmark(scenario: str = "split", seeds=(0, 1, 2, 3, 4), epochs: int = 20, pretrain_epochs: int = 60,
                  rank: int = 8, quick_lr: bool = False, methods=None, progress: bool = True,
                  ablations: bool = False) -> tuple[dict, list]:
    """(result dict, runs). Every method: the same pretrained model, splits, epochs and batches per
    task; its own lr grid (or its single quick_lr). With ``ablations`` (methods.ABLATIONS), each ablation
    is also compared, paired per seed, with the method it changes one knob of, when that one ran."""
    specs, notes = available_methods(methods, ablations)
    for note in notes:
        tqdm.write(note)
    if not any(s.name == "lora" for s in specs):
        raise ValueError("LoRA (the baseline of the comparison) must be among the methods")
    grids = {s.name: (s.quick_lr,) if quick_lr else s.lr_grid for s in specs}
    runs, pretrained, description, names = [], [], "", []
    with tqdm(total=len(specs) * len(seeds), desc=f"continual {scenario}", disable=not progress) as bar:
        for seed in seeds:
            data = load_scenario(scenario, seed)
            description, names = data.description, [t.name for t in data.tasks]
            model = pretrain(data.tasks[0], seed, pretrain_epochs)
            pretrained.append(evaluate(model, data.tasks)["test"])
            for spec in specs:
                bar.set_postfix_str(f"seed {seed} {spec.name}")
                runs.append(run_sequence(model, data, spec, grids[spec.name], seed, epochs, rank))
                bar.update()
    summary = summarize(runs)
    labels = {s.name: s.label for s in specs}
    comparisons = {name: compare(runs, name) for name in summary if name != "lora"}
    ablation_comparisons = {s.name: compare(runs, s.name, s.ablation_of) for s in specs
                            if s.ablation_of is not None and s.ablation_of in summary}
    result = {
        "scenario": scenario, "description": description, "tasks": names, "seeds": list(seeds),
        "protocol": PROTOCOL,
        "settings": {"epochs_per_task": epochs, "steps_per_task": epochs * steps_per_epoch(data.tasks[1], 64),
                     "pretrain_epochs": pretrain_epochs, "rank": rank, "batch_size": 64,
                     "optimizer": "Adam, new per task", "model": "MLP 64-128-128-10, ReLU; adapters on fc1, fc2, head",
                     "lr_grid": {name: list(grid) for name, grid in grids.items()}},
        "labels": labels,
        "skipped": notes,
        "notes": [] if quick_lr else lr_edge_notes(summary, grids),
        "pretrained": [mean_std([p[j] for p in pretrained]) for j in range(len(names))],
        "methods": summary,
        "comparisons": comparisons,
        "verdict": [verdict_line(labels[name], c) for name, c in comparisons.items()],
        "ablation_of": {s.name: s.ablation_of for s in specs if s.ablation_of is not None},
        "ablation_comparisons": ablation_comparisons,
        "ablation_verdict": [verdict_line(f"{labels[name]} vs {labels[c['baseline']]}", c)
                             for name, c in ablation_comparisons.items()],
        "runs": [asdict(run) for run in runs],
    }
    return result, runs

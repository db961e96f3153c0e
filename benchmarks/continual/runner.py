"""The benchmark: pretrain on task A, fine-tune every method on task B, compare forgetting."""
from __future__ import annotations

from dataclasses import asdict

from tqdm import tqdm

from .data import load_scenario
from .methods import FULL, available_methods
from .metrics import MATCH_TOLERANCE, MIN_EFFECT, lr_edge_notes, matched_comparison, mean_std, summarize, verdict_line
from .model import accuracy, pretrain
from .train import fine_tune

LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
VERDICT_METHODS = {"selective_lora": "Selective LoRA", "rank_selective_lora": "CoDyRA", "curlora": "CURLoRA"}
CONTEXT_METHODS = {"neat": "NEAT", "cascade_lora": "LoRASC", FULL: "Full fine-tuning"}
PROTOCOL = ("accuracies are test accuracies, mean±std over seeds; per seed each method's lr is the one "
            "with the best final task-B validation accuracy; drift is measured on task-A test inputs vs "
            "the pretrained logits; 'matched' compares task-A accuracy at the best point (any lr, any "
            "epoch, chosen on validation) reaching the task-B validation level both methods reach, minus "
            f"{MATCH_TOLERANCE}; a verdict needs |mean difference| > max(2 standard errors, {MIN_EFFECT}).")


def run_benchmark(scenario: str = "split", seeds=(0, 1, 2, 3, 4), epochs: int = 20, pretrain_epochs: int = 60,
                  rank: int = 8, lr_grid=LR_GRID, quick_lr: bool = False, methods=None,
                  progress: bool = True) -> tuple[dict, list]:
    """(result dict, runs). Every method: the same epochs, batches and lr grid (or its single
    quick_lr); per seed a fresh pretrained model, split and adapter init."""
    specs, notes = available_methods(methods)
    for note in notes:
        tqdm.write(note)
    if not any(s.name == "lora" for s in specs):
        raise ValueError("LoRA (the baseline of the verdict) must be among the methods")
    total = sum(1 if quick_lr else len(lr_grid) for _ in specs) * len(seeds)
    runs, pretrained_acc, description = [], [], ""
    with tqdm(total=total, desc=f"continual {scenario}", disable=not progress) as bar:
        for seed in seeds:
            data = load_scenario(scenario, seed)
            description = data.description
            model = pretrain(data.task_a, seed, pretrain_epochs)
            pretrained_acc.append((accuracy(model, data.task_a, data.task_a.test),
                                   accuracy(model, data.task_b, data.task_b.test)))
            for spec in specs:
                for lr in ((spec.quick_lr,) if quick_lr else lr_grid):
                    bar.set_postfix_str(f"seed {seed} {spec.name} lr {lr:g}")
                    runs.append(fine_tune(model, data, spec, lr, seed, epochs, rank))
                    bar.update()
    summary = summarize(runs)
    comparisons = {name: matched_comparison(runs, name)
                   for name in (*VERDICT_METHODS, *CONTEXT_METHODS) if name in summary and name != "lora"}
    labels = {**VERDICT_METHODS, **CONTEXT_METHODS}
    verdict = [verdict_line(name, labels[name], c) for name, c in comparisons.items()]
    verdict += [f"{label} ({name}): not run, so no verdict." for name, label in VERDICT_METHODS.items()
                if name not in comparisons]
    result = {
        "scenario": scenario, "description": description, "seeds": list(seeds),
        "protocol": PROTOCOL,
        "settings": {"epochs": epochs, "pretrain_epochs": pretrain_epochs, "rank": rank, "batch_size": 64,
                     "optimizer": "Adam", "model": "MLP 64-128-128-10, ReLU; adapters on fc1, fc2, head",
                     "lr_grid": {s.name: [s.quick_lr] for s in specs} if quick_lr else list(lr_grid)},
        "skipped": notes,
        "notes": [] if quick_lr else lr_edge_notes(summary, lr_grid),
        "pretrained": {"test_a": mean_std([a for a, _ in pretrained_acc]),
                       "test_b": mean_std([b for _, b in pretrained_acc])},
        "methods": summary,
        "matched": comparisons,
        "verdict": verdict,
        "runs": [asdict(run) for run in runs],
    }
    return result, runs

"""Continual-learning benchmark: how much each fastlora method forgets over a task sequence,
offline, on real data (scikit-learn's bundled digits).

Design. An MLP (64-128-128-10) is pretrained in the run on task 0, then learns tasks 1, 2, 3 in
order with each method, rank-8 adapters on every Linear:
- split: task 0 = digits 0-3, then {4, 5}, {6, 7}, {8, 9} (task-incremental: each task scored over its
  own classes of the shared head);
- permuted: task 0 = the digits, then three fixed random pixel permutations of them (shared 10-way head).
Between tasks, ``fastlora.next_task(model)`` applies the method's rule: W <- W + what the method keeps
(what it prunes dropped: Selective LoRA's blocks switched off, CoDyRA's zero ranks), fresh adapters
for the next task. Full fine-tuning (all parameters, a new Adam per task) and plain LoRA are the
references. Per seed and task, each method trains at every lr of its grid from the same start and
keeps the run with the best validation accuracy on that task (train.select); the next task starts
from it.

Reported per method (mean ± std over seeds, test accuracies): the accuracy matrix R[i][j] (task j
after stage i), the average final accuracy, the average forgetting (best accuracy a task had once
learned minus its final one), the learning accuracy (each task when it ends), trainable parameters,
wall time, final adapter stats; and, paired per seed, which methods forget less than LoRA at matched
learning accuracy (metrics.compare).

    python -m benchmarks.continual --scenario split      # 5 seeds, 10 epochs per task
    python -m benchmarks.continual --scenario permuted   # 5 seeds, 6 epochs per task
    python -m benchmarks.continual --quick               # 1 seed, 3 epochs, one lr per method
"""
from .runner import run_benchmark

__all__ = ["run_benchmark"]

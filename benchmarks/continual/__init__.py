"""Continual-learning benchmark: how much each fastlora method forgets, offline, on real data.

An MLP is pretrained in the run on scikit-learn's bundled digits (task A), then fine-tuned
on a new task B with each registered fastlora method and with full fine-tuning (the upper
bound of forgetting), under the same budget and learning-rate grid. Reported per method:
task-B accuracy, task-A accuracy after fine-tuning and its drop, drift of the pretrained
outputs on task-A inputs, trainable parameters, active blocks/ranks, wall time; and a
verdict, computed from the numbers, on whether Selective LoRA, CoDyRA and CURLoRA forget
less than LoRA at matched task-B accuracy.

    python -m benchmarks.continual            # full run (3 seeds, lr sweep)
    python -m benchmarks.continual --quick    # smoke run (1 seed, one lr per method)
"""
from .runner import run_benchmark

__all__ = ["run_benchmark"]

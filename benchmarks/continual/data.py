"""Task sequences on scikit-learn's bundled digits (1797 real 8x8 images, no download).

Task 0 is the pretraining task; tasks 1..T are learned one after another. Every task carries
train/val/test splits of the same image indices (stratified 60/20/20, seeded), so no test image
is ever trained on in any task, and the classes it is scored on (logits restricted to them).

Scenarios:
- split (task-incremental): task 0 = digits 0-3, then {4, 5}, {6, 7}, {8, 9}; each task is
  scored over its own classes of the shared 10-way head.
- permuted (domain-incremental): task 0 = the digits, then the same digits under three fixed
  random pixel permutations (drawn from the seed), all on the shared 10-way head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SCENARIOS = ("split", "permuted")
NUM_CLASSES = 10
NUM_FEATURES = 64
SPLIT_CLASSES = ((0, 1, 2, 3), (4, 5), (6, 7), (8, 9))
PERMUTATIONS = 3


@dataclass(frozen=True)
class Split:
    """x (N, 64) float32 in [0, 1]; y (N,) int64 positions within the task's classes."""

    x: Tensor
    y: Tensor


@dataclass(frozen=True)
class Task:
    """One task: its splits and the model outputs (class ids, int64) it is scored on."""

    name: str
    train: Split
    val: Split
    test: Split
    classes: Tensor


@dataclass(frozen=True)
class Scenario:
    """tasks[0] is the pretraining task, tasks[1:] the sequence learned with each method."""

    name: str
    description: str
    tasks: tuple[Task, ...]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split
    index = np.arange(len(labels))
    train, rest = train_test_split(index, test_size=0.4, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
    return train, val, test


def _task(name: str, x: np.ndarray, y: np.ndarray, splits, classes) -> Task:
    """Restrict every split to ``classes`` and map labels to positions within them."""
    classes = np.asarray(classes, dtype=np.int64)
    position = np.full(NUM_CLASSES, -1, dtype=np.int64)
    position[classes] = np.arange(len(classes))

    def make(index: np.ndarray) -> Split:
        index = index[np.isin(y[index], classes)]
        return Split(torch.from_numpy(np.ascontiguousarray(x[index])), torch.from_numpy(position[y[index]]))

    return Task(name, *(make(s) for s in splits), torch.from_numpy(classes))


def load_scenario(name: str, seed: int) -> Scenario:
    """The scenario ``name`` (one of SCENARIOS) with splits and permutations drawn from ``seed``."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    x, y = _load_digits()
    splits = _split_indices(y, seed)
    if name == "split":
        tasks = tuple(_task(f"digits {c[0]}-{c[-1]}", x, y, splits, c) for c in SPLIT_CLASSES)
        return Scenario(name, "pretrain on digits 0-3, then tasks {4,5}, {6,7}, {8,9} (task-incremental, "
                              "each scored over its own classes)", tasks)
    rng = np.random.default_rng(seed)
    every = np.arange(NUM_CLASSES)
    tasks = [_task("digits", x, y, splits, every)]
    tasks += [_task(f"permutation {k}", x[:, rng.permutation(NUM_FEATURES)], y, splits, every)
              for k in range(1, PERMUTATIONS + 1)]
    return Scenario(name, f"pretrain on the digits, then {PERMUTATIONS} fixed random pixel permutations of "
                          "them (shared 10-way head)", tuple(tasks))

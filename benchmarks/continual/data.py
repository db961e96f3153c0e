"""Continual-learning scenarios on scikit-learn's bundled digits (1797 real 8x8 images, no download).

Task A is the pretraining task, task B the new one. Every task carries train/val/test
splits of the same image indices (stratified 60/20/20, seeded), so no test image is
ever trained on in either task, and the classes it is scored on.

Scenarios (domain-incremental ones share the 10-way head; "split" is task-incremental):
- permuted: B = the digits with a fixed random pixel permutation (permuted-MNIST style).
- rotated:  B = the digits rotated by 90 degrees.
- inverted: B = the digits with inverted intensities (1 - x).
- split:    A = digits 0-4, B = digits 5-9, each scored over its own 5 classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SCENARIOS = ("permuted", "rotated", "inverted", "split")
NUM_CLASSES = 10
NUM_FEATURES = 64


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
    name: str
    description: str
    task_a: Task
    task_b: Task


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


def _task(name: str, x: np.ndarray, y: np.ndarray, splits, classes: np.ndarray) -> Task:
    """Restrict every split to ``classes`` and map labels to positions within them."""
    position = np.full(NUM_CLASSES, -1, dtype=np.int64)
    position[classes] = np.arange(len(classes))

    def make(index: np.ndarray) -> Split:
        index = index[np.isin(y[index], classes)]
        return Split(torch.from_numpy(np.ascontiguousarray(x[index])), torch.from_numpy(position[y[index]]))

    return Task(name, *(make(s) for s in splits), torch.from_numpy(classes))


def _rotate(x: np.ndarray) -> np.ndarray:
    return np.rot90(x.reshape(-1, 8, 8), k=1, axes=(1, 2)).reshape(-1, NUM_FEATURES)


def load_scenario(name: str, seed: int) -> Scenario:
    """The scenario ``name`` (one of SCENARIOS) with splits and permutation drawn from ``seed``."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    x, y = _load_digits()
    splits = _split_indices(y, seed)
    every = np.arange(NUM_CLASSES)
    if name == "split":
        low, high = np.arange(5), np.arange(5, 10)
        return Scenario(name, "A: digits 0-4, B: digits 5-9 (task-incremental, scored per task's classes)",
                        _task("digits 0-4", x, y, splits, low), _task("digits 5-9", x, y, splits, high))
    if name == "permuted":
        perm = np.random.default_rng(seed).permutation(NUM_FEATURES)
        shifted, what = x[:, perm], "pixels permuted by a fixed random permutation"
    elif name == "rotated":
        shifted, what = _rotate(x), "images rotated by 90 degrees"
    else:
        shifted, what = 1.0 - x, "intensities inverted (1 - x)"
    return Scenario(name, f"A: digits 0-9, B: the same digits with {what} (shared 10-way head)",
                    _task("digits", x, y, splits, every), _task(f"{name} digits", shifted, y, splits, every))

"""The compared methods: one adapter config per fastlora method, plus full fine-tuning.

Every adapter gets rank r on every Linear of the MLP (fc1, fc2, head) and the same training budget
per task; each method has a grid of six learning rates, half a decade apart (adapters 3e-4 to 1e-1,
full fine-tuning 1e-4 to 3e-2, CURLoRA 3e-3 to 1: its U needs a large lr, its factors C and R being
entries of W); method-specific knobs are set once here, per task (fastlora.next_task builds the next
task's adapters from the same config):
- LoRA-family scale alpha = 2r (alpha/r = 2), no dropout.
- Selective LoRA: TAPS's settings (the library defaults): tau = 0.1, score_init = 0.15, L1 weight
  lambda = 1 divided by the number of gated layers, switched on after a warm-up of a tenth of the
  task's budget (TAPS: 2 of its epochs).
- CoDyRA: the authors' settings (the library defaults): s = 1, w ~ randn, threshold 0 for the first
  half of the task's steps, then 50 levels up to kappa_max = 0.005; the schedule spans the task
  (total_steps=None, the task's length given to the training hooks), its kappas scaled by 500 / N
  on an N-step task so that they add up to the authors' 500-step budget (about 0.64).
- CURLoRA: k = r sampled rows/columns, alpha = 1, eps = 1e-3 (authors' code), sampler seed = run seed.
- NEAT: depth 0, ReLU, scale 1 (the defaults).
- LoRASC: a new stage every epoch (the paper; the training loop ends the stage, see train.py), pace
  alpha = 1 - m = 0.5, NoisyTune noise of intensity 0.15 on the backbone at each stage (the defaults).
Quick-mode lrs: one per method, near the middle of what the full runs select.

Ablations (ABLATIONS, run with --ablations; each changes one knob of its base method, compared
paired per seed with it and with LoRA):
- CoDyRA with LoRA's scale: alpha = 2r (s = 2), the rest as CoDyRA;
- CoDyRA without thresholding: kappa_max = 0 (w ~ randn still scales the ranks; nothing is pruned);
- Selective LoRA without its penalty: sparsity_weight = 0 (the gates can still move by the task loss);
- LoRASC without noise: noise_intensity = 0;
- LoRASC with one stage: no stage ends within a task (next_task folds the only one).
A method whose config type is not registered in fastlora.methods.ADAPTER_TYPES is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from fastlora import (
    AdapterConfig,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.methods import ADAPTER_TYPES

FULL = "full_finetune"


@dataclass(frozen=True)
class MethodSpec:
    """name; label (the method's name in its paper); make_config(rank, steps per task, seed) -> config,
    or None for full fine-tuning; lr_grid: the learning rates tried; quick_lr: the one of --quick runs;
    epoch_stages: LoRASC's stage ends with each epoch (the training loop calls cascade_step); ablation_of:
    the method an ablation changes one knob of (None for the methods themselves)."""

    name: str
    label: str
    make_config: Optional[Callable[[int, int, int], AdapterConfig]]
    lr_grid: tuple[float, ...]
    quick_lr: float
    epoch_stages: bool = False
    ablation_of: Optional[str] = None

    @property
    def is_adapter(self) -> bool:
        return self.make_config is not None


def _lora(r, steps, seed):
    return LoraConfig(r=r, alpha=2.0 * r)


def _selective(r, steps, seed):
    return SelectiveLoraConfig(r=r, alpha=2.0 * r, sparsity_warmup_steps=steps // 10)


def _rank_selective(r, steps, seed):
    return RankSelectiveLoraConfig(r=r, importance_init="randn")


def _rank_selective_lora_scale(r, steps, seed):
    return RankSelectiveLoraConfig(r=r, alpha=2.0 * r, importance_init="randn")


def _rank_selective_no_threshold(r, steps, seed):
    return RankSelectiveLoraConfig(r=r, importance_init="randn", kappa_max=0.0)


def _selective_no_penalty(r, steps, seed):
    return SelectiveLoraConfig(r=r, alpha=2.0 * r, sparsity_weight=0.0, sparsity_warmup_steps=steps // 10)


def _curlora(r, steps, seed):
    return CurLoraConfig(r=r, seed=seed)


def _neat(r, steps, seed):
    return NeatConfig(r=r)


def _cascade(r, steps, seed):
    return CascadeLoraConfig(r=r, alpha=2.0 * r, cascade_interval=None, noise_seed=seed)


def _cascade_no_noise(r, steps, seed):
    return CascadeLoraConfig(r=r, alpha=2.0 * r, cascade_interval=None, noise_seed=seed, noise_intensity=0.0)


GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(FULL, "full fine-tuning", None, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), 3e-3),
    MethodSpec("lora", "LoRA", _lora, GRID, 1e-2),
    MethodSpec("selective_lora", "Selective LoRA", _selective, GRID, 1e-2),
    MethodSpec("rank_selective_lora", "CoDyRA", _rank_selective, GRID, 1e-2),
    MethodSpec("curlora", "CURLoRA", _curlora, (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0), 1e-1),
    MethodSpec("neat", "NEAT", _neat, GRID, 1e-2),
    MethodSpec("cascade_lora", "LoRASC", _cascade, GRID, 1e-2, epoch_stages=True),
)
ABLATIONS: tuple[MethodSpec, ...] = (
    MethodSpec("rank_selective_lora_scale2", "CoDyRA, s = 2 (LoRA's)", _rank_selective_lora_scale, GRID, 1e-2,
               ablation_of="rank_selective_lora"),
    MethodSpec("rank_selective_lora_no_threshold", "CoDyRA, kappa_max = 0", _rank_selective_no_threshold, GRID,
               1e-2, ablation_of="rank_selective_lora"),
    MethodSpec("selective_lora_no_penalty", "Selective LoRA, no penalty", _selective_no_penalty, GRID, 1e-2,
               ablation_of="selective_lora"),
    MethodSpec("cascade_lora_no_noise", "LoRASC, no noise", _cascade_no_noise, GRID, 1e-2, epoch_stages=True,
               ablation_of="cascade_lora"),
    MethodSpec("cascade_lora_one_stage", "LoRASC, one stage", _cascade, GRID, 1e-2, ablation_of="cascade_lora"),
)


def available_methods(names: Optional[list[str]] = None,
                      ablations: bool = False) -> tuple[list[MethodSpec], list[str]]:
    """(specs to run, notes on skipped ones): the chosen methods (by default METHODS, and ABLATIONS
    with ``ablations``; ``names`` may pick from both, ``ablations`` adds every ablation) whose config is registered."""
    known = {spec.name: spec for spec in METHODS + ABLATIONS}
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(known)}")
    run, notes = [], []
    for spec in METHODS + ABLATIONS:
        chosen = spec.name in names if names else spec.ablation_of is None
        if not (chosen or ablations and spec.ablation_of is not None):
            continue
        config_type = type(spec.make_config(8, 100, 0)) if spec.is_adapter else None
        if config_type is not None and config_type not in ADAPTER_TYPES:
            notes.append(f"skipped {spec.name}: {config_type.__name__} is not registered in "
                         f"fastlora.methods.ADAPTER_TYPES")
            continue
        run.append(spec)
    return run, notes

"""CoDyRA, dynamic rank-selective LoRA (arXiv 2412.01004): a sparse importance per rank.

    y = x W^T + b + s * ((dropout(x) A^T) ⊙ w) B^T        s = 1 by default (alpha = None), else alpha / r
    after optimizer step t (t = 1, 2, ...), on the value the optimizer produced from the full gradient:
        w <- T_kappa(t)(w) = sign(w) * max(|w| - kappa(t), 0)
    kappa(t): 0 in the dense phase, then a staircase up to kappa_max at t = total_steps, then 0
    (``RankSelectiveLoraConfig.kappa``)

A rank with w == 0 adds nothing to y, but while the schedule runs it still gets its gradient
(d w_i = s * sum((dy B)_i ⊙ (x A^T)_i)), so the optimizer can move it off 0 and it revives.
Once ``total_steps`` steps are done the ranks at 0 are dropped for good: they are reset to 0
after every later step (optimizer momentum or weight decay cannot revive them), and the fused
op only sees the active ranks' factors A[act] (k, d_in), B[:, act] (d_out, k), w[act] (k,),
gathered with index_select (pruned ranks get zero gradients). Forwards without a gradient
for w (no_grad, eval inference, w frozen) are compacted the same way during the schedule, since
a zero rank changes no output. With no active rank the low-rank path is skipped (gate 0).
ΔW = s B diag(w) A (pruned ranks add nothing, so merging drops them).

w starts as N(0, 1) draws from the default generator (importance_init "randn", as the authors'
code). Over the schedule the thresholds add up to sum_t kappa(t) (0.6375 over 500 steps), so
the ranks whose |w| ends below that (about half of the draws, as training moves them) are
pruned. A constant importance_init prunes every rank or none: 1.0 outlasts the default schedule.

Which layers: every linear layer, as the authors adapt (target_modules=None means "all-linear").

Choices where the paper and the authors' code are silent (ours):
- The staircase: D = round(dense_fraction * total_steps) dense steps (at most total_steps - 1, so
  that step total_steps always thresholds), then level ceil(levels * (t - D) / (total_steps - D))
  of ``threshold_levels`` equal levels: the first sparse step uses kappa_max / levels, step
  total_steps uses kappa_max.
- Past total_steps (the authors' runs end there) the pruned set is final: the ranks at 0 after
  step total_steps stay dropped and the kept ones are no longer thresholded (kappa = 0), so a
  longer run only trains the kept ranks. Going on thresholding by kappa_max would shrink every
  kept rank to 0 (under AdamW at lr < kappa_max, almost all of them within total_steps more steps
  with the defaults).
- The step count t is the number of steps of the optimizer holding w (the training hooks), kept
  in the persistent buffer ``optimizer_steps`` so a checkpoint resumes the schedule. Our choice where
  the authors are silent: under Trainer a step a loss scaler skipped (fp16) counts too, as Trainer's
  max_steps counts it: a step without an update, after which the proximal step thresholds w by kappa(t)
  as after any step, so that the schedule ends with the run; a step skipped in a hand loop is no step.
- The schedule's length: total_steps=None (the default) spans the run, whose length
  FastLoraCallback takes from Trainer's max_steps and ``attach_training_hooks(..., total_steps=N)``
  from N; it is kept in the persistent buffer ``run_steps`` (a resumed run continues the same
  schedule; a layer that has stepped keeps the length it started with). With no known length the
  hooks refuse to attach and the rule step raises, before anything changes: an absolute 500-step
  schedule in a short run stays in its dense phase and silently trains plain LoRA. On a run of N
  steps every kappa is multiplied by 500 / N (the authors' length, REFERENCE_STEPS), so the
  thresholds add up to about the authors' 0.64 at any length (0.6625 at N = 48) and about half the
  ranks are pruned as in their run; an explicit total_steps keeps kappa_max absolute.
- ``extra_stats`` reports kappa 0 once the schedule is done (nothing is thresholded any more), and
  the schedule's length as total_steps (0 while unknown).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import RankSelectiveLoraConfig
from ..distributed import copy_full_, full_view, local_part, local_view
from ..registry import register_method
from .base import adapter_factory
from .lora import LoraAdapter


def soft_threshold(values: Tensor, threshold: float) -> Tensor:
    """The proximal operator of threshold * ||.||_1: sign(v) * max(|v| - threshold, 0)."""
    return values.sign() * (values.abs() - threshold).clamp_min(0)


def _initial_importance(config: RankSelectiveLoraConfig, **factory: Any) -> Tensor:
    """w (r,): N(0, 1) draws from the default generator for importance_init "randn", else the constant."""
    if config.importance_init == "randn":
        return torch.randn(config.r, **factory)
    return torch.full((config.r,), float(config.importance_init), **factory)


class RankSelectiveLoraAdapter(LoraAdapter):
    """importance = w (r,) (importance_init, or N(0, 1) for "randn"), lora_A (r, d_in)
    kaiming-uniform(a=sqrt 5), lora_B (d_out, r) zeros; persistent buffer optimizer_steps (int64);
    buffer active_index (k,) int64 of the ranks with w != 0 (not saved: recomputed from w after
    load_state_dict and after each proximal step). After changing ``importance`` by hand, call
    ``refresh_active_ranks()``.
    """

    optional_state_keys = LoraAdapter.optional_state_keys | {"run_steps"}  # earlier checkpoints have no run length

    def __init__(self, config: RankSelectiveLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight, layer_index)
        self.importance = nn.Parameter(_initial_importance(config, **adapter_factory(weight)))
        self.register_buffer("active_index", torch.arange(config.r, device=weight.device), persistent=False)
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.int64, device=weight.device))
        self.register_buffer("run_steps", torch.zeros((), dtype=torch.int64, device=weight.device))
        self._steps = 0  # host copies of optimizer_steps and run_steps: no device read per forward
        self._run_steps = 0
        # whether the schedule is done, kept as a bool that flips once: a forward that read the step count
        # would recompile a compiled model after every optimizer step (and fail at the limit under fullgraph)
        self._schedule_done = False

    @property
    def total_steps(self) -> Optional[int]:
        """The schedule's length: the config's total_steps, else the run's length (``run_steps``), else
        None (not known yet)."""
        return self.config.total_steps if self.config.total_steps is not None else (self._run_steps or None)

    @property
    def schedule_done(self) -> bool:
        """Whether the schedule's optimizer steps are done (pruned ranks are then dropped for good)."""
        return self._schedule_done

    def _count_schedule(self) -> None:
        """The host copy of schedule_done <- the step count against the schedule's length."""
        total = self.total_steps
        self._schedule_done = total is not None and self._steps >= total

    @property
    def steps_in_run(self) -> int:
        """Optimizer steps taken under the schedule: all of them (its schedule is pruned once, over one run)."""
        return self._steps

    @torch.no_grad()
    def set_run_steps(self, steps: int) -> None:
        """The run's length in optimizer steps (Trainer's max_steps, attach_training_hooks(total_steps=)),
        the schedule's length when the config leaves total_steps None; kept in the persistent buffer
        ``run_steps``."""
        self._run_steps = int(steps)
        self.run_steps.fill_(self._run_steps)
        self._count_schedule()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A kaiming-uniform, B zeros, w drawn again (importance_init); the step counts are kept."""
        super().reset_parameters()
        importance = self.importance
        copy_full_(importance, _initial_importance(self.config, device=importance.device, dtype=importance.dtype))
        self.refresh_active_ranks()

    def rule_parameter(self) -> nn.Parameter:
        """The proximal step follows the optimizer that moves w."""
        return self.importance

    def refresh_host_copies(self) -> None:
        self.refresh_active_ranks()

    @torch.no_grad()
    def refresh_active_ranks(self) -> None:
        """active_index <- the ranks whose w is nonzero (a sharded w is gathered; a normal tensor even under
        inference mode: a load there must not leave training an inference tensor); host step count
        <- optimizer_steps."""
        with torch.inference_mode(False):
            self.active_index = torch.nonzero(full_view(self.importance)).flatten()
        self._steps = int(self.optimizer_steps)
        self._run_steps = int(self.run_steps)
        self._count_schedule()

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        full = {"lora_a": self.lora_A, "lora_b": self.lora_B, "rank_weights": self.importance, "scale": self.scale}
        if not self.schedule_done and torch.is_grad_enabled() and self.importance.requires_grad:
            return full  # every rank gets its gradient: a rank at 0 can revive (nor is the count read: a
            # compiled training forward is not specialised on it while the schedule prunes)
        active = self.active_index
        if active.numel() == self.config.r:
            return full
        if active.numel() == 0:
            return {**full, "gate": 0.0}
        return {"lora_a": self.lora_A.index_select(0, active), "lora_b": self.lora_B.index_select(1, active),
                "rank_weights": self.importance.index_select(0, active), "scale": self.scale}

    def delta_weight(self, weight: Tensor) -> Tensor:
        """ΔW = s B[:, act] diag(w[act]) A[act]; zeros (nothing computed) with no active rank."""
        if self.active_index.numel() == 0:
            return torch.zeros_like(weight)
        return super().delta_weight(weight)

    @torch.no_grad()
    def after_optimizer_step(self, learning_rate: float) -> tuple[nn.Parameter, ...]:
        """Count the step, reset dropped ranks to 0 once the schedule is done, soft-threshold w by
        kappa(step) (0 past total_steps: kept ranks move only by the optimizer then), refresh the
        active ranks. Elementwise on this rank's shard when w is sharded (FSDP2). The learning rate
        is not used: kappa is absolute. Raises ValueError (before changing anything) when the
        schedule's length is not known."""
        total = self.config.schedule_length(self._run_steps)
        importance = local_view(self.importance)
        if self.schedule_done:
            dropped = torch.ones(self.config.r, dtype=torch.bool, device=self.active_index.device)
            dropped[self.active_index] = False
            importance.masked_fill_(local_part(dropped, self.importance), 0.0)
        self._steps += 1
        self.optimizer_steps.fill_(self._steps)
        importance.copy_(soft_threshold(importance, self.config.kappa(self._steps, total)))
        self.refresh_active_ranks()  # the schedule's host copy too
        return ()

    def extra_stats(self) -> dict[str, float]:
        """active_ranks; kappa: the threshold of the last step while the schedule runs, 0 before the
        first step, once it is done (nothing is thresholded any more) and while its length is unknown;
        optimizer_steps; total_steps: the schedule's length (0 while unknown)."""
        total = self.total_steps
        kappa = 0.0 if total is None or self.schedule_done else self.config.kappa(self._steps, total)
        return {"active_ranks": float(self.active_index.numel()), "kappa": kappa,
                "optimizer_steps": float(self._steps), "total_steps": float(total or 0)}


register_method(RankSelectiveLoraConfig, RankSelectiveLoraAdapter)

"""Selective LoRA (arXiv 2501.15377, gating as in TAPS): one learnable score gates the block.

    g = 1[score >= threshold]                         forward (hard gate, 0 or 1); tau = 0.1, score_init 0.15
    y = x W^T + b + g * s * (dropout(x) A^T) B^T       s = alpha / r (alpha / sqrt(r) with rsLoRA)
    d score = s * sum((dy B) ⊙ (dropout(x) A^T))        backward (straight-through, train and eval mode)
    loss += sparsity_weight / L * |score|               L1 penalty over the L gated layers (TAPS), after
                                                        sparsity_warmup_steps optimizer steps

The straight-through estimator does not depend on the module's mode: whenever grad is
enabled and the score requires it (train or eval mode), the gate is a tensor carrying it.
A gated-off block skips the low-rank path inside the fused op: without a score gradient
(no_grad, inference mode, a frozen score) A and B are never read; with one only the
straight-through score gradient is formed, and A and B get zero gradients. Merging drops
a gated-off block. Whether the block is on is read from
the device once per change of the score, not once per forward (a read is a GPU sync).
Under torch.compile the gate stays on the device and multiplies the update (no skipping,
no graph break).

When blocks switch off: a block turns off once its score falls by score_init - threshold (0.05
with the defaults). Under AdamW a score moves by about lr per step while the penalty's gradient
dominates its (normalised) step, so that takes about 0.05 / lr optimizer steps: 500 at lr 1e-4,
50 at 1e-3; a run shorter than that never switches a gate and trains exactly as plain LoRA.
``adapter_stats`` reports "gate_changes" (switches the forwards saw, summed over layers), and
``FastLoraCallback`` warns at the end of a run in which no gate moved. The switches are counted on
the device, against the gate the previous forward saw, by eager and compiled forwards alike (inside
the compiled graph: no host read, no graph break), so a compiled run counts what an eager one does.

Which layers: target_modules=None adapts every linear layer ("all-linear"), where the sources
name none (our choice: a method that gates blocks off starts from all of them).

The penalty is formed inside the layer's forward from the score that forward sees and
returned by ``regularization_loss``: under FSDP/ZeRO-3 a parameter is whole only inside
its owner's forward.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from fastlora.kernels.transforms import functorch_active

from ..config import SelectiveLoraConfig
from ..distributed import full_view, is_dtensor
from ..registry import register_method
from .base import adapter_factory
from .lora import LoraAdapter
from .stamps import TensorStamp, trackable


def _score_as_vector(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written while score was 0-dim load into the (1,) score."""
    score = state_dict.get(prefix + "score")
    if score is not None and score.dim() == 0:
        state_dict[prefix + "score"] = score.reshape(1)


class SelectiveLoraAdapter(LoraAdapter):
    """lora_A (r, d_in) kaiming-uniform(a=sqrt 5), lora_B (d_out, r) zeros, score (1,) = score_init,
    persistent buffer optimizer_steps (int64, for the warm-up).

    Choices:
    - The L1 penalty is sparsity_weight * |score|; scores start above the threshold, so while a
      block is on this equals sparsity_weight * score, and once a score falls below zero the
      penalty pulls it back toward 0 instead of driving it to -inf. ``regularization_loss`` of the
      model divides it by the number L of Selective LoRA layers when normalize_penalty (TAPS).
    - Warm-up: the penalty is 0 (its gradient too) while fewer than sparsity_warmup_steps steps of
      the optimizer holding the score are done (counted by the training hooks in the persistent
      buffer optimizer_steps, so a checkpoint resumes it; under FastLoraCallback Trainer's steps, a loss
      scaler's skipped ones included). The default 0 turns it on at once:
      TAPS waits 2 epochs, whose length only the training loop knows.
    - score has shape (1,), not (): FSDP2 shards parameters along dim 0 and refuses 0-dim
      ones. Checkpoints with a 0-dim score still load.
    - The gate's host value is cached per score version: a change of the score through its
      version counter (optimizer steps, ``load_state_dict``, in-place edits under no_grad),
      a new storage (``.to()``) or an optimizer step seen by the training hooks refreshes
      it. After writing the score in a way the version counter does not see (through
      ``.data``, or an optimizer whose kernels write raw pointers without the training
      hooks attached), call ``refresh_gate()``.
    - Gate switches are counted in two non-persistent 0-dim buffers: the gate the latest forward saw
      (bool, on at first) and the number of switches (int64). A forward compares its gate with the
      first and adds to the second on the device: an eager forward when it reads the score (once per
      change of it), a compiled one inside its graph (no host read, no graph break); a recomputed
      forward (activation checkpointing) sees the gate its first run recorded and adds nothing.
      ``extra_stats`` reads the count. The record is not saved: a run's statistic.
    - The warm-up's on/off is a host bool that changes once (when the warm-up ends), not the step
      count: torch.compile guards on the Python values a compiled forward reads, and a count read
      there would recompile it after every optimizer step (and fail at the recompile limit under
      fullgraph=True).
    - A forward with grad enabled records its penalty term (in that forward's graph);
      ``regularization_loss`` hands it over once. The record is dropped after an optimizer
      step (the score moved). Without a record (no forward yet, a no_grad forward, a second
      call, ``regularization_loss`` called before the forward) the term is computed from the
      parameter, gathered when sharded.
    """

    def __init__(self, config: SelectiveLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight, layer_index)
        self.score = nn.Parameter(torch.full((1,), float(config.score_init), **adapter_factory(weight)))
        self.threshold = float(config.threshold)
        self.sparsity_weight = float(config.sparsity_weight)
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.int64, device=weight.device))
        self._set_steps(0)  # _steps: host copy of optimizer_steps; _penalized: the warm-up is over
        self._penalty: Optional[Tensor] = None
        self._penalty_in_transform = False
        # the gate's host copy and the stamp of the score it was read from (one pair: one read per check)
        self._gate_cache: Optional[tuple[TensorStamp, bool]] = None
        # the gate the latest forward saw, and the switches the forwards saw (on -> off or off -> on)
        self.register_buffer("_gate_seen", None, persistent=False)
        self.register_buffer("_gate_switches", None, persistent=False)
        self._start_gate_record(weight.device)
        self.register_load_state_dict_pre_hook(_score_as_vector)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the recorded penalty (part of one forward's graph) and the gate's
        stamp (of the original's score) behind."""
        return {**super().__getstate__(), "_penalty": None, "_gate_cache": None}

    def refresh_host_copies(self) -> None:
        self._set_steps(int(self.optimizer_steps))
        if self._gate_seen.is_meta and not self.score.is_meta:  # load_state_dict(assign=True) onto a meta module:
            self._start_gate_record(self.score.device)  # not in state dicts: it starts afresh beside the score

    def _set_steps(self, steps: int) -> None:
        """The host count of optimizer steps, and whether the warm-up is over (what forwards read)."""
        self._steps = steps
        self._penalized = steps >= self.config.sparsity_warmup_steps

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A kaiming-uniform, B zeros, score = score_init; the step count is kept."""
        super().reset_parameters()
        self.score.fill_(float(self.config.score_init))

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts (``to``, ``to_empty``...) keep the gate record usable: one without values (on the
        meta device, materialised by ``to_empty``) starts afresh, and one made under inference mode is copied
        out of it (forwards outside inference mode write it)."""
        unset = self._gate_seen.is_meta
        module = super()._apply(fn, recurse)
        seen, switches = self._gate_seen, self._gate_switches
        if unset and not seen.is_meta:
            self._start_gate_record(seen.device)
        elif seen.is_inference() or switches.is_inference():
            with torch.inference_mode(False):
                self._gate_seen, self._gate_switches = seen.clone(), switches.clone()
        return module

    def _start_gate_record(self, device: torch.device) -> None:
        """A fresh gate record on ``device`` (the gate on, no switch), writable by forwards in and outside
        inference mode."""
        with torch.inference_mode(False):
            self._gate_seen = torch.ones((), dtype=torch.bool, device=device)
            self._gate_switches = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def active(self) -> bool:
        """Whether the block is switched on: score >= threshold (gathered when sharded)."""
        return bool(full_view(self.score.detach()) >= self.threshold)

    def refresh_gate(self) -> None:
        """Forget the cached gate: the next forward reads the score again."""
        self._gate_cache = None

    def _note_gate(self, hard: Tensor) -> None:
        """Count a switch of the gate a forward sees (``hard``: 1[score >= threshold], a 0-dim bool tensor)
        against the gate the previous forward saw, on the device (no host read; traced by torch.compile)."""
        seen, switches = self._gate_seen, self._gate_switches
        hard = hard.detach().to(seen.device)
        switches.add_(hard.ne(seen).to(switches.dtype))
        seen.copy_(hard)

    def _observed_gate(self) -> bool:
        """The gate read from the score now (gathered when sharded), noted by ``_note_gate`` (not inside
        a torch.func transform, whose forwards may not write the record)."""
        hard = full_view(self.score.detach()).reshape(()) >= self.threshold
        if not functorch_active():
            self._note_gate(hard)
        return bool(hard)

    def gate_is_on(self) -> bool:
        """``active``, read from the device only when the score changed since the last read (always when
        that cannot be followed: a sharded score, see ``stamps.trackable``)."""
        score = (self.score,)
        cache = self._gate_cache  # one read: another thread may replace the pair meanwhile
        if cache is not None and cache[0].matches(score):  # (no stamp is taken where it cannot follow the score)
            return cache[1]
        if is_dtensor(score[0]) or not trackable(score):
            return self._observed_gate()
        stamp = TensorStamp(score)
        on = self._observed_gate()
        self._gate_cache = (stamp, on)
        return on

    def gate(self) -> Union[float, Tensor]:
        """The hard gate; a 0-dim tensor carrying the straight-through gradient to score when grad
        is enabled and the score trainable (any mode), a plain float otherwise (no gradient work).
        Under torch.compile always a tensor, computed on the device (no host read, no graph break)."""
        return self._gate_and_value()[0]

    def _gate_and_value(self) -> tuple[Union[float, Tensor], Optional[float]]:
        """(gate, its host value when the gate is a tensor whose value the host knows, else None)."""
        score = self.score.view(())
        if torch.compiler.is_compiling():
            on = score.detach() >= self.threshold
            self._note_gate(on)  # in the graph: the count stays on the device
            hard = on.to(score.dtype)
            return (score - score.detach()) + hard if self._straight_through() else hard, None
        hard = float(self.gate_is_on())
        if self._straight_through():
            # value exactly `hard` (score - score is 0 for a finite score); d gate / d score = 1
            return (score - score.detach()) + hard, hard
        return hard, None

    def _straight_through(self) -> bool:
        """Whether the score gets its straight-through gradient: grad enabled and the score
        trainable, in train and eval mode alike."""
        return torch.is_grad_enabled() and self.score.requires_grad

    def _l1_penalty(self, score: Tensor) -> Tensor:
        """sparsity_weight * |score| (0-dim; 0 during the warm-up) as weight * sign(score) * score:
        the same value and (sub)gradient as abs, but autograd keeps sign(score), not score (FSDP
        frees a gathered score after the forward)."""
        score = score.view(())
        weight = self.sparsity_weight if self._penalized else 0.0  # a bool: no recompile per step
        return weight * (score.detach().sign() * score)

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        """The fused op's arguments; with grad enabled, records this forward's penalty term."""
        if torch.is_grad_enabled() and self.score.requires_grad:
            self._penalty, self._penalty_in_transform = self._l1_penalty(self.score), functorch_active()
        gate, gate_value = self._gate_and_value()
        arguments = {"lora_a": self.lora_A, "lora_b": self.lora_B, "gate": gate, "scale": self.scale}
        if gate_value is not None:
            arguments["gate_value"] = gate_value  # the op need not read the gate back from the device
        return arguments

    def delta_weight(self, weight: Tensor) -> Tensor:
        """ΔW = s B A when the block is on, zeros (nothing computed) when it is off."""
        if not self.active:
            return torch.zeros_like(weight)
        return super().delta_weight(weight)

    def regularization_loss(self) -> Optional[Tensor]:
        """sparsity_weight * |score| (0-dim, 0 during the warm-up): the term the latest forward
        recorded (handed over once; one recorded inside a torch.func transform only inside one), else
        computed from the score now."""
        penalty, self._penalty = self._penalty, None
        if penalty is None or (self._penalty_in_transform and not functorch_active()):
            return self._l1_penalty(full_view(self.score))
        return penalty

    def rule_parameter(self) -> nn.Parameter:
        """The post-step bookkeeping follows the optimizer that moves the score."""
        return self.score

    @torch.no_grad()
    def after_optimizer_step(self, learning_rate: float) -> tuple[nn.Parameter, ...]:
        """The step moved the score: count it, drop the recorded penalty term and the cached gate."""
        self._set_steps(self._steps + 1)
        self.optimizer_steps.fill_(self._steps)
        self._penalty = None
        self.refresh_gate()
        return ()

    def extra_stats(self) -> dict[str, float]:
        return {"active": float(self.active), "score": float(full_view(self.score.detach())),
                "optimizer_steps": float(self._steps), "gate_changes": float(self._gate_switches)}


register_method(SelectiveLoraConfig, SelectiveLoraAdapter)

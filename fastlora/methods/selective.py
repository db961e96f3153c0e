"""Selective LoRA (arXiv 2501.15377, gating as in TAPS): one learnable score gates the block.

    g = 1[score >= threshold]                         forward (hard gate, 0 or 1)
    y = x W^T + b + g * s * (dropout(x) A^T) B^T       s = alpha / r (alpha / sqrt(r) with rsLoRA)
    d score = s * sum((dy B) ⊙ (dropout(x) A^T))        backward (straight-through)
    loss += sparsity_weight * |score|                   L1 penalty, drives blocks off

A gated-off block skips the low-rank path inside the fused op: in eval mode A and B are
never read; in training only the straight-through score gradient is formed, and A and B
get zero gradients. Merging drops a gated-off block.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..config import SelectiveLoraConfig
from .base import adapter_factory
from .lora import LoraAdapter


class SelectiveLoraAdapter(LoraAdapter):
    """lora_A (r, d_in) kaiming-uniform(a=sqrt 5), lora_B (d_out, r) zeros, score () = score_init.

    Choice: the L1 penalty is sparsity_weight * |score| (the L1 norm, as METHODS.md
    names it); scores start above the threshold, so while a block is on this equals
    sparsity_weight * score, and once a score falls below zero the penalty pulls it
    back toward 0 instead of driving it to -inf.
    """

    def __init__(self, config: SelectiveLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight, layer_index)
        self.score = nn.Parameter(torch.tensor(float(config.score_init), **adapter_factory(weight)))
        self.threshold = float(config.threshold)
        self.sparsity_weight = float(config.sparsity_weight)

    @property
    def active(self) -> bool:
        """Whether the block is switched on: score >= threshold."""
        return bool(self.score.detach() >= self.threshold)

    def gate(self) -> Union[float, Tensor]:
        """The hard gate; a 0-dim tensor carrying the straight-through gradient to score when
        training with grad enabled, a plain float otherwise (no gradient work)."""
        hard = (self.score.detach() >= self.threshold).to(self.score.dtype)
        if self.training and torch.is_grad_enabled() and self.score.requires_grad:
            # value exactly `hard`; d gate / d score = 1
            return hard + (self.score - self.score.detach())
        return float(hard)

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        return {"lora_a": self.lora_A, "lora_b": self.lora_B, "gate": self.gate(), "scale": self.scale}

    def delta_weight(self, weight: Tensor) -> Tensor:
        """ΔW = s B A when the block is on, zeros (nothing computed) when it is off."""
        if not self.active:
            return torch.zeros_like(weight)
        return super().delta_weight(weight)

    def regularization_loss(self) -> Optional[Tensor]:
        """sparsity_weight * |score| (0-dim)."""
        return self.sparsity_weight * self.score.abs()

    def extra_stats(self) -> dict[str, float]:
        return {"active": float(self.active), "score": float(self.score.detach())}

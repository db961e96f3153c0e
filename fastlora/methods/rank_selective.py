"""CoDyRA, dynamic rank-selective LoRA (arXiv 2412.01004): a sparse importance per rank.

    y = x W^T + b + s * ((dropout(x) A^T) ⊙ lambda) B^T     s = alpha / r (alpha / sqrt(r) with rsLoRA)
    after each optimizer step (learning rate lr):
        lambda <- sign(lambda) * max(|lambda| - lr * sparsity_strength, 0)

Ranks with lambda == 0 are pruned and cost nothing: the fused op only sees the active
ranks' factors A[act] (k, d_in), B[:, act] (d_out, k), lambda[act] (k,), gathered with
index_select, whose backward scatters gradients back (pruned ranks get zeros). With no
active rank the low-rank path is skipped (gate 0). ΔW = s B diag(lambda) A.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import RankSelectiveLoraConfig
from ..distributed import full_view, local_part, local_view
from .base import adapter_factory
from .lora import LoraAdapter


def soft_threshold(values: Tensor, threshold: float) -> Tensor:
    """The proximal operator of threshold * ||.||_1: sign(v) * max(|v| - threshold, 0)."""
    return values.sign() * (values.abs() - threshold).clamp_min(0)


def _refresh_after_load(module: "RankSelectiveLoraAdapter", incompatible_keys) -> None:
    module.refresh_active_ranks()


class RankSelectiveLoraAdapter(LoraAdapter):
    """importance = lambda (r,) filled with importance_init, lora_A (r, d_in)
    kaiming-uniform(a=sqrt 5), lora_B (d_out, r) zeros; buffer active_index (k,) int64 of
    the ranks with lambda != 0 (not saved: recomputed from lambda after load_state_dict
    and after each proximal step).

    Choice: a pruned rank stays pruned. It gets no gradient, so plain SGD leaves it at 0;
    the proximal step also resets pruned ranks to 0 first, so optimizer momentum or
    weight decay cannot revive one either, and the set of active ranks only shrinks.
    After changing ``importance`` by hand, call ``refresh_active_ranks()``.
    """

    def __init__(self, config: RankSelectiveLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight, layer_index)
        factory = adapter_factory(weight)
        self.importance = nn.Parameter(torch.full((config.r,), float(config.importance_init), **factory))
        self.register_buffer("active_index", torch.arange(config.r, device=weight.device), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.sparsity_strength = float(config.sparsity_strength)

    def rule_parameter(self) -> nn.Parameter:
        """The proximal step uses lambda's own learning rate."""
        return self.importance

    @torch.no_grad()
    def refresh_active_ranks(self) -> None:
        """active_index <- the ranks whose lambda is nonzero (a sharded lambda is gathered)."""
        self.active_index = torch.nonzero(full_view(self.importance)).flatten()

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        active = self.active_index
        if active.numel() == 0:
            return {"lora_a": self.lora_A, "lora_b": self.lora_B, "rank_weights": self.importance,
                    "gate": 0.0, "scale": self.scale}
        if active.numel() == self.config.r:
            return {"lora_a": self.lora_A, "lora_b": self.lora_B, "rank_weights": self.importance,
                    "scale": self.scale}
        return {"lora_a": self.lora_A.index_select(0, active), "lora_b": self.lora_B.index_select(1, active),
                "rank_weights": self.importance.index_select(0, active), "scale": self.scale}

    def delta_weight(self, weight: Tensor) -> Tensor:
        """ΔW = s B[:, act] diag(lambda[act]) A[act]; zeros (nothing computed) with no active rank."""
        if self.active_index.numel() == 0:
            return torch.zeros_like(weight)
        return super().delta_weight(weight)

    @torch.no_grad()
    def after_optimizer_step(self, learning_rate: float) -> tuple[nn.Parameter, ...]:
        """Keep pruned ranks at 0, soft-threshold lambda by lr * sparsity_strength, refresh
        the active ranks. Elementwise on this rank's shard when lambda is sharded (FSDP2)."""
        pruned = torch.ones(self.config.r, dtype=torch.bool, device=self.active_index.device)
        pruned[self.active_index] = False
        importance = local_view(self.importance)
        importance.masked_fill_(local_part(pruned, self.importance), 0.0)
        importance.copy_(soft_threshold(importance, learning_rate * self.sparsity_strength))
        self.refresh_active_ranks()
        return ()

    def extra_stats(self) -> dict[str, float]:
        return {"active_ranks": float(self.active_index.numel())}

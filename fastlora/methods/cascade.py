"""LoRASC, slow cascaded LoRA (arXiv 2407.01491): a cascade of LoRA pairs, slow-fast updates,
noisy cascade starts.

    y = x W^T + b + s * (dropout(x) [A_f; A]^T) [B_f  B]^T        s = alpha / r (alpha / sqrt(r) rsLoRA)
        A_f (k, d_in), B_f (d_out, k)   folded pairs, frozen buffers (k = r * folded pairs)
        A (r, d_in), B (d_out, r)       the fast pair being trained

Every ``cascade_interval`` optimizer steps a cascade step runs (or call ``cascade_step()``):

1. slow-fast update. The paper merges a portion alpha of the trained fast LoRA into the
   slow LoRA and the slow LoRA into the backbone; read as a Lookahead step, the slow
   weights are the model the fast pair started from, W + s B_f A_f, the fast weights are
   the trained model W + s B_f A_f + s B A, and slow <- m * slow + (1 - m) * fast
   (m = slow_momentum, alpha = 1 - m). This appends the pair (A, (1 - m) B) to the folded
   pairs, so the update is a mixture of low-rank terms whose rank grows with the cascade.
2. fresh pair: A <- kaiming-uniform(a=sqrt 5), B <- N(0, noise_std^2) (zeros when 0), and
   the fast weights restart from the slow ones (plus the noise term s B A).

The forward always uses the fast weights (gradients are taken there, as in Lookahead); it
is one fused call on the stacked factors. ΔW = s B_f A_f + s B A.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..config import CascadeLoraConfig
from ..distributed import copy_full_, full_view
from .base import Adapter, adapter_factory


def _refresh_after_load(module: "CascadeLoraAdapter", incompatible_keys) -> None:
    module.refresh_counters()


def truncated_factors(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors (B', A') of B A in Frobenius norm (Eckart-Young), without
    forming B A: B = Q_b R_b, A^T = Q_a R_a, R_b R_a^T = U S V^T, B' = Q_b U S, A' = V^T Q_a^T.

    b (d_out, n), a (n, d_in) -> B' (d_out, rank), A' (rank, d_in), zero-padded when B A has
    fewer than ``rank`` singular values. Computed in float64, returned in b's dtype.
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    t = min(rank, s.numel())
    new_b = b.new_zeros(b.shape[0], rank)
    new_a = a.new_zeros(rank, a.shape[1])
    new_b[:, :t] = (qb @ u[:, :t]) * s[:t]
    new_a[:t] = vh[:t] @ qa.T
    return new_b, new_a


class CascadeLoraAdapter(Adapter):
    """lora_A (r, d_in) kaiming-uniform(a=sqrt 5), lora_B (d_out, r) ~ N(0, noise_std^2)
    (zeros by default); persistent buffers folded_A (r * max_cascades, d_in) and folded_B
    (d_out, r * max_cascades), preallocated with zeros (only the first ``folded_rank`` ranks
    are used and computed), optimizer_steps and cascades (int64 counters), so a checkpoint
    taken mid-cascade resumes the schedule exactly.

    Choices (the paper does not fit a frozen-base adapter as is):
    - Noise: the paper perturbs the backbone before each fast stage; W stays frozen and
      untouched here, so the fresh pair starts from B ~ N(0, noise_std^2) instead: the fast
      weights start at a random low-rank perturbation s B A of the slow ones. The first
      pair gets it too (construction starts the first cascade stage); noise_std = 0 keeps
      the exact-base start.
    - Capacity: when a fold would exceed max_cascades pairs, the folded update plus the new
      pair is recompressed to its best rank-(r * max_cascades) approximation (exact while
      its rank fits, always when r * max_cascades >= min(d_in, d_out)).
    - Optimizer state: the fresh pair reuses the same Parameters; an optimizer's state for
      them (Adam moments) is not reset by the adapter, which never sees the optimizer.
    - Dropout acts on the input of the whole cascade, folded pairs included (one fused call).
    - Sharded training (FSDP2): the folded buffers are not sharded; every rank holds them
      whole and folds the gathered fast pair, so all ranks keep the same cascade.
    """

    def __init__(self, config: CascadeLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features)
        factory = adapter_factory(weight)
        capacity = config.r * config.max_cascades
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **factory))
        self.register_buffer("folded_A", torch.zeros(capacity, in_features, **factory))
        self.register_buffer("folded_B", torch.zeros(out_features, capacity, **factory))
        counter = {"dtype": torch.int64, "device": weight.device}
        self.register_buffer("optimizer_steps", torch.zeros((), **counter))
        self.register_buffer("cascades", torch.zeros((), **counter))
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.scale = config.scale
        self.keep = 1.0 - float(config.slow_momentum)
        self.noise_std = float(config.noise_std)
        self.interval = config.cascade_interval
        self.capacity = capacity
        # host copies of the counters: no device read per forward or step
        self._steps = 0
        self._cascades = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh fast pair: A kaiming-uniform(a=sqrt 5), B ~ N(0, noise_std^2).

        The whole pair is drawn from the default generator on every rank (the same values as
        one process draws) and each rank keeps its shard when the pair is sharded (FSDP2).
        """
        new_a = nn.init.kaiming_uniform_(torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype,
                                                     device=self.lora_A.device), a=math.sqrt(5))
        new_b = torch.zeros(self.lora_B.shape, dtype=self.lora_B.dtype, device=self.lora_B.device)
        if self.noise_std > 0:
            nn.init.normal_(new_b, mean=0.0, std=self.noise_std)
        copy_full_(self.lora_A, new_a)
        copy_full_(self.lora_B, new_b)

    @property
    def folded_rank(self) -> int:
        """Ranks of the folded update in use: r * min(cascades, max_cascades)."""
        return min(self._cascades * self.config.r, self.capacity)

    @torch.no_grad()
    def refresh_counters(self) -> None:
        """Host copies of optimizer_steps and cascades <- the buffers (after a load)."""
        self._steps = int(self.optimizer_steps)
        self._cascades = int(self.cascades)

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        k = self.folded_rank
        if k == 0:
            return {"lora_a": self.lora_A, "lora_b": self.lora_B, "scale": self.scale}
        return {"lora_a": torch.cat([self.folded_A[:k], self.lora_A]),
                "lora_b": torch.cat([self.folded_B[:, :k], self.lora_B], dim=1), "scale": self.scale}

    @torch.no_grad()
    def cascade_step(self) -> None:
        """Fold (A, (1 - slow_momentum) B) into the folded pairs (slow <- m slow + (1 - m) fast),
        then start a fresh noisy pair."""
        k, r = self.folded_rank, self.config.r
        lora_a = full_view(self.lora_A)  # a sharded pair is gathered: every rank folds it whole
        kept_b = full_view(self.lora_B) * self.keep
        if k + r <= self.capacity:
            self.folded_A[k:k + r] = lora_a
            self.folded_B[:, k:k + r] = kept_b
        else:
            new_b, new_a = truncated_factors(torch.cat([self.folded_B, kept_b], dim=1),
                                             torch.cat([self.folded_A, lora_a]), self.capacity)
            self.folded_B.copy_(new_b)
            self.folded_A.copy_(new_a)
        self._cascades += 1
        self.cascades.fill_(self._cascades)
        self.reset_parameters()

    @torch.no_grad()
    def after_optimizer_step(self, learning_rate: float) -> tuple[nn.Parameter, ...]:
        """Count the step; every cascade_interval-th step runs ``cascade_step`` and returns
        the restarted pair (its optimizer state is dropped by the training hooks)."""
        self._steps += 1
        self.optimizer_steps.fill_(self._steps)
        if self._steps % self.interval != 0:
            return ()
        self.cascade_step()
        return (self.lora_A, self.lora_B)

    def extra_stats(self) -> dict[str, float]:
        return {"cascades": float(self._cascades), "folded_rank": float(self.folded_rank),
                "optimizer_steps": float(self._steps)}

"""LoRASC, slow cascaded LoRA (arXiv 2407.01491): stages of a fast LoRA pair, each folded into the
backbone, each started on a noisy backbone.

    y = x W_k^T + b + s * (dropout(x) A^T) B^T          s = alpha / r (alpha / sqrt(r) with rsLoRA)
        W_k (d_out, d_in)   the backbone of stage k (buffer ``backbone``): W with every earlier stage
                            folded in and the noise of stages 0..k added
        A (r, d_in), B (d_out, r)   the fast pair trained in stage k (the forward stays rank r)

Stage k starts with NoisyTune's perturbation of the backbone, then trains a fresh pair:
    W_k <- W_k + (U - 1/2) * lambda * std(W_k)          U ~ U[0, 1)^(d_out x d_in), lambda = noise_intensity
Every ``cascade_interval`` optimizer steps (or at a call of ``cascade_step()``) the stage ends:
    W_{k+1} = W_k + (1 - m) * s * B A                   slow-fast update, m = slow_momentum
    A <- kaiming-uniform(a=sqrt 5), B <- 0, their optimizer state dropped; stage k + 1 gets its noise.
The rank of W_k - W grows with every stage, without limit, at no cost to the forward. Dropout acts
on the fast pair's input only: the folded stages are inside W_k and see the clean input.
ΔW = (W_k - W) + s B A (what ``merge`` adds to W).

Choices where the paper is silent (our reading):
- The slow-fast update is a Lookahead step with the slow weights in the backbone: the slow model
  is the backbone the stage started from, the fast one backbone + s B A, and
  slow <- m slow + (1 - m) fast adds (1 - m) s B A.
- NoisyTune's form on the backbone: uniform noise scaled by the matrix's own std (unbiased, over
  all its entries, taken at the stage start), intensity 0.15 as NoisyTune, on by default, also at
  stage 0 (construction: the first stage starts noisy too). The noise is kept (NoisyTune keeps it).
  U is drawn in float32 from ``torch.Generator().manual_seed(noise_seed_of(k))`` on the CPU (the
  same values on every device and rank), seed (noise_seed * 1000003 + layer_index) * 1000003 + k,
  and scaled in float32 (float64 for a float64 W) before it is added in W's dtype;
  the std of each stage's draw is kept in ``noise_stds`` (host list, this process's stages).
- W itself is never written: the backbone is a copy (one more d_out x d_in tensor in W's dtype per
  layer, as ``merge`` keeps one). So a disabled adapter computes the pretrained layer, and
  ``unmerge`` restores the pretrained W bit for bit; the stages stay in the backbone. The backbone
  is a persistent buffer: an adapter-only checkpoint holds it whole (the noise is dense, so the
  checkpoint is as large as the adapted layers) and reproduces the layer exactly.
- Stage length: cascade_interval optimizer steps (default 100). The paper starts a stage every
  epoch: set cascade_interval to the steps per epoch, or to None and call ``cascade_step()`` at
  each epoch end.
- Step counter and stage counter are persistent int64 buffers (optimizer_steps, cascades), so a
  checkpoint taken mid-stage resumes the schedule.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..config import CascadeLoraConfig
from ..registry import register_method
from ..distributed import copy_full_, full_view
from .base import Adapter, adapter_factory

_SEED_MIX = 1_000_003


def _refresh_after_load(module: "CascadeLoraAdapter", incompatible_keys) -> None:
    module.refresh_counters()


def backbone_noise(shape: torch.Size, std: float, intensity: float, seed: int, dtype: torch.dtype) -> Tensor:
    """NoisyTune's perturbation (U - 1/2) * intensity * std in ``dtype``, U ~ U[0, 1) drawn in float32
    from a CPU generator seeded with ``seed``."""
    uniform = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (uniform.to(dtype) - 0.5) * (intensity * std)


class CascadeLoraAdapter(Adapter):
    """lora_A (r, d_in) kaiming-uniform(a=sqrt 5), lora_B (d_out, r) zeros; persistent buffers
    backbone (d_out, d_in) in W's dtype (W plus stage-0 noise at construction), optimizer_steps and
    cascades (int64 counters). Under FSDP2 the backbone (a buffer) is not sharded: every rank folds
    the gathered pair and draws the same noise.
    """

    def __init__(self, config: CascadeLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features)
        factory = adapter_factory(weight)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **factory))
        self.register_buffer("backbone", weight.detach().clone())
        counter = {"dtype": torch.int64, "device": weight.device}
        self.register_buffer("optimizer_steps", torch.zeros((), **counter))
        self.register_buffer("cascades", torch.zeros((), **counter))
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self.scale = config.scale
        self.keep = 1.0 - float(config.slow_momentum)
        self.layer_index = layer_index
        self.noise_stds: list[float] = []
        # host copies of the counters: no device read per forward or step
        self._steps = 0
        self._cascades = 0
        self.reset_parameters()
        self._add_noise()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh fast pair: A kaiming-uniform(a=sqrt 5), B zeros.

        A is drawn whole from the default generator on every rank (the same values as one process
        draws) and each rank keeps its shard when the pair is sharded (FSDP2).
        """
        new_a = nn.init.kaiming_uniform_(torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype,
                                                     device=self.lora_A.device), a=math.sqrt(5))
        copy_full_(self.lora_A, new_a)
        copy_full_(self.lora_B, torch.zeros(self.lora_B.shape, dtype=self.lora_B.dtype, device=self.lora_B.device))

    def noise_seed_of(self, stage: int) -> int:
        """The seed of stage ``stage``'s backbone noise in this layer."""
        return ((self.config.noise_seed * _SEED_MIX + self.layer_index) * _SEED_MIX + stage) % 2**63

    @torch.no_grad()
    def _add_noise(self) -> None:
        """W_k += (U - 1/2) * noise_intensity * std(W_k) for the current stage k (nothing when 0)."""
        intensity = float(self.config.noise_intensity)
        if intensity == 0:
            return
        dtype = torch.promote_types(self.backbone.dtype, torch.float32)
        std = float(self.backbone.to(dtype).std())
        noise = backbone_noise(self.backbone.shape, std, intensity, self.noise_seed_of(self._cascades), dtype)
        self.backbone.add_(noise.to(device=self.backbone.device, dtype=self.backbone.dtype))
        self.noise_stds.append(std)

    @torch.no_grad()
    def refresh_counters(self) -> None:
        """Host copies of optimizer_steps and cascades <- the buffers (after a load)."""
        self._steps = int(self.optimizer_steps)
        self._cascades = int(self.cascades)

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        """The fast pair's arguments; the layer multiplies x by ``backbone`` in place of W."""
        return {"lora_a": self.lora_A, "lora_b": self.lora_B, "scale": self.scale}

    def delta_weight(self, weight: Tensor) -> Tensor:
        """ΔW = (W_k - W) + s B A (d_out, d_in) in W's dtype."""
        dtype = torch.promote_types(weight.dtype, torch.float32)  # a half-precision difference would round
        fast = self.scale * (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype))
        return (self.backbone.to(dtype) - weight.to(dtype) + fast).to(weight.dtype)

    @torch.no_grad()
    def cascade_step(self) -> None:
        """End the stage: W_k += (1 - slow_momentum) * s * B A, then a fresh pair and the next stage's
        noise."""
        fast = full_view(self.lora_B) @ full_view(self.lora_A)  # a sharded pair is gathered: every rank folds it
        self.backbone.add_((fast * (self.keep * self.scale)).to(self.backbone.dtype))
        self._cascades += 1
        self.cascades.fill_(self._cascades)
        self.reset_parameters()
        self._add_noise()

    @torch.no_grad()
    def after_optimizer_step(self, learning_rate: float) -> tuple[nn.Parameter, ...]:
        """Count the step; every cascade_interval-th step runs ``cascade_step`` and returns the
        restarted pair (its optimizer state is dropped by the training hooks)."""
        self._steps += 1
        self.optimizer_steps.fill_(self._steps)
        interval = self.config.cascade_interval
        if interval is None or self._steps % interval != 0:
            return ()
        self.cascade_step()
        return (self.lora_A, self.lora_B)

    def extra_stats(self) -> dict[str, float]:
        return {"cascades": float(self._cascades), "optimizer_steps": float(self._steps)}


register_method(CascadeLoraConfig, CascadeLoraAdapter)

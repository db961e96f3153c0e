"""NEAT / PEANuT (arXiv 2410.01870; HF peft's PeanutConfig): a nonlinear update computed from W.

    H  = act(W^T A_n^T)                                   (d_in, r), fastlora.kernels.neat_projection
    H' = f(H): depth encoder/decoder pairs of r x r layers (no bias), U-Net order:
         encoders  h_i = act(h_{i-1} E_i^T), keeping skips s_i = h_{i-1};
         decoders  h = act(h D_i^T) + s_{depth+1-i}
    y  = x W^T + b + scale * (x H') B_n^T                  (adapted_linear with A = H'^T, B = B_n)

So ΔW = scale * B_n H'^T (d_out, d_in); the dense delta is never built on the forward path.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fastlora.kernels import neat_projection
from fastlora.kernels.activations import activation

from ..config import NeatConfig
from ..peft_formats import PEANUT_FORMAT
from ..registry import register_method
from .base import Adapter, adapter_factory
from .stamps import TensorStamp, trackable


class NeatAdapter(Adapter):
    """neat_A = A_n (r, d_out) kaiming-uniform(a=sqrt 5), neat_B = B_n (d_out, r) zeros,
    encoders.{i} / decoders.{i}: nn.Linear(r, r, bias=False) kaiming-uniform(a=sqrt 5).

    Names map one-to-one to peft's PEANuT layer: peanut_A.weight -> neat_A,
    peanut_B.weight -> neat_B, peanut_encoders.{i}.weight -> encoders.{i}.weight,
    peanut_decoders.{i}.weight -> decoders.{i}.weight.
    In eval mode without grad, H'^T is cached and reused while W, the parameters and
    the autocast state are unchanged (checked by tensor identity, storage and version
    counter, which every in-place op bumps: optimizer steps, merge, load_state_dict).
    The cache is one (key, value) pair read and replaced whole, so threads sharing the
    layer under different grad or autocast states never get another state's value.
    """


    def __init__(self, config: NeatConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight.device)
        factory = adapter_factory(weight)
        r = config.r
        self.neat_A = nn.Parameter(torch.empty(r, out_features, **factory))
        self.neat_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.encoders = nn.ModuleList(nn.Linear(r, r, bias=False, **factory) for _ in range(config.depth))
        self.decoders = nn.ModuleList(nn.Linear(r, r, bias=False, **factory) for _ in range(config.depth))
        self.activation = config.activation
        self.scale = config.scale
        self._cache: Optional[tuple[TensorStamp, Tensor]] = None  # eval's H'^T and what it was formed from
        self.reset_parameters()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the cached projection (and its stamp of the original's tensors) behind."""
        return {**super().__getstate__(), "_cache": None}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.neat_A, a=math.sqrt(5))
        nn.init.zeros_(self.neat_B)
        for layer in (*self.encoders, *self.decoders):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))

    def projection(self, weight: Tensor) -> Tensor:
        """H' = f(act(W^T A_n^T)) (d_in, r), in the adapter's dtype."""
        h = neat_projection(weight, self.neat_A, self.activation, backend=self.config.backend)
        h = h.to(self.neat_A.dtype)
        skips = []
        for encoder in self.encoders:
            skips.append(h)
            h = activation(self.activation, encoder(h))
        for decoder, skip in zip(self.decoders, reversed(skips)):
            h = activation(self.activation, decoder(h)) + skip
        return h

    def clear_cache(self) -> None:
        """Drop the cached H'^T (needed only after in-place edits through ``.data``, which
        tensor versions do not see; ``train()`` / ``eval()`` also clear it)."""
        self._cache = None

    def train(self, mode: bool = True) -> "NeatAdapter":
        self.clear_cache()
        return super().train(mode)

    def _down_factor(self, weight: Tensor) -> Tensor:
        """A = H'^T (r, d_in); cached in eval mode without grad, recomputed otherwise."""
        if self.training or torch.is_grad_enabled():
            self.clear_cache()
            return self.projection(weight).t()
        if torch.compiler.is_compiling():  # traced: the projection is part of the graph
            return self.projection(weight).t()
        tensors = (weight, *self.parameters())  # what H' depends on (see ``stamps.trackable``)
        device = weight.device.type
        autocast = (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device),)
        cache = self._cache  # one read: another thread may replace the pair meanwhile
        if cache is not None and cache[0].matches(tensors, autocast):  # (stamps only where they can follow)
            return cache[1]
        if not trackable(tensors):
            return self.projection(weight).t()
        stamp = TensorStamp(tensors, autocast)
        value = self.projection(weight).t()
        self._cache = (stamp, value)
        return value

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        return {"lora_a": self._down_factor(weight), "lora_b": self.neat_B, "scale": self.scale}

    def delta_weight(self, weight: Tensor) -> Tensor:
        """ΔW = scale * B_n H'^T with H' formed from W in the widest of W's, A_n's and fp32 dtypes (as PEFT
        merges; the forward forms it in W's dtype), so a merge into a half-precision W rounds once."""
        wide = torch.promote_types(torch.promote_types(weight.dtype, self.neat_A.dtype), torch.float32)
        return super().delta_weight(weight.detach().to(wide))


register_method(NeatConfig, NeatAdapter, peft_format=PEANUT_FORMAT)

"""CURLoRA (arXiv 2408.14572): y = x W^T + b + alpha ((x R^T) U^T) C^T.

C = W[:, J] (d_out, r) and R = W[I, :] (r, d_in) are columns and rows of the frozen W
sampled with inverted norm probabilities; U (r, r), zero-initialised, is the only
trainable tensor. C and R are never copied: the fused op gathers them by index.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fastlora.kernels.caller_warnings import warn_at_caller

from ..config import CurLoraConfig
from ..registry import register_method
from .base import Adapter, adapter_factory


def inverted_probabilities(weight: Tensor, dim: int, eps: float) -> Tensor:
    """q ∝ 1 / (p + eps) in float32, with p the squared-norm share of W's columns (dim=0,
    p_j = ||W[:, j]||^2 / ||W||_F^2, length d_in) or rows (dim=1, length d_out)."""
    squared = weight.float().square().sum(dim)
    total = squared.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError(f"CURLoRA needs a finite, nonzero weight; ||W||_F^2 = {float(total)}")
    shifted = squared / total + eps
    zero = torch.nonzero(shifted <= 0).flatten()
    if zero.numel():
        what = "column" if dim == 0 else "row"
        raise ValueError(f"W {what} {int(zero[0])} is all zeros, so 1/(p + eps) is infinite with eps={eps}; "
                         f"use eps > 0")
    inverted = 1.0 / shifted
    return inverted / inverted.sum()


def sample_cur_indices(weight: Tensor, r: int, eps: float, seed: int) -> tuple[Tensor, Tensor]:
    """(I, J): r row indices (into d_out) and r column indices (into d_in) of W, int64 on
    W's device, drawn with replacement from ``inverted_probabilities`` (columns first,
    then rows, as the authors' code), no de-duplication.

    Sampling runs on the CPU with ``torch.Generator().manual_seed(seed)``, so the same
    W and seed give the same indices on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    col_q = inverted_probabilities(weight, 0, eps).cpu()
    row_q = inverted_probabilities(weight, 1, eps).cpu()
    cols = torch.multinomial(col_q, r, replacement=True, generator=generator)
    rows = torch.multinomial(row_q, r, replacement=True, generator=generator)
    return rows.to(weight.device), cols.to(weight.device)


class CurLoraAdapter(Adapter):
    """CURLoRA on one Linear: buffers row_index I (r,) and col_index J (r,) (int64,
    persistent, so save/load reproduces the layer), parameter U (r, r) zeros.

    The sampler of layer k is seeded with ``config.seed + k`` (k = layer_index, the
    layer's position among adapted layers), so layers draw different indices and a
    model rebuilt with the same seed draws the same ones.
    ΔW = alpha C U R = alpha W[:, J] U W[I, :].
    """

    def __init__(self, config: CurLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight.device)
        if weight.is_meta:
            raise ValueError("CURLoRA draws its row and column indices from W's values when the layer is built, and "
                             "this W is on the meta device (no values): build the layer from a Linear that holds "
                             "its weights (AdapterLinear.from_linear, or inject into a loaded model)")
        rows, cols = sample_cur_indices(weight.detach(), config.r, config.eps, config.seed + layer_index)
        self.register_buffer("row_index", rows)
        self.register_buffer("col_index", cols)
        self.U = nn.Parameter(torch.zeros(config.r, config.r, **adapter_factory(weight)))
        self.scale = config.alpha

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """U zeros (the indices stay: they are W's, drawn at build)."""
        nn.init.zeros_(self.U)

    def note_load(self, with_weight: bool) -> None:
        self._loading_weight = with_weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A load that replaces W without the indices (pretrained weights loaded after inject, strict=False)
        leaves indices drawn from another W: warned, naming the order that draws them from the loaded one."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if getattr(self, "_loading_weight", False) and prefix + "row_index" not in state_dict:
            warn_at_caller("fastlora: a load replaced the W of CURLoRA layers but not their row and column indices, "
                           "which were drawn from the W they had when built: inject after loading the pretrained "
                           "weights, so that CURLoRA samples them from those", RuntimeWarning)
        self._loading_weight = False

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        return {"lora_a": None, "row_index": self.row_index, "lora_b": None, "col_index": self.col_index,
                "middle": self.U, "scale": self.scale}


register_method(CurLoraConfig, CurLoraAdapter)

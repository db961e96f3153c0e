"""Plain LoRA (PEFT-compatible names): y = x W^T + b + s (dropout(x) A^T) B^T."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..peft_formats import LORA_FORMAT
from ..registry import register_method
from .base import Adapter, adapter_factory


class LoraAdapter(Adapter):
    """lora_A (r, d_in) kaiming-uniform(a=sqrt 5), lora_B (d_out, r) zeros, s = alpha/r."""

    def __init__(self, config: LoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight.device)
        factory = adapter_factory(weight)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **factory))
        self.scale = config.scale
        LoraAdapter.reset_parameters(self)  # a subclass's override also resets tensors it has not built yet

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        return {"lora_a": self.lora_A, "lora_b": self.lora_B, "scale": self.scale}


register_method(LoraConfig, LoraAdapter, peft_format=LORA_FORMAT)

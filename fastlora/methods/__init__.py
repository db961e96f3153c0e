"""The methods: importing each module registers it (fastlora.registry); ``build_adapter`` looks them up."""
from __future__ import annotations

from torch import Tensor

from ..config import AdapterConfig
from ..registry import ADAPTER_TYPES, method_of
from .base import Adapter
from .cascade import CascadeLoraAdapter
from .curlora import CurLoraAdapter
from .lora import LoraAdapter
from .neat import NeatAdapter
from .rank_selective import RankSelectiveLoraAdapter
from .selective import SelectiveLoraAdapter

__all__ = ["ADAPTER_TYPES", "Adapter", "CascadeLoraAdapter", "CurLoraAdapter", "LoraAdapter", "NeatAdapter",
           "RankSelectiveLoraAdapter", "SelectiveLoraAdapter", "build_adapter"]


def build_adapter(config: AdapterConfig, in_features: int, out_features: int, weight: Tensor,
                  layer_index: int = 0) -> Adapter:
    """The adapter of ``config``'s method (a subclass's nearest registered base) for a Linear with this
    weight (d_out, d_in).

    layer_index: the layer's position among adapted layers (seeds per-layer sampling).
    """
    return method_of(config).adapter(config, in_features, out_features, weight, layer_index=layer_index)

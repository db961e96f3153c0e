"""Method registry: config type -> Adapter class."""
from __future__ import annotations

from torch import Tensor

from ..config import AdapterConfig, CurLoraConfig, LoraConfig, NeatConfig
from ..config import CascadeLoraConfig
from ..config import RankSelectiveLoraConfig, SelectiveLoraConfig
from .base import Adapter
from .cascade import CascadeLoraAdapter
from .curlora import CurLoraAdapter
from .lora import LoraAdapter
from .neat import NeatAdapter
from .rank_selective import RankSelectiveLoraAdapter
from .selective import SelectiveLoraAdapter

ADAPTER_TYPES: dict[type, type[Adapter]] = {
    LoraConfig: LoraAdapter,
    CurLoraConfig: CurLoraAdapter,
    NeatConfig: NeatAdapter,
    CascadeLoraConfig: CascadeLoraAdapter,
    SelectiveLoraConfig: SelectiveLoraAdapter,
    RankSelectiveLoraConfig: RankSelectiveLoraAdapter,
}


def build_adapter(config: AdapterConfig, in_features: int, out_features: int, weight: Tensor,
                  layer_index: int = 0) -> Adapter:
    """The adapter of ``config``'s method for a Linear with this weight (d_out, d_in).

    layer_index: the layer's position among adapted layers (seeds per-layer sampling).
    """
    adapter_type = ADAPTER_TYPES.get(type(config))
    if adapter_type is None:
        raise ValueError(f"no adapter registered for {type(config).__name__}")
    return adapter_type(config, in_features, out_features, weight, layer_index=layer_index)

"""AdapterLinear: a drop-in nn.Linear whose frozen base and adapter run as one fused op."""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.kernels import adapted_linear, adapted_linear_reference

from .config import AdapterConfig
from .methods import Adapter, build_adapter

_MERGE_COUNTER = itertools.count()


class AdapterLinear(nn.Module):
    """y = x W^T + b + the adapter's low-rank update, with W and b frozen.

    Same ``in_features``, ``out_features``, ``weight`` (d_out, d_in) and ``bias`` as
    nn.Linear, so code and state dicts that read them keep working. Build it like
    nn.Linear (``AdapterLinear(d_in, d_out, config=...)``) or wrap an existing layer
    with ``AdapterLinear.from_linear(linear, config)`` (shares its tensors).

    Merging: ``merge()`` adds ΔW into W in place and keeps a copy of the W it found (a
    non-persistent buffer on W's device: merging costs one more W of memory; ``to_linear``
    / ``merge_and_unload`` keep none). ``unmerge()`` copies that W back, bit for bit,
    whatever changed meanwhile (an optimizer step, a training rule, a gate flip, a hand edit
    of the adapter, a write into the merged W itself, which is lost). While merged the layer
    computes x W^T + b with the merged W, or with the kept W when its adapter is disabled.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: AdapterConfig, device=None, dtype=None, layer_index: int = 0) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, config, layer_index)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: AdapterConfig, layer_index: int = 0, *,
                    start: bool = True) -> "AdapterLinear":
        """Wrap ``linear``: its weight and bias become this layer's frozen base (not copied).
        ``start=False`` defers ``adapter.start()`` (a method's first writes to W) to the caller."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(linear.weight, linear.bias, config, layer_index, start)
        return layer

    def _attach(self, weight: nn.Parameter, bias: Optional[nn.Parameter], config: AdapterConfig,
                layer_index: int, start: bool = True) -> None:
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.config = config
        self.adapter: Adapter = build_adapter(config, self.in_features, self.out_features,
                                              weight.detach(), layer_index=layer_index)
        self.adapter.bind(self)
        if start:
            self.adapter.start()
        self.merged = False
        self.merge_order = -1  # position of the latest merge among all layers' merges
        self.adapter_enabled = True
        self.register_buffer("weight_before_merge", None, persistent=False)

    def _base_weight(self) -> Tensor:
        """W without the adapter's update: the kept W while merged."""
        return self.weight_before_merge if self.merged else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged and self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return F.linear(x, self._base_weight(), self.bias)
        dropout = self.config.dropout if self.training else 0.0
        return adapted_linear(x, self.weight, self.bias, dropout=dropout, backend=self.config.backend,
                              **self.adapter.op_arguments(self.weight))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.adapter.note_load(with_weight=prefix + "weight" in state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same output computed by the pure-torch reference formula (no fusion, no
        skipping, no dropout): the specification the fused path is checked against. Factors
        of another float dtype than x (fp32 adapters over a half-precision W) are cast to x's
        dtype, as the fused op does outside autocast."""
        if self.merged and self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return F.linear(x, self._base_weight(), self.bias)
        args = {"lora_a": None, "lora_b": None, **self.adapter.op_arguments(self.weight)}
        args.pop("gate_value", None)  # the host copy of a tensor gate: the reference reads the gate itself
        args = {k: v.to(x.dtype) if isinstance(v, Tensor) and v.is_floating_point() and k != "gate" else v
                for k, v in args.items()}
        return adapted_linear_reference(x, self.weight, self.bias, **args)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW, keeping the W it replaces for ``unmerge`` (a no-op when merged)."""
        if self.merged:
            return
        delta = self.adapter.delta_weight(self.weight).to(self.weight.dtype)
        self.weight_before_merge = self.weight.detach().clone()
        self.weight.add_(delta)
        self.merged = True
        self.merge_order = next(_MERGE_COUNTER)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W <- the W kept at merge time, bit for bit (a no-op when not merged)."""
        if not self.merged:
            return
        self.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + ΔW (this layer is left as it is)."""
        weight = self.weight if self.merged else self.weight + self.adapter.delta_weight(self.weight)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.config.method}, r={self.config.r}, "
                f"merged={self.merged}")

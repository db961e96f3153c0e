"""AdapterLinear: a drop-in nn.Linear whose frozen base and adapter run as one fused op;
AdapterMultiheadAttention: nn.MultiheadAttention whose packed q/k/v in-projection and out_proj are
AdapterLinear layers (the attention between them is torch's own computation, restated here)."""
from __future__ import annotations

import itertools
import math
import sys
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.kernels import adapted_linear, adapted_linear_reference

from .config import AdapterConfig
from .methods import Adapter, CascadeLoraAdapter, build_adapter

_MERGE_COUNTER = itertools.count()
#: the name of the adapter ``inject`` builds
DEFAULT_ADAPTER = "default"


def conv1d_type() -> Optional[type]:
    """transformers' Conv1D class (GPT-2's linear layer) once transformers is loaded, else None
    (a model holding a Conv1D has loaded it)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_adaptable(module: nn.Module) -> bool:
    """Whether ``inject`` adapts ``module``: an nn.Linear or transformers' Conv1D (not subclasses)."""
    return type(module) is nn.Linear or (conv1d_type() is not None and type(module) is conv1d_type())


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an nn.Linear or a Conv1D (whose weight is stored (d_in, d_out))."""
    d_out, d_in = module.weight.shape
    return (d_in, d_out) if type(module) is conv1d_type() else (d_out, d_in)


class AdapterLinear(nn.Module):
    """y = x W^T + b + the adapter's low-rank update, with W and b frozen.

    Same ``in_features``, ``out_features``, ``weight`` (d_out, d_in) and ``bias`` as
    nn.Linear, so code and state dicts that read them keep working. Build it like
    nn.Linear (``AdapterLinear(d_in, d_out, config=...)``) or wrap an existing layer
    with ``AdapterLinear.from_linear(linear, config)`` (shares its tensors).

    Merging: ``merge()`` adds ΔW into W in place and keeps a copy of the W it found (a
    non-persistent buffer, on W's device by default: merging costs one more W of memory there;
    ``merge(backup_device="cpu")`` keeps it in host memory instead; ``to_linear`` /
    ``merge_and_unload`` keep none). ``unmerge()`` copies that W back, bit for bit,
    whatever changed meanwhile (an optimizer step, a training rule, a gate flip, a hand edit
    of the adapter, a write into the merged W itself, which is lost). While merged the layer
    computes x W^T + b with the merged W, or with the kept W when its adapter is disabled.

    GPT-2's Conv1D (weight stored (d_in, d_out), y = x W + b) is wrapped by ``from_linear``
    too (``fan_in_fan_out``): ``weight`` is then the (d_out, d_in) transposed view of its weight
    (no copy; merging writes through it), and state dicts keep Conv1D's (d_in, d_out) layout.

    LoRASC: the layer's first forward in training mode of each stage (adapter enabled, not merged)
    adds that stage's noise to W before it computes (``CascadeLoraAdapter.start_training``).

    On the meta device (no values) a forward of meta inputs gives a meta output of the right shape and
    dtype, as nn.Linear does; a real input is refused, naming the layer's device.

    Named adapters: ``adapter`` (and ``config``) is the active one, called ``adapter_name``
    ("default" from ``inject``); others wait in ``inactive_adapters`` with their parameters frozen
    (``add_named_adapter``, ``activate``, ``remove_adapter``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: AdapterConfig, device=None, dtype=None, layer_index: int = 0) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, config, layer_index)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: AdapterConfig, layer_index: int = 0, *,
                    start: bool = True) -> "AdapterLinear":
        """Wrap ``linear`` (an nn.Linear or transformers' Conv1D): its weight and bias become this
        layer's frozen base (not copied; a Conv1D's weight as its transposed view).
        ``start=False`` defers ``adapter.start()`` (a method's first writes to W) to the caller."""
        fan_in_fan_out = conv1d_type() is not None and type(linear) is conv1d_type()
        if not (fan_in_fan_out or isinstance(linear, nn.Linear)):
            raise TypeError(f"expected an nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        weight = nn.Parameter(linear.weight.detach().t(), requires_grad=False) if fan_in_fan_out else linear.weight
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(weight, linear.bias, config, layer_index, start, fan_in_fan_out)
        if not fan_in_fan_out and type(linear) is not nn.Linear:
            layer.plain_type = type(linear)  # an nn.Linear subclass (MultiheadAttention's out_proj) comes back as such
        return layer

    def _attach(self, weight: nn.Parameter, bias: Optional[nn.Parameter], config: AdapterConfig,
                layer_index: int, start: bool = True, fan_in_fan_out: bool = False) -> None:
        self.fan_in_fan_out = fan_in_fan_out
        self.plain_type: type = nn.Linear
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
        self.adapter_name = DEFAULT_ADAPTER
        self._inactive_flags: dict[str, list[bool]] = {}  # requires_grad of each inactive adapter's parameters
        self.merged = False
        self.merge_order = -1  # position of the latest merge among all layers' merges
        self.adapter_enabled = True
        self.register_buffer("weight_before_merge", None, persistent=False)

    def _base_weight(self) -> Tensor:
        """W without the adapter's update: the kept W while merged (copied to W's device when kept elsewhere)."""
        if not self.merged:
            return self.weight
        return self.weight_before_merge.to(self.weight.device, non_blocking=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged and self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return F.linear(x, self._base_weight(), self.bias)
        if self.weight.is_meta:
            return self._meta_forward(x)
        adapter = self.adapter
        if self.training and isinstance(adapter, CascadeLoraAdapter) and adapter.pending_start:
            adapter.start_training(self.weight)  # a LoRASC stage's first training forward: its noise into W
        dropout = self.config.dropout if self.training else 0.0
        return adapted_linear(x, self.weight, self.bias, dropout=dropout, backend=self.config.backend,
                              **self.adapter.op_arguments(self.weight))

    def forward_rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Output features start:stop of ``forward(x)`` (rows start:stop of W, b and the update), computed
        alone: one block of a packed projection (MultiheadAttention's q, k, v from different inputs)."""
        if self.merged or not self.adapter_enabled:
            weight = self.weight if self.adapter_enabled else self._base_weight()
            return F.linear(x, weight[start:stop], None if self.bias is None else self.bias[start:stop])
        if self.weight.is_meta:
            return self._meta_forward(x)[..., start:stop]
        adapter = self.adapter
        if self.training and isinstance(adapter, CascadeLoraAdapter) and adapter.pending_start:
            adapter.start_training(self.weight)
        args = dict(adapter.op_arguments(self.weight))
        if args.get("row_index") is not None:  # A = rows of the whole W (CURLoRA), gathered before W is cut
            args["lora_a"], args["row_index"] = self.weight[args["row_index"]], None
        if args.get("lora_b") is not None:
            args["lora_b"] = args["lora_b"][start:stop]  # B = W[:, J] (CURLoRA) is cut with W
        dropout = self.config.dropout if self.training else 0.0
        bias = None if self.bias is None else self.bias[start:stop]
        return adapted_linear(x, self.weight[start:stop], bias, dropout=dropout, backend=self.config.backend, **args)

    def _meta_forward(self, x: Tensor) -> Tensor:
        """The output's shape and dtype for a layer on the meta device (as nn.Linear gives there): the
        reference formula on meta tensors; an input with values is refused, naming the cause."""
        if not x.is_meta:
            raise ValueError(f"this AdapterLinear ({self.in_features} -> {self.out_features}) is on the meta device "
                             f"(no values) and the input on {x.device}: materialise the layer first (e.g. "
                             f"to_empty(device=...) and load its weights, or inject into a loaded model)")
        return self.reference_forward(x)

    def adapter_names(self) -> list[str]:
        """The active adapter's name, then the inactive ones' in the order they were added."""
        inactive = self._modules.get("inactive_adapters")
        return [self.adapter_name, *(inactive or {})]

    def named_adapter(self, name: str) -> Adapter:
        """The adapter called ``name`` (active or not)."""
        if name == self.adapter_name:
            return self.adapter
        if name not in self.adapter_names():
            raise KeyError(f"no adapter named {name!r} (adapters: {self.adapter_names()})")
        return self.inactive_adapters[name]

    def add_named_adapter(self, name: str, adapter: Adapter) -> None:
        """Keep ``adapter`` under ``name``, inactive (its parameters frozen until it is activated)."""
        if name in self.adapter_names():
            raise ValueError(f"an adapter named {name!r} exists already")
        if "inactive_adapters" not in self._modules:
            self.inactive_adapters = nn.ModuleDict()
        self._deactivate(name, adapter)
        adapter.bind(self)

    def _deactivate(self, name: str, adapter: Adapter) -> None:
        self._inactive_flags[name] = [p.requires_grad for p in adapter.parameters()]
        adapter.requires_grad_(False)
        self.inactive_adapters[name] = adapter

    def activate(self, name: str) -> None:
        """Make the adapter ``name`` the one this layer computes with (its parameters' requires_grad
        as when it was last active; the one it replaces is kept, frozen). Refused while merged."""
        if name == self.adapter_name:
            return
        adapter = self.named_adapter(name)
        if self.merged:
            raise ValueError(f"cannot switch to adapter {name!r}: adapter {self.adapter_name!r} is merged into W; "
                             f"unmerge first")
        del self.inactive_adapters[name]
        for param, flag in zip(adapter.parameters(), self._inactive_flags.pop(name)):
            param.requires_grad_(flag)
        self._deactivate(self.adapter_name, self.adapter)
        self.adapter, self.config, self.adapter_name = adapter, adapter.config, name

    def remove_adapter(self, name: str) -> None:
        """Drop the inactive adapter ``name`` (the active one is refused: activate another first)."""
        if name == self.adapter_name:
            raise ValueError(f"adapter {name!r} is the active adapter; set another adapter active before deleting "
                             f"it (or unload the adapters)")
        self.named_adapter(name)
        del self.inactive_adapters[name]
        del self._inactive_flags[name]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fan_in_fan_out:  # Conv1D's layout, (d_in, d_out)
            destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "weight"
        self.adapter.note_load(with_weight=key in state_dict)
        saved = state_dict.get(key)
        if self.fan_in_fan_out and isinstance(saved, Tensor) and saved.dim() == 2:
            state_dict[key] = saved.t()  # Conv1D's layout back to this layer's (d_out, d_in)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            if saved is not None:
                state_dict[key] = saved

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same output computed by the pure-torch reference formula (no fusion, no
        skipping, no dropout): the specification the fused path is checked against. Factors
        of another float dtype than x (fp32 adapters over a half-precision W) are cast to x's
        dtype, as the fused op does outside autocast."""
        if self.merged and self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return F.linear(x, self._base_weight(), self.bias)
        adapter = self.adapter
        if self.training and isinstance(adapter, CascadeLoraAdapter) and adapter.pending_start \
                and not self.weight.is_meta:
            adapter.start_training(self.weight)  # as ``forward``
        args = {"lora_a": None, "lora_b": None, **self.adapter.op_arguments(self.weight)}
        args.pop("gate_value", None)  # the host copy of a tensor gate: the reference reads the gate itself
        args = {k: v.to(x.dtype) if isinstance(v, Tensor) and v.is_floating_point() and k != "gate" else v
                for k, v in args.items()}
        return adapted_linear_reference(x, self.weight, self.bias, **args)

    @torch.no_grad()
    def merge(self, backup_device: Optional[Union[str, torch.device]] = None) -> None:
        """W <- W + ΔW, keeping the W it replaces for ``unmerge`` (a no-op when merged) on
        ``backup_device``: W's own device by default, e.g. "cpu" to spend host memory instead of
        GPU memory (unmerge and the disabled-adapter forward while merged then copy it back)."""
        if self.merged:
            return
        device = self.weight.device if backup_device is None else torch.device(backup_device)
        delta = self.adapter.delta_weight(self.weight).to(self.weight.dtype)
        self.weight_before_merge = self.weight.detach().to(device, copy=True)
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
    def to_linear(self) -> nn.Module:
        """A plain layer of the kind this one wraps (nn.Linear, or Conv1D) holding W + ΔW in new
        tensors (this layer is left as it is)."""
        weight = self.weight if self.merged else self.weight + self.adapter.delta_weight(self.weight)
        weight = weight.t() if self.fan_in_fan_out else weight
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return self.plain_layer(nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format)), bias)

    def plain_layer(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Module:
        """An nn.Linear (a Conv1D for a layer built from one, the nn.Linear subclass it was built from)
        holding ``weight`` (in that layer's layout) and ``bias`` themselves, in this layer's training mode."""
        with torch.device("meta"):
            if self.fan_in_fan_out:
                module = conv1d_type()(self.out_features, self.in_features)
            else:
                module = getattr(self, "plain_type", nn.Linear)(self.in_features, self.out_features,
                                                                 bias=bias is not None)
        module.weight, module.bias = weight, bias
        return module.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.config.method}, r={self.config.r}, "
                f"merged={self.merged}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


def is_attention(module: nn.Module) -> bool:
    """Whether ``inject`` adapts ``module`` as an attention layer: an nn.MultiheadAttention (not a subclass)
    with one packed in-projection (query, key and value of embed_dim features)."""
    return type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim


def _keep_in_proj_keys(module: "AdapterMultiheadAttention", state_dict, prefix: str, local_metadata) -> None:
    """State dicts keep nn.MultiheadAttention's keys: in_proj_weight / in_proj_bias, not in_proj.weight / .bias."""
    for name in ("weight", "bias"):
        state_dict.pop(f"{prefix}in_proj.{name}", None)


class AdapterMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with its packed in-projection and its out_proj adapted, as PEFT adapts it.

    ``in_proj``: the in-projection as a layer, W = in_proj_weight (3 E, E) and b = in_proj_bias (the same
    tensors, so ``in_proj_weight`` still reads them); ``out_proj``: the output projection. Each is an
    AdapterLinear (merge, unmerge, training rules, checkpoints as any adapted layer, under the names
    "<attention>.in_proj" and "<attention>.out_proj") or, when not adapted, a plain nn.Linear. The forward
    runs each projection through the fused op (q, k and v from one call when query, key and value are
    one tensor; else each from its rows of W and of the update) and between them computes what
    ``nn.functional.multi_head_attention_forward`` computes (masks, is_causal, bias_k / bias_v,
    add_zero_attn, attention dropout, need_weights, batch_first, unbatched inputs). State dicts keep
    nn.MultiheadAttention's keys (in_proj_weight, in_proj_bias, out_proj.weight, ...) beside the adapters'.
    Separate q/k/v projection weights (kdim or vdim other than embed_dim) are not adapted.
    """

    @classmethod
    def from_attention(cls, attention: nn.MultiheadAttention, in_config: Optional[AdapterConfig],
                       out_config: Optional[AdapterConfig], layer_index: int = 0, *,
                       start: bool = True) -> "AdapterMultiheadAttention":
        """Wrap ``attention`` (sharing its tensors): the in-projection adapted with ``in_config`` (layer
        index ``layer_index``) and out_proj with ``out_config`` (``layer_index + 1``); None leaves one plain."""
        if not is_attention(attention):
            raise TypeError(f"expected an nn.MultiheadAttention with one packed in-projection (kdim = vdim = "
                            f"embed_dim), got {type(attention).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(layer, name, getattr(attention, name))
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            layer.register_parameter(name, None)
        layer.bias_k, layer.bias_v = attention.bias_k, attention.bias_v
        embed = attention.embed_dim
        with torch.device("meta"):
            packed = nn.Linear(embed, 3 * embed, bias=attention.in_proj_bias is not None)
        packed.weight, packed.bias = attention.in_proj_weight, attention.in_proj_bias
        layer.in_proj = packed if in_config is None else \
            AdapterLinear.from_linear(packed, in_config, layer_index, start=start)
        layer.out_proj = attention.out_proj if out_config is None else \
            AdapterLinear.from_linear(attention.out_proj, out_config, layer_index + 1, start=start)
        layer._register_state_dict_hook(_keep_in_proj_keys)
        return layer.train(attention.training)

    @property
    def in_proj_weight(self) -> Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Optional[Tensor]:
        return self.in_proj.bias

    def adapted_projections(self) -> list[AdapterLinear]:
        return [m for m in (self.in_proj, self.out_proj) if isinstance(m, AdapterLinear)]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for name, tensor in (("in_proj_weight", self.in_proj.weight), ("in_proj_bias", self.in_proj.bias)):
            if tensor is not None:
                destination[prefix + name] = tensor if keep_vars else tensor.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("weight", "bias"):  # nn.MultiheadAttention's keys go to the in-projection layer
            if prefix + f"in_proj_{name}" in state_dict:
                state_dict[prefix + f"in_proj.{name}"] = state_dict.pop(prefix + f"in_proj_{name}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_attention(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention holding this layer's W + ΔW in new tensors (the plain projections'
        tensors and bias_k / bias_v themselves); this layer is left as it is."""
        with torch.device("meta"):
            plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                          bias=self.in_proj.bias is not None, add_bias_kv=self.bias_k is not None,
                                          add_zero_attn=self.add_zero_attn, batch_first=self.batch_first)
        in_proj = self.in_proj.to_linear() if isinstance(self.in_proj, AdapterLinear) else self.in_proj
        plain.in_proj_weight, plain.in_proj_bias = in_proj.weight, in_proj.bias
        plain.out_proj = self.out_proj.to_linear() if isinstance(self.out_proj, AdapterLinear) else self.out_proj
        plain.bias_k, plain.bias_v = self.bias_k, self.bias_v
        return plain.train(self.training)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (sequence first): one call for self-attention, else each from its rows of the packed W."""
        embed, in_proj = self.embed_dim, self.in_proj

        def rows(x: Tensor, start: int, stop: int) -> Tensor:
            if isinstance(in_proj, AdapterLinear):
                return in_proj.forward_rows(x, start, stop)
            bias = None if in_proj.bias is None else in_proj.bias[start:stop]
            return F.linear(x, in_proj.weight[start:stop], bias)

        if key is value:
            if query is key:
                packed = in_proj(query).unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2)
                packed = packed.contiguous()
                return packed[0], packed[1], packed[2]
            q = rows(query, 0, embed)
            pair = rows(key, embed, 3 * embed).unflatten(-1, (2, embed)).unsqueeze(0).transpose(0, -2)
            pair = pair.squeeze(-2).contiguous()
            return q, pair[0], pair[1]
        return rows(query, 0, embed), rows(key, embed, 2 * embed), rows(value, 2 * embed, 3 * embed)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if not self.adapted_projections():  # nothing adapted (unloaded): nn.MultiheadAttention's own forward
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:  # sequence first, keeping which inputs are the same tensor
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                need_weights: bool, attn_mask: Optional[Tensor], average_attn_weights: bool,
                is_causal: bool) -> tuple[Tensor, Optional[Tensor]]:
        """``F.multi_head_attention_forward`` on sequence-first inputs, its projections through the adapters."""
        heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed = query.shape
        if embed != self.embed_dim:
            raise ValueError(f"expected query of embed_dim {self.embed_dim} features, got {embed}")
        if key.shape != value.shape:
            raise ValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (nn.MultiheadAttention's rule)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention's own causal mask
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._project(query, key, value)
        src_len = key.shape[0]
        if attn_mask is not None and attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask is not None and tuple(attn_mask.shape) != (bsz * heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(bsz * heads, tgt_len, src_len)}.")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        head_dim = embed // heads
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            padding = padding.reshape(bsz * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q * math.sqrt(1.0 / float(head_dim))
            scores = torch.bmm(scores, k.transpose(-2, -1)) if attn_mask is None else \
                torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            probabilities = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                probabilities = F.dropout(probabilities, p=dropout_p)
            out = torch.bmm(probabilities, v).transpose(0, 1).reshape(tgt_len * bsz, embed)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            probabilities = probabilities.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                probabilities = probabilities.mean(dim=1)
            if not is_batched:
                return out.squeeze(1), probabilities.squeeze(0)
            return out, probabilities
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else \
                attn_mask.view(bsz, heads, -1, src_len)
        out = F.scaled_dot_product_attention(q.view(bsz, heads, tgt_len, head_dim),
                                             k.view(bsz, heads, src_len, head_dim),
                                             v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p, is_causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed)).view(tgt_len, bsz, -1)
        return (out if is_batched else out.squeeze(1)), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

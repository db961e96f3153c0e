"""AdapterLinear: a drop-in nn.Linear whose frozen base and adapter run as one fused op."""
from __future__ import annotations

import itertools
import numbers
import sys
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.kernels import adapted_linear, adapted_linear_reference

from .config import AdapterConfig
from .distributed import is_dtensor
from .methods import Adapter, CascadeLoraAdapter, build_adapter

_MERGE_COUNTER = itertools.count()
#: the name of the adapter ``inject`` builds
DEFAULT_ADAPTER = "default"


def check_adapter_name(name: object) -> None:
    """Refuse an adapter name that cannot key a layer's adapters (a module name): not a non-empty string
    without "."."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


def checked_backup_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device that holds values and is available here: a merge keeps the replaced W
    there for ``unmerge``."""
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)
    except (RuntimeError, TypeError, AssertionError) as error:
        raise ValueError(f"backup_device {device!r} is not a device this process can allocate on: {error}") from None
    if parsed.type == "meta":
        raise ValueError("backup_device 'meta' holds no values, so unmerge could not restore W; give a device "
                         "such as 'cpu'")
    return parsed


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


def _merge_again_after_load(layer: "AdapterLinear", incompatible_keys) -> None:
    """A layer that was merged when a state dict was loaded into it is merged again with the loaded
    adapter (its tensors load after the layer's own, hence a post-hook), its kept W where it was."""
    pending = layer.__dict__.pop("_merge_after_load", None)  # (backup device; None: W's device)
    if pending is not None:
        layer.merge(backup_device=pending[0])


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
    computes x W^T + b with the merged W, or with the kept W when its adapter is disabled. Its state
    dict holds the merged W as ``weight`` and the kept W as ``weight_before_merge``: it loads exactly into
    merged and unmerged layers (a merged layer loads as unmerged and merges again).

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
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AdapterLinear {name} must be an int >= 0, got {value!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"AdapterLinear dtype must be a real floating-point dtype, got {dtype!r}")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, config, layer_index)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: AdapterConfig, layer_index: int = 0) -> "AdapterLinear":
        """Wrap ``linear`` (an nn.Linear or transformers' Conv1D): its weight and bias become this
        layer's frozen base (not copied; a Conv1D's weight as its transposed view)."""
        fan_in_fan_out = conv1d_type() is not None and type(linear) is conv1d_type()
        if not (fan_in_fan_out or isinstance(linear, nn.Linear)):
            raise TypeError(f"expected an nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        weight = nn.Parameter(linear.weight.detach().t(), requires_grad=False) if fan_in_fan_out else linear.weight
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(weight, linear.bias, config, layer_index, fan_in_fan_out)
        if not fan_in_fan_out and type(linear) is not nn.Linear:
            layer.plain_type = type(linear)  # an nn.Linear subclass (MultiheadAttention's out_proj) comes back as such
        return layer

    def _attach(self, weight: nn.Parameter, bias: Optional[nn.Parameter], config: AdapterConfig,
                layer_index: int, fan_in_fan_out: bool = False) -> None:
        if not weight.is_floating_point():
            raise ValueError(f"AdapterLinear needs a real floating-point weight, got {weight.dtype}")
        index = layer_index
        if not isinstance(index, numbers.Integral) or isinstance(index, bool) or not 0 <= index < 2**62:
            raise ValueError(f"layer_index must be an int in [0, 2**62), got {layer_index!r}")
        layer_index = int(index)  # a numpy integer would wrap in the seeds' arithmetic
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
        self.adapter_name = DEFAULT_ADAPTER
        self._inactive_flags: dict[str, list[bool]] = {}  # requires_grad of each inactive adapter's parameters
        self.merged = False
        self.merge_order = -1  # position of the latest merge among all layers' merges
        self.adapter_enabled = True
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.register_load_state_dict_post_hook(_merge_again_after_load)

    @property
    def tasks_done(self) -> int:
        """How many tasks ``fastlora.next_task`` ended on this layer (the active adapter's count)."""
        return int(self.adapter.tasks_done)

    def base_weight(self) -> Tensor:
        """W without the adapter's update: the kept W while merged (copied to W's device when kept elsewhere)."""
        if not self.merged:
            return self.weight
        return self.weight_before_merge.to(self.weight.device, non_blocking=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.adapter_enabled:
            return F.linear(x, self.weight if self.adapter_enabled else self.base_weight(), self.bias)
        # each module attribute read once: a parameter's or submodule's read (nn.Module.__getattr__) costs
        # ~0.7 us of host time per call on a CPU
        weight, adapter, config = self.weight, self.adapter, self.config
        if weight.is_meta:
            return self._meta_forward(x)
        self._start_pending_stage(adapter)
        return adapted_linear(x, weight, self.bias, dropout=config.dropout if self.training else 0.0,
                              backend=config.backend, **adapter.op_arguments(weight))

    def _start_pending_stage(self, adapter: Adapter) -> None:
        """A LoRASC stage's first forward in training mode: the stage's noise into W. Under no_grad too:
        reentrant activation checkpointing runs the training forward under no_grad (and recomputes it
        in the backward, when the stage has started). ``adapter``: this layer's active adapter. Refused when
        W is not a parameter (torch.func.functional_call with plain tensors, a DataParallel replica): the
        noise belongs in the layer's own W. (Parameters given to functional_call in place of the layer's
        get it: the layer cannot tell them from its own.)"""
        if self.training and isinstance(adapter, CascadeLoraAdapter) and adapter.pending_start:
            if not isinstance(self.weight, nn.Parameter):
                raise RuntimeError(
                    f"{adapter.describe()}: a stage's noise goes into the layer's own W at the stage's first "
                    f"training forward, and this forward runs on a W that is not a parameter "
                    f"({type(self.weight).__name__}: torch.func.functional_call with other tensors, a replica of "
                    f"nn.DataParallel): attach the training hooks to the model you call (the DataParallel wrapper; "
                    f"they add it before the forward), run a training forward of the model itself first, or call "
                    f"the adapter's start_training()")
            if getattr(self, "_is_fsdp_managed_module", False):  # set by FSDP2's fully_shard
                raise RuntimeError(
                    f"{adapter.describe()}: under FSDP2 a LoRASC stage's noise must reach W before the forward "
                    f"(here W is the gathered copy FSDP2 discards after the forward, so the noise would be lost "
                    f"on every rank): attach the training hooks (fastlora.attach_training_hooks, FastLoraTrainer, "
                    f"FastLoraCallback), whose forward pre-hook adds it into each rank's shard, or call the "
                    f"adapter's start_training() outside the forward after each cascade_step()")
            adapter.start_training(self.weight)

    def forward_rows(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Output features start:stop of ``forward(x)`` (rows start:stop of W, b and the update), computed
        alone: one block of a packed projection (MultiheadAttention's q, k, v from different inputs)."""
        if self.merged or not self.adapter_enabled:
            weight = self.weight if self.adapter_enabled else self.base_weight()
            return F.linear(x, weight[start:stop], None if self.bias is None else self.bias[start:stop])
        if self.weight.is_meta:
            return self._meta_forward(x)[..., start:stop]
        self._start_pending_stage(self.adapter)
        args = dict(self.adapter.op_arguments(self.weight))
        if args.get("row_index") is not None:  # A = rows of the whole W (CURLoRA), gathered before W is cut
            args["lora_a"], args["row_index"] = self.weight[args["row_index"]], None
        if args.get("lora_b") is not None:
            args["lora_b"] = args["lora_b"][start:stop]  # B = W[:, J] (CURLoRA) is cut with W
        dropout = self.config.dropout if self.training else 0.0
        bias = None if self.bias is None else self.bias[start:stop]
        return adapted_linear(x, self.weight[start:stop], bias, dropout=dropout, backend=self.config.backend, **args)

    def _meta_forward(self, x: Tensor) -> Tensor:
        """The output's shape and dtype for a layer on the meta device (as nn.Linear gives there): the base
        linear's on meta tensors, which the update shares (the methods' own reads, Selective LoRA's gate
        or NEAT's projection, have no values to work with); an input with values is refused, naming the
        cause."""
        if not x.is_meta:
            raise ValueError(f"this AdapterLinear ({self.in_features} -> {self.out_features}) is on the meta device "
                             f"(no values) and the input on {x.device}: materialise the layer first (e.g. "
                             f"to_empty(device=...) and load its weights, or inject into a loaded model)")
        return F.linear(x, self.weight, self.bias)

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
        if self.merged:  # beside W + ΔW, the W the merge replaced: the state dict loads exactly, merged or not
            kept = self.weight_before_merge
            destination[prefix + "weight_before_merge"] = kept if keep_vars else kept.detach()
        if self.fan_in_fan_out:  # Conv1D's layout, (d_in, d_out)
            for key in (prefix + "weight", prefix + "weight_before_merge"):
                if key in destination:
                    destination[key] = destination[key].t()

    def _check_saved_active_adapter(self, state_dict, prefix: str) -> None:
        """Refuse a state dict saved while another named adapter was active: the active adapter's tensors are
        keyed "adapter.*" whatever its name, so it would load into this layer's active adapter."""
        first = next(iter(self.adapter.state_dict()), None)
        if first is None or prefix + f"inactive_adapters.{self.adapter_name}.{first}" not in state_dict:
            return
        saved_inactive = {name for name in self.adapter_names()
                          if prefix + f"inactive_adapters.{name}.{first}" in state_dict}
        active = [name for name in self.adapter_names() if name not in saved_inactive]
        raise ValueError(f"layer {prefix.rstrip('.') or '(root)'}: the state dict was saved while another adapter was "
                         f"active (adapter {self.adapter_name!r} is inactive there); set that adapter active first "
                         f"(fastlora.set_adapter(model, {active[0] if active else '<its name>'!r}))")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A state dict loads as the unmerged layer's: a merged layer's (``weight_before_merge`` beside
        W + ΔW) gives its W before the merge. A merged layer is unmerged here and merged again, with the
        loaded adapter, once its adapter's tensors are in (``_merge_again_after_load``); a load that raises
        in the adapter's own checks leaves it unmerged (with what loaded before the error, as torch's
        loads do). Refused on a merged layer whose W is sharded (FSDP2): W would be written in place."""
        self.__dict__.pop("_merge_after_load", None)  # left by a load that raised before its post-hooks
        self._check_saved_active_adapter(state_dict, prefix)
        key, kept_key = prefix + "weight", prefix + "weight_before_merge"
        saved, kept = state_dict.get(key), state_dict.pop(kept_key, None)
        base = saved if kept is None else kept
        if self.merged:
            if is_dtensor(self.weight):
                raise ValueError(f"layer {prefix.rstrip('.') or '(root)'} is merged and FSDP shards its W: a load "
                                 f"would write W in place; unmerge it before fully_shard")
            backup = self.weight_before_merge.device
            self._merge_after_load = (None if backup.type == "meta" else backup,)  # meta: W's device after it
            self.unmerge()
            if isinstance(base, Tensor) and args and args[0].get("assign_to_params_buffers"):
                base = base.clone()  # assigned, then merged in place: not into the caller's tensor
        self.adapter.note_load(with_weight=base is not None)
        if base is not None:
            state_dict[key] = base.t() if self.fan_in_fan_out and isinstance(base, Tensor) and base.dim() == 2 \
                else base  # Conv1D's layout back to this layer's (d_out, d_in)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            if saved is None:
                state_dict.pop(key, None)
            else:
                state_dict[key] = saved
            if kept is not None:
                state_dict[kept_key] = kept

    def reference_forward(self, x: Tensor) -> Tensor:
        """The same output computed by the pure-torch reference formula (no fusion, no
        skipping, no dropout): the specification the fused path is checked against. Factors
        of another float dtype than x (fp32 adapters over a half-precision W) are cast to x's
        dtype, as the fused op does outside autocast."""
        if self.merged and self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return F.linear(x, self.base_weight(), self.bias)
        if not self.weight.is_meta:
            self._start_pending_stage(self.adapter)  # as ``forward``
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
        device = self.weight.device if backup_device is None else checked_backup_device(backup_device)
        delta = self.adapter.delta_weight(self.weight)
        self.weight_before_merge = self.weight.detach().to(device, copy=True)
        self.weight.add_(delta)  # added in ΔW's dtype (at least fp32), rounded once to W's
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
        tensors, trainable as W and the bias are (frozen after inject); this layer is left as it is."""
        if self.merged:
            weight = self.weight.detach().clone()
        else:  # a new tensor: added in ΔW's dtype (at least fp32), rounded once to W's
            weight = (self.weight.detach() + self.adapter.delta_weight(self.weight)).to(self.weight.dtype)
        weight = (weight.t() if self.fan_in_fan_out else weight).contiguous()  # Conv1D's layout: one more copy
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(),
                                                           requires_grad=self.bias.requires_grad)
        return self.plain_layer(nn.Parameter(weight, requires_grad=self.weight.requires_grad), bias)

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

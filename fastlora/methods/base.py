"""The Adapter interface every method implements.

An Adapter owns its trainable tensors and turns them into the arguments of the one
fused operation ``fastlora.kernels.adapted_linear``; its training rule (regulariser,
post-step update) is expressed through two optional hooks.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import AdapterConfig


def adapter_factory(weight: Tensor) -> dict[str, Any]:
    """Device and dtype of new adapter tensors: W's device; fp32 over a half-precision W
    (as PEFT keeps adapters), W's dtype otherwise."""
    half = weight.dtype in (torch.float16, torch.bfloat16)
    return {"device": weight.device, "dtype": torch.float32 if half else weight.dtype}


class Adapter(nn.Module):
    """Base class of a method's adapter attached to one Linear (d_out x d_in).

    Subclasses implement ``op_arguments``; the rest has working defaults.
    """

    # state_dict keys whose first dimension counts stages (LoRASC's record): a checkpoint may hold another count
    variable_length_keys: frozenset[str] = frozenset()
    _steps: int = 0  # host copy of the optimizer steps a method's rule counts (its own buffer optimizer_steps)
    #: the method writes its layer's W in place (LoRASC's stages and noise): inject refuses a W shared with
    #: another module, and a model with it holds no other named adapter (they would share that W)
    writes_weight: bool = False
    #: state_dict keys that checkpoints of earlier versions lack: a load without one keeps the adapter's own value
    optional_state_keys: frozenset[str] = frozenset({"tasks_done"})
    #: those of them whose absence means 0 (what earlier versions counted from), not the adapter's own value
    zero_when_missing: frozenset[str] = frozenset()

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.register_load_state_dict_pre_hook(_keep_missing_optional_state)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        # the tasks fastlora.next_task ended before this adapter (in state dicts: a resumed task sequence
        # builds the next task's adapters as the uninterrupted run does)
        self.register_buffer("tasks_done", torch.zeros((), dtype=torch.int64, device=device))
        limit = min(in_features, out_features)
        if config.r > limit:
            raise ValueError(f"r={config.r} exceeds min(d_in={in_features}, d_out={out_features})={limit}")
        self.config = config
        self.in_features = in_features
        self.out_features = out_features

    def _apply(self, fn, recurse: bool = True):
        """Counters without a value (persistent integer buffers built on the meta device, materialised by
        ``to_empty``) start at 0, and the host copies read from them follow (``refresh_host_copies``)."""
        unset = [name for name, buffer in self.named_buffers(recurse=False)
                 if buffer is not None and buffer.is_meta and not buffer.is_floating_point()
                 and name not in self._non_persistent_buffers_set]
        module = super()._apply(fn, recurse)
        counters = [getattr(self, name) for name in unset if not getattr(self, name).is_meta]
        if counters:
            with torch.no_grad():
                for counter in counters:
                    counter.zero_()
            self.refresh_host_copies()
        return module

    def refresh_host_copies(self) -> None:
        """Read the host copies a method keeps of its buffers again: after a load and after ``to_empty`` (a
        forward reads the host copies, not the device)."""

    def bind(self, layer: nn.Module) -> None:
        """Called with the AdapterLinear that owns this adapter when it gets it (at build, and in
        ``next_task``): a method that writes W itself (LoRASC) keeps what it needs to reach W."""

    def note_load(self, with_weight: bool) -> None:
        """Called by the owning layer as a state dict loads into it, before this adapter's part of it:
        ``with_weight`` when that state dict holds W too (a whole-model state dict)."""

    def check_state(self, state: dict[str, Tensor]) -> None:
        """Raise ValueError when ``state`` (this adapter's tensors from a checkpoint, keyed as in its
        state_dict) cannot be loaded into it; ``load_adapter`` calls it before it changes any layer."""

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        """Keyword arguments of adapted_linear: lora_a, lora_b and any of middle,
        rank_weights, gate (with gate_value, its host copy, for a tensor gate), scale,
        row_index, col_index."""
        raise NotImplementedError

    def delta_weight(self, weight: Tensor) -> Tensor:
        """The dense update ΔW (d_out, d_in) = scale * g * B diag(m) M A of the current state, in the
        widest of W's dtype, the factors' and fp32 (as PEFT forms it): a bf16 W plus ΔW rounds once."""
        args = self.op_arguments(weight)
        a = args["lora_a"] if args.get("lora_a") is not None else weight[args["row_index"]]
        b = args["lora_b"] if args.get("lora_b") is not None else weight[:, args["col_index"]]
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.promote_types(weight.dtype,
                                                                                                torch.float32))
        a = a.to(dtype)
        if args.get("middle") is not None:
            a = args["middle"].to(dtype) @ a
        if args.get("rank_weights") is not None:
            a = args["rank_weights"].to(dtype)[:, None] * a
        gate = args.get("gate", 1.0)
        gate = float(gate.detach()) if isinstance(gate, Tensor) else float(gate)
        return (args.get("scale", 1.0) * gate) * (b.to(dtype) @ a)

    def reset_parameters(self) -> None:
        """Every trainable tensor to its initial value (a layer built on the meta device holds none after
        ``to_empty``); the method's record of training (step counts, LoRASC's folded stages) is kept."""
        raise NotImplementedError

    def regularization_loss(self) -> Optional[Tensor]:
        """This adapter's term of the training loss (None when the method has none)."""
        return None

    def rule_parameter(self) -> Optional[nn.Parameter]:
        """The parameter whose param-group learning rate drives ``after_optimizer_step``."""
        return next(self.parameters(), None)

    @torch.no_grad()
    def after_optimizer_step(self, learning_rate: float) -> tuple[nn.Parameter, ...]:
        """Training rule applied after each optimizer step (proximal update, cascade...).

        Returns the parameters the rule restarted (a fresh cascade pair): the training
        hooks drop their optimizer state so stale moments do not carry over.
        """
        return ()

    @property
    def step_count(self) -> int:
        """The optimizer steps the rule has counted (0 for a method without a rule)."""
        return self._steps

    def extra_stats(self) -> dict[str, float]:
        """Method-specific numbers for reports (active ranks, gate state...)."""
        return {}


def _refresh_after_load(module: Adapter, incompatible_keys) -> None:
    module.refresh_host_copies()


def _keep_missing_optional_state(module: Adapter, state_dict: dict, prefix: str, *args) -> None:
    """A state dict without one of the adapter's ``optional_state_keys`` loads the adapter's own value there
    (0 for those of ``zero_when_missing`` when it carries the adapter's other tensors: an earlier version's
    record; a partial load, of a head say, leaves them as they are)."""
    own = module.state_dict(keep_vars=True)
    record = any(prefix + key in state_dict for key in own if key not in module.optional_state_keys)
    for key in module.optional_state_keys:
        if prefix + key not in state_dict:
            value = own[key].detach().clone()
            state_dict[prefix + key] = value.zero_() if record and key in module.zero_when_missing else value

"""The training-rule hook API: works with any torch optimizer.

    hooks = attach_training_hooks(model, optimizer)   # or [optimizer_1, optimizer_2]
    # LoRASC's default stage is one epoch: give its length, attach_training_hooks(..., steps_per_epoch=N)
    loss = task_loss + regularization_loss(model)     # method regularisers (Selective LoRA)
    ...
    hooks.remove()

After every step of an attached optimizer, each adapter whose ``rule_parameter()`` that
optimizer holds runs ``after_optimizer_step(lr)`` with that parameter's param-group learning
rate (CoDyRA's proximal step, LoRASC's cascade schedule, Selective LoRA's gate refresh).
Parameters a rule restarts lose their state (Adam moments) in every attached optimizer and their
gradients, as a freshly created parameter would have none: with LoRASC's A in one optimizer and B
in another, the optimizer that steps after the stage end skips B (it finds a zero gradient the
fold left, which a loss scaler's unscale needs, and drops it: ``_skip_restarted``; a restartable
parameter held by no attached optimizer is refused when the hooks are attached).
Merged layers are skipped: no rule acts on them. A step a loss scaler skipped is no step: the
optimizer's step is not called, or a fused one's runs with ``found_inf`` set and changes nothing.
Trainer counts such steps (max_steps, epochs): ``catch_up_to_run_step``, which FastLoraCallback
calls after every step, runs the rules for them as after a step without an update.

The hooks also add a LoRASC stage's pending noise at the model's next forward in training mode, in
a forward pre-hook placed ahead of the model's other pre-hooks (FSDP2's included: W is still
sharded there, each rank writes its shard); without the hooks each layer adds it in its forward.

``inject`` calls ``watch_training_rules``: at the WATCHED_FORWARDS-th training forward of the model
(train mode, gradients on) it warns once when a layer trains without its post-step rule or
without its penalty in the loss, then removes itself (no cost per call after that, no host sync).
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from fastlora.kernels.caller_warnings import warn_at_caller

from .config import SelectiveLoraConfig
from .layer import AdapterLinear
from .methods import Adapter, CascadeLoraAdapter, RankSelectiveLoraAdapter
from .methods.cascade import EPOCH_LENGTH_WAYS
from .model_tree import adapter_layers, required_adapter_layers

Optimizers = Union[torch.optim.Optimizer, Iterable[torch.optim.Optimizer]]
# model -> its live TrainingHooks (weakly: the optimizers' hook registries keep them alive)
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
# layers whose post-step rule live hooks run / whose penalty regularization_loss has computed
_RULED: "weakref.WeakSet[AdapterLinear]" = weakref.WeakSet()
_PENALIZED: "weakref.WeakSet[AdapterLinear]" = weakref.WeakSet()
WATCHED_FORWARDS = 8


def regularization_loss(model: nn.Module) -> Tensor:
    """Sum of every adapter's regulariser (a 0-dim tensor in at least fp32, 0 when no method has one); a
    Selective LoRA term whose config sets normalize_penalty is divided by the model's number of Selective
    LoRA layers."""
    layers = [layer for _, layer in adapter_layers(model)]
    gated = sum(isinstance(layer.config, SelectiveLoraConfig) for layer in layers)
    terms = []
    for layer in layers:
        term = layer.adapter.regularization_loss()
        _PENALIZED.add(layer)
        if term is not None:
            normalized = isinstance(layer.config, SelectiveLoraConfig) and layer.config.normalize_penalty
            term = term.to(torch.promote_types(term.dtype, torch.float32))  # fp32, or a float64 score's own
            terms.append(term / gated if normalized else term)
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).sum()


def has_rule(layer: AdapterLinear) -> bool:
    """Whether the layer's method has a rule to apply after each optimizer step (``after_optimizer_step``)."""
    return type(layer.adapter).after_optimizer_step is not Adapter.after_optimizer_step


def _needs_rule(layer: AdapterLinear) -> bool:
    """Whether training the layer without its post-step rule goes wrong (LoRASC with loop-driven
    stages, cascade_interval=None, and a frozen rule parameter do without)."""
    param = layer.adapter.rule_parameter()
    loop_driven = isinstance(layer.adapter, CascadeLoraAdapter) and not layer.adapter.scheduled
    return has_rule(layer) and not loop_driven and param is not None and param.requires_grad


def _restartable(adapter: Adapter) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of each parameter the adapter's rule restarts (LoRASC's fast pair)."""
    if isinstance(adapter, CascadeLoraAdapter):
        return [("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B)]
    return []


def _needs_penalty(layer: AdapterLinear) -> bool:
    return isinstance(layer.config, SelectiveLoraConfig) and layer.config.sparsity_weight > 0


def watch_training_rules(model: nn.Module) -> None:
    """Warn once, at the model's WATCHED_FORWARDS-th training forward, about layers that train without
    their post-step rule (``attach_training_hooks``) or penalty (``regularization_loss``)."""
    if any(_needs_rule(layer) or _needs_penalty(layer) for _, layer in adapter_layers(model)):
        watch = _RuleWatch()
        watch.handle = model.register_forward_pre_hook(watch)


class _RuleWatch:
    """The forward pre-hook of ``watch_training_rules`` (a class, so a model holding it still pickles)."""

    def __init__(self) -> None:
        self.forwards = 0
        self.handle = None

    def __call__(self, module: nn.Module, args) -> None:
        if torch.compiler.is_compiling() or not (module.training and torch.is_grad_enabled()):
            return
        self.forwards += 1
        if self.forwards == WATCHED_FORWARDS:
            self.handle.remove()
            _warn_unruled(module)


def _warn_unruled(model: nn.Module) -> None:
    layers = [layer for _, layer in adapter_layers(model) if not layer.merged]
    unruled = sorted({layer.config.method for layer in layers if _needs_rule(layer) and layer not in _RULED})
    unpenalized = any(_needs_penalty(layer) and layer not in _PENALIZED for layer in layers)
    if unruled:
        warn_at_caller(f"fastlora: {', '.join(unruled)} layers have trained {WATCHED_FORWARDS} forward passes without "
                       f"their post-step rule (CoDyRA never prunes, LoRASC never cascades, Selective LoRA's gate is "
                       f"not refreshed): call fastlora.attach_training_hooks(model, optimizer) before training, or "
                       f"train with FastLoraTrainer / FastLoraCallback")
    if unpenalized:
        warn_at_caller(f"fastlora: selective_lora layers have trained {WATCHED_FORWARDS} forward passes without "
                       f"their L1 penalty (no block is ever switched off): add fastlora.regularization_loss(model) "
                       f"to the loss, or train with FastLoraTrainer")


def unwrapped_optimizer(optimizer):
    """The torch optimizer inside a wrapper that steps it (Hugging Face accelerate's AcceleratedOptimizer:
    an Optimizer subclass without the step-hook registry of its own), else ``optimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _groups(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """id(parameter) -> its param group."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _learning_rate(group: dict) -> float:
    """The group's lr as a float, 0.0 when it is None (Adafactor's relative steps): no rule needs it."""
    lr = group.get("lr")
    return 0.0 if lr is None else float(lr)


class TrainingHooks:
    """Handle of the hooks attached by ``attach_training_hooks``; ``remove()`` detaches them."""

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        self.model = model
        self.optimizers = optimizers
        self._handles = [optimizer.register_step_post_hook(self._after_step) for optimizer in optimizers]
        self._handles += [optimizer.register_step_pre_hook(self._skip_restarted) for optimizer in optimizers]
        self._stale_grads: dict[int, tuple[Tensor, int]] = {}  # id(restarted factor) -> (its zero grad, version)
        self._ruled = [layer for _, layer in adapter_layers(model) if has_rule(layer)]
        self._rule_groups = {key: group for optimizer in reversed(optimizers)  # id(parameter) -> its group
                             for key, group in _groups(optimizer).items()}
        # layer -> (its adapter, that adapter's count minus the run's steps, its count) when last seen
        self._step_offsets = {layer: (layer.adapter, layer.adapter.step_count, layer.adapter.step_count)
                              for layer in self._ruled}
        self._staged = [layer for layer in self._ruled if isinstance(layer.adapter, CascadeLoraAdapter)]
        self._starts_pending = True  # a stage's noise may wait (stage 0, or a checkpoint saved on a stage end)
        if self._staged:
            self._handles.append(model.register_forward_pre_hook(self._before_forward, prepend=True))
        _RULED.update(self._ruled)
        _ATTACHED[model] = weakref.ref(self)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):  # a loss scaler's skipped step of a fused optimizer: it ran
            return                                      # and changed nothing, so it is no step for the rules
        groups = _groups(optimizer)
        for name, layer in adapter_layers(self.model):
            if layer.merged or not has_rule(layer):
                continue
            group = groups.get(id(layer.adapter.rule_parameter()))
            if group is None:
                continue
            self._restarted(layer.adapter.after_optimizer_step(_learning_rate(group)), groups)

    def _restarted(self, parameters: tuple[nn.Parameter, ...], stepped: Optional[dict[int, dict]]) -> None:
        """Parameters a rule restarted: no optimizer state, and the old pair's gradient does not step the new
        pair. In an optimizer other than the one that stepped (``stepped``: its param groups; None: no
        optimizer steps after the rule), which may step after it: a zero gradient (a loss scaler's unscale
        there needs some gradient), which it skips."""
        for restarted in parameters:
            self._starts_pending = True
            if stepped is None or id(restarted) in stepped:
                restarted.grad = None
            else:
                restarted.grad = torch.zeros_like(restarted)
                self._stale_grads[id(restarted)] = (restarted.grad, restarted.grad._version)
            for other in self.optimizers:
                other.state.pop(restarted, None)

    def catch_up_to_run_step(self, run_steps: int) -> None:
        """After the run's ``run_steps``-th step, as Trainer counts them since these hooks were attached (steps a
        loss scaler skipped included): each ruled layer's rule runs once for every step since it was last seen
        that its optimizer did not take, as after a step without an update, so that step-indexed schedules
        follow the run's count. A merged layer, an adapter switched in, or a count gone back (an earlier
        checkpoint loaded) starts counting from here instead."""
        if not self.attached:
            return
        for layer in self._ruled:
            adapter = layer.adapter
            group = self._rule_groups.get(id(adapter.rule_parameter()))
            seen, offset, count = self._step_offsets.get(layer, (None, 0, 0))
            if group is not None and seen is adapter and not layer.merged and adapter.step_count >= count:
                for _ in range(offset + run_steps - adapter.step_count):
                    self._restarted(adapter.after_optimizer_step(_learning_rate(group)), None)
            self._step_offsets[layer] = (adapter, adapter.step_count - run_steps, adapter.step_count)

    def _skip_restarted(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """Before a step: a factor restarted by a fold since its last gradient (its zero gradient untouched,
        no backward accumulated into it) gets no gradient, so this optimizer skips it."""
        if not self._stale_grads:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                stale = self._stale_grads.pop(id(param), None)
                if stale is not None and param.grad is stale[0] and param.grad._version == stale[1]:
                    param.grad = None

    def _before_forward(self, model: nn.Module, args) -> None:
        """A LoRASC stage's pending noise into W before the model's first training forward of the stage
        (eagerly, W still sharded under FSDP2; under torch.compile the layers add it themselves)."""
        if not self._starts_pending or not model.training or torch.compiler.is_compiling():
            return
        self._starts_pending = False
        for layer in self._staged:
            adapter = layer.adapter
            if isinstance(adapter, CascadeLoraAdapter) and adapter.pending_start and layer.adapter_enabled \
                    and not layer.merged:
                adapter.start_training()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._ruled:
            _RULED.discard(layer)
        if attached_hooks(self.model) is self:
            del _ATTACHED[self.model]


def parameters_left_out(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Optional[list[str]]:
    """Names of the model's trainable parameters that none of ``optimizers`` holds; None when the optimizers
    hold tensors but no parameters (DeepSpeed's flat partitions, a layer-wise dummy: which parameters they
    stand for cannot be told)."""
    held = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    ids = {id(p) for p in held if isinstance(p, nn.Parameter)}
    if held and not ids:
        return None
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in ids]


def check_optimizers_hold_trainables(model: nn.Module, optimizers: list[torch.optim.Optimizer], caller: str,
                                     remedy: str = "build it from the model's trainable parameters now") -> list[str]:
    """Raise ValueError when ``optimizers`` hold none of the active adapters' trainable parameters (an
    optimizer built before inject, load_adapter, add_adapter, set_adapter or next_task holds the tensors those
    replaced or froze: the adapters would not train, silently, whatever else it holds: a head). Returns the
    trainable parameters they leave out (``warn_left_out``)."""
    missing = parameters_left_out(model, optimizers)
    if not missing:
        return []
    prefixes = tuple(f"{name}.adapter." if name else "adapter." for name, layer in adapter_layers(model)
                     if layer.adapter_enabled and not layer.merged)  # others get no gradient anyway
    adapters = [name for name, p in model.named_parameters() if p.requires_grad and name.startswith(prefixes)]
    if adapters and set(adapters) <= set(missing):
        raise ValueError(f"{caller}: the optimizer holds none of the adapters' {len(adapters)} trainable parameters "
                         f"(e.g. {adapters[0]}), so they would not train: an optimizer built before fastlora.inject, "
                         f"load_adapter, add_adapter, set_adapter or next_task holds the tensors those replaced or "
                         f"froze; {remedy}")
    return missing


def warn_left_out(missing: list[str], caller: str) -> None:
    """Warn, naming the first five, that the trainable parameters ``missing`` are in none of the optimizers."""
    if not missing:
        return
    warn_at_caller(f"fastlora: {caller}: {len(missing)} trainable parameters are in none of the optimizers "
                   f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), so they will not train; pass "
                   f"every optimizer, or build them after the last inject / add_adapter / set_adapter / next_task",
                   RuntimeWarning)


def attached_hooks(model: nn.Module) -> Optional["TrainingHooks"]:
    """The TrainingHooks attached to ``model`` and not yet garbage-collected, else None."""
    return _ATTACHED.get(model, lambda: None)()


def remove_attached_hooks(model: nn.Module) -> None:
    """Remove the TrainingHooks attached to ``model``, if any (its adapters are replaced or gone)."""
    hooks = attached_hooks(model)
    if hooks is not None:
        hooks.remove()


#: the lengths the hooks take, in optimizer steps: keyword -> what it counts
_LENGTHS = {"total_steps": "the run's optimizer steps", "steps_per_epoch": "optimizer steps per epoch"}


def _check_steps(name: str, steps: int) -> None:
    """Refuse a length ``name`` (of _LENGTHS) that is not an int in (0, 2**63): an int64 buffer keeps it."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 < steps < 2**63:
        raise ValueError(f"{name} must be an int > 0 ({_LENGTHS[name]}) and below 2**63 (an int64 buffer keeps it), "
                         f"got {steps!r}")


def _give_length(adapters: list, held: str, setter: str, steps: int) -> set[tuple[str, int, int]]:
    """Set ``steps`` on each adapter (``setter``) but those that already stepped in their run under another
    value of their host copy ``held``; returns (method, their value, their steps) of those."""
    kept = set()
    for adapter in adapters:
        length = getattr(adapter, held)
        if length and length != steps and adapter.steps_in_run > 0:
            kept.add((adapter.config.method, length, adapter.steps_in_run))
            continue
        getattr(adapter, setter)(steps)
    return kept


def set_run_length(model: nn.Module, total_steps: int, new_run: Optional[bool] = None) -> None:
    """Give the model's step-scheduled layers (CoDyRA, LoRASC) the run's length in optimizer steps:
    CoDyRA's schedule spans it when its config leaves total_steps None, LoRASC places stages_per_run's
    stage ends by it and ends no stage on its final step. ``new_run``: whether LoRASC layers begin a run
    now (``begin_run``; True: Trainer's ``train()`` not resuming; False: a resumed run goes on from the
    run_start its checkpoint holds); None (a hand loop): a LoRASC layer begins one when its previous run is
    over (of known length, all its steps taken) or had no length and took steps, any other goes on. A
    layer that already stepped in its run under another length (a resumed run; CoDyRA's one schedule)
    keeps that one, with a warning. Refused (before any layer changes) unless 0 < total_steps < 2**63."""
    _check_steps("total_steps", total_steps)
    if new_run is not None and not isinstance(new_run, bool):
        raise TypeError(f"new_run must be a bool or None, got {type(new_run).__name__}")
    adapters = [layer.adapter for _, layer in adapter_layers(model)
                if isinstance(layer.adapter, (RankSelectiveLoraAdapter, CascadeLoraAdapter))]
    for adapter in adapters:
        if isinstance(adapter, CascadeLoraAdapter) and (new_run or (new_run is None and _run_ended(adapter))):
            adapter.begin_run()
    for method, length, steps in sorted(_give_length(adapters, "_run_steps", "set_run_steps", total_steps)):
        warn_at_caller(f"fastlora: {method} layers have taken {steps} optimizer steps of a run of {length}; they keep "
                       f"that run's schedule, not total_steps={total_steps} (a new task starts a fresh schedule "
                       f"after fastlora.next_task)", RuntimeWarning)


def _run_ended(adapter: CascadeLoraAdapter) -> bool:
    """Whether a hand loop attaching again with a run length starts another run: the last one took all of
    its known length, or had no length and took steps."""
    return adapter.run_over if adapter._run_steps else adapter.steps_in_run > 0


def set_epoch_length(model: nn.Module, steps_per_epoch: int) -> None:
    """Give the model's LoRASC layers with one stage per epoch (cascade_interval "epoch") the epoch's length
    in optimizer steps, their stage length. A layer that already stepped under another length (a resumed
    run) keeps that one, with a warning. Refused (before any layer changes) unless 0 < steps_per_epoch < 2**63."""
    _check_steps("steps_per_epoch", steps_per_epoch)
    adapters = [layer.adapter for _, layer in adapter_layers(model)
                if isinstance(layer.adapter, CascadeLoraAdapter) and layer.adapter.epoch_stages]
    for method, length, steps in sorted(_give_length(adapters, "_epoch_steps", "set_epoch_steps", steps_per_epoch)):
        warn_at_caller(f"fastlora: {method} layers have taken {steps} optimizer steps with epochs of {length} steps; "
                       f"they keep those stages, not steps_per_epoch={steps_per_epoch} (a new task starts afresh "
                       f"after fastlora.next_task)", RuntimeWarning)


def _missing_length(layer: AdapterLinear) -> bool:
    """Whether the layer's rule needs the run's length and does not know it."""
    adapter = layer.adapter
    if isinstance(adapter, RankSelectiveLoraAdapter):
        return adapter.total_steps is None
    return isinstance(adapter, CascadeLoraAdapter) and adapter.config.stages_per_run is not None \
        and not adapter._run_steps


def missing_epoch_length(layer: AdapterLinear) -> bool:
    """Whether the layer ends a stage every epoch and does not know the epoch's length."""
    adapter = layer.adapter
    return isinstance(adapter, CascadeLoraAdapter) and adapter.epoch_stages and not adapter._epoch_steps


def _stage_length(adapter: CascadeLoraAdapter) -> str:
    """The stage length as its config gives it: "cascade_interval=N", or the epoch's for "epoch"."""
    if adapter.epoch_stages:
        return f"cascade_interval='epoch', {adapter.stage_steps} optimizer steps per epoch"
    return f"cascade_interval={adapter.stage_steps}"


def _warn_stageless(layers) -> None:
    """Warn once per stage length when LoRASC layers' schedule ends no stage in the run (its length known):
    a stage length >= the run's steps, so the run trains plain LoRA on W with one stage's noise."""
    idle = set()
    for _, layer in layers:
        adapter = layer.adapter
        if not isinstance(adapter, CascadeLoraAdapter) or not adapter._run_steps or layer.merged:
            continue
        if adapter.stage_steps is not None and adapter.stage_steps >= adapter._run_steps:
            idle.add((_stage_length(adapter), adapter._run_steps))
    for length, run in sorted(idle):
        warn_at_caller(f"fastlora: cascade_lora layers end no stage in this run of {run} optimizer steps "
                       f"({length}, and no stage ends on the final step): it trains plain LoRA on W "
                       f"with one stage's noise; set CascadeLoraConfig(stages_per_run=K) to split the run into K "
                       f"stages, or a cascade_interval below the run's length", RuntimeWarning)


def warn_merged(layers, caller: str) -> None:
    """Warn when adapted layers about to train are merged: their update is part of W, their adapters get
    no gradient."""
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        warn_at_caller(f"fastlora: {caller}: adapter layers {merged[:3]}{' ...' if len(merged) > 3 else ''} are "
                       f"merged: their update is part of W, so their adapters get no gradient and do not train "
                       f"(fastlora.unmerge first)", RuntimeWarning)


def _refuse_unknown_lengths(layers) -> None:
    """Raise ValueError when a trainable rule needs the run's length or the epoch's and it is not known."""
    ruled = [layer for _, layer in layers if has_rule(layer) and layer.adapter.rule_parameter() is not None
             and layer.adapter.rule_parameter().requires_grad]
    unknown = sorted({layer.config.method for layer in ruled if _missing_length(layer)})
    if unknown:
        raise ValueError(f"{', '.join(unknown)} layers schedule their rule over the run's length, which is not known: "
                         f"pass attach_training_hooks(model, optimizer, total_steps=N) with the run's optimizer "
                         f"steps, train with FastLoraTrainer / FastLoraCallback (Trainer's max_steps), or fix the "
                         f"schedule in the config (RankSelectiveLoraConfig(total_steps=N), "
                         f"CascadeLoraConfig(cascade_interval=N))")
    if any(missing_epoch_length(layer) for layer in ruled):
        raise ValueError(f"cascade_lora layers end a stage every epoch (cascade_interval='epoch', the default), and "
                         f"the epoch's length is not known: {EPOCH_LENGTH_WAYS}")


def attach_training_hooks(model: nn.Module, optimizers: Optimizers, total_steps: Optional[int] = None,
                          steps_per_epoch: Optional[int] = None) -> TrainingHooks:
    """Run each adapter's post-step rule after every step of ``optimizers`` (one optimizer or
    several: pass all of a model's optimizers in one call, so a restarted parameter loses its
    state in each). ``total_steps``: the run's length in optimizer steps (``set_run_length``),
    which CoDyRA with total_steps=None and LoRASC with stages_per_run need; ``steps_per_epoch``:
    the epoch's length in optimizer steps (``set_epoch_length``), which LoRASC's default one stage
    per epoch (cascade_interval "epoch") needs (neither, when the adapters were loaded from a
    checkpoint of a run that knew it).

    Raises ValueError when the model has no adapters, already has hooks attached (``remove()``
    them first: a second set would apply every rule twice), an optimizer is given twice, a
    trainable rule parameter is in none of the optimizers (its rule would never run), or a
    trainable parameter a rule restarts (LoRASC's A and B) is in none of them (its state could not
    be dropped), the optimizers hold none of the enabled adapters' trainable parameters (built before
    inject, add_adapter, set_adapter or next_task: ``check_optimizers_hold_trainables``; trainable
    parameters left out: a warning), a length is not an int in (0, 2**63), or a rule needs the run's or the epoch's
    length and none is known. A rule parameter with requires_grad=False turns its rule off.
    """
    layers = required_adapter_layers(model)
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    optimizers = [unwrapped_optimizer(o) for o in optimizers]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        raise TypeError(f"expected a torch optimizer or a list of them, got {optimizers!r}")
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ValueError("the same optimizer is given twice")
    existing = attached_hooks(model)
    if existing is not None and existing.attached:
        raise ValueError("training hooks are already attached to this model (a second set would apply every rule "
                         "twice); call remove() on them first, or attach all optimizers in one call")
    left_out = check_optimizers_hold_trainables(model, optimizers, "attach_training_hooks")
    all_groups = [_groups(o) for o in optimizers]
    for name, layer in layers:
        param = layer.adapter.rule_parameter()
        if not has_rule(layer) or param is None or not param.requires_grad:
            continue
        if not any(id(param) in g for g in all_groups):
            raise ValueError(f"layer {name}: its {layer.config.method} rule parameter (shape {tuple(param.shape)}) is "
                             f"in none of the optimizers, so its post-step rule would never run; add it")
        for key, restartable in _restartable(layer.adapter):
            if restartable.requires_grad and not any(id(restartable) in g for g in all_groups):
                raise ValueError(f"layer {name}: its {layer.config.method} parameter {key} is trainable but in none of "
                                 f"the optimizers given; a stage end restarts it and must drop its optimizer state: "
                                 f"pass every optimizer that holds it in the same call")
    for name, steps in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if steps is not None:
            _check_steps(name, steps)
    if total_steps is not None:
        set_run_length(model, total_steps)
    if steps_per_epoch is not None:
        set_epoch_length(model, steps_per_epoch)
    _refuse_unknown_lengths(layers)
    _warn_stageless(layers)
    warn_merged(layers, "attach_training_hooks")
    warn_left_out(left_out, "attach_training_hooks")
    return TrainingHooks(model, optimizers)

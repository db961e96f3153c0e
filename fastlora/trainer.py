"""transformers.Trainer integration: FastLoraCallback (training rules, stats, adapter checkpoints) and
FastLoraTrainer (the callback plus ``regularization_loss`` in the training loss).

    trainer = fastlora.FastLoraTrainer(model=model, args=args, train_dataset=data)   # everything
    trainer = transformers.Trainer(..., callbacks=[fastlora.FastLoraCallback()])      # no regulariser

A Trainer subclass is how transformers lets a term join the loss (``compute_loss``); with your own
subclass, add the term the same way::

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        loss = loss + fastlora.regularization_loss(model)   # divide by the accumulation steps when
        return (loss, outputs) if return_outputs else loss  # the loss is already scaled for them
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length

from fastlora.kernels.caller_warnings import warn_at_caller

from .adapters_api import adapter_stats
from .checkpoint import adapters_sharded, save_adapter
from .config import RankSelectiveLoraConfig, SelectiveLoraConfig
from .model_tree import adapter_layers
from .training import (
    TrainingHooks,
    attach_training_hooks,
    check_optimizers_hold_trainables,
    has_rule,
    missing_epoch_length,
    parameters_left_out,
    regularization_loss,
    set_epoch_length,
    set_run_length,
    unwrapped_optimizer,
    warn_left_out,
    warn_merged,
)

#: the folder of the adapter-only checkpoint inside each of Trainer's checkpoint-N folders
ADAPTER_DIR = "fastlora_adapter"


class FastLoraCallback(TrainerCallback):
    """Connects a fastlora model to ``transformers.Trainer``.

    - train begin: gives the step-scheduled layers the run's length, Trainer's ``max_steps``
      (``set_run_length``: CoDyRA's schedule with total_steps=None spans it, LoRASC's stages_per_run
      splits it, and no LoRASC stage ends on its final step; a ``train()`` that does not resume begins
      a new LoRASC run, a resumed one goes on), and the epoch's length
      in optimizer steps as Trainer counts it from its ``train_dataloader`` and
      gradient_accumulation_steps (``trainer_steps_per_epoch``, ``set_epoch_length``: the length of
      LoRASC's default stage), then attaches the post-step training rules (CoDyRA's proximal step,
      LoRASC's cascades, Selective LoRA's bookkeeping) to Trainer's optimizer (accelerate's wrapper
      unwrapped), once per ``train()`` call; removed at train end (warning when LoRASC layers ended
      no stage in the run). Warns when an explicit CoDyRA ``total_steps`` is longer than
      ``max_steps`` (it would stop before kappa_max; a longer run is fine: the pruned set is final
      after total_steps).
    - every step end: the rules run for a step Trainer counted that a loss scaler skipped (fp16), as
      after a step without an update (``TrainingHooks.catch_up_to_run_step``), so that step-indexed
      schedules follow Trainer's count.
    - every log: each method's ``extra_stats`` over its layers ("fastlora/<method>/<stat>",
      ``adapter_stats``) join the logged values and ``state.log_history``.
    - every save (``save_adapters``): ``save_adapter`` writes the adapters into
      ``<output_dir>/checkpoint-<step>/fastlora_adapter`` (``load_adapter`` reads it): on the main process, on
      every rank when the adapters are sharded (FSDP2: the shards are gathered).

    The regulariser (Selective LoRA's L1) is a term of the loss, which a callback cannot change:
    use ``FastLoraTrainer`` (it adds this callback too) or add it in your ``compute_loss``.
    """

    def __init__(self, save_adapters: bool = True) -> None:
        self.save_adapters = save_adapters
        self.hooks: Optional[TrainingHooks] = None

    def on_train_begin(self, args, state, control, model: Optional[nn.Module] = None, optimizer=None,
                       train_dataloader=None, **kwargs):
        layers = list(adapter_layers(model))
        if not layers:
            warn_at_caller("FastLoraCallback: the model has no fastlora adapters; nothing to do")
            return
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
        left_out = [] if optimizer is None else check_optimizers_hold_trainables(
            model, [unwrapped_optimizer(optimizer)], "FastLoraCallback",
            remedy="set trainer.optimizer = None before train(), and Trainer builds one for them (FastLoraTrainer "
                   "does it itself)")
        if state.max_steps and state.max_steps > 0:
            set_run_length(model, state.max_steps, new_run=state.global_step == 0)
        epoch = None if train_dataloader is None else trainer_steps_per_epoch(train_dataloader,
                                                                               args.gradient_accumulation_steps)
        if epoch:
            set_epoch_length(model, epoch)
        elif any(missing_epoch_length(layer) for _, layer in layers):
            raise ValueError("FastLoraCallback: LoRASC ends a stage every epoch (cascade_interval='epoch', the "
                             "default), and Trainer's train dataloader gives no length (an IterableDataset), so "
                             "the epoch's length is not known; set CascadeLoraConfig(cascade_interval=<steps "
                             "per stage>) or CascadeLoraConfig(stages_per_run=K)")
        if any(has_rule(layer) for _, layer in layers):
            if optimizer is None:
                raise ValueError("FastLoraCallback: Trainer passed no optimizer; the training rules cannot be attached")
            self.hooks = attach_training_hooks(model, optimizer)  # it warns of what it finds
            self._global_step_at_begin = state.global_step
        else:
            warn_merged(layers, "FastLoraCallback")
            warn_left_out(left_out, "FastLoraCallback")
        _check_schedules(layers, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.hooks is not None:  # steps a loss scaler skipped count as Trainer counts them (max_steps, epochs)
            self.hooks.catch_up_to_run_step(state.global_step - self._global_step_at_begin)

    def on_train_end(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
        if model is not None:
            warn_if_no_gate_moved(model, state.global_step, _mean_learning_rate(state, args.learning_rate))

    def on_log(self, args, state, control, logs: Optional[dict] = None, model: Optional[nn.Module] = None,
               **kwargs):
        stats = adapter_stats(model)
        if logs is not None:
            logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_save(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if self.save_adapters and next(adapter_layers(model), None) is not None and \
                (state.is_world_process_zero or adapters_sharded(model)):  # FSDP2: every rank gathers, rank 0 writes
            save_adapter(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / ADAPTER_DIR)


def trainer_steps_per_epoch(dataloader, accumulation: int) -> Optional[int]:
    """Optimizer steps per epoch as Trainer counts them: ceil(len(dataloader) / accumulation) (the last,
    shorter accumulation of an epoch steps too); None for a dataloader without a length (an IterableDataset,
    whose epochs end where its data does)."""
    length = len(dataloader) if has_length(dataloader) else None
    return -(-length // accumulation) if length else None


def _check_schedules(layers, max_steps: int) -> None:
    """Warn, once per schedule length, when CoDyRA layers' total_steps is more than the run's max_steps:
    the run stops early in the schedule. (Past total_steps nothing is thresholded: a longer run keeps
    the pruned set and trains the kept ranks.)"""
    configs = {}
    for _, layer in layers:
        config = layer.config
        if isinstance(config, RankSelectiveLoraConfig) and config.kappa_max > 0 and config.total_steps is not None \
                and config.total_steps > max_steps:
            configs.setdefault(config.total_steps, config)
    for total, config in sorted(configs.items()):
        if config.kappa(max_steps) == 0:
            effect = f"it ends in the dense phase (steps 1-{config.dense_steps}): no rank is pruned"
        else:
            effect = f"it stops at kappa={config.kappa(max_steps):.3g} of kappa_max={config.kappa_max}, pruning less"
        warn_at_caller(f"FastLoraCallback: the CoDyRA threshold schedule spans total_steps={total} optimizer steps, "
                       f"but this run has max_steps={max_steps}: {effect}; set "
                       f"RankSelectiveLoraConfig(total_steps={max_steps})")


def _mean_learning_rate(state, peak: float) -> float:
    """The mean of the learning rates Trainer logged in the run (its schedule: the default linear decay
    halves it), else ``peak``."""
    rates = [entry["learning_rate"] for entry in state.log_history if "learning_rate" in entry]
    return sum(rates) / len(rates) if rates else peak


def warn_if_no_gate_moved(model: nn.Module, steps: int, learning_rate: float) -> None:
    """Warn when a run of ``steps`` optimizer steps switched no Selective LoRA gate: it trained plain LoRA.
    ``learning_rate``: the run's mean rate (a score moves about that much per step under AdamW)."""
    configs = [layer.config for _, layer in adapter_layers(model) if isinstance(layer.config, SelectiveLoraConfig)]
    stats = adapter_stats(model)
    if not configs or steps == 0 or stats.get("fastlora/selective_lora/gate_changes", 0) > 0:
        return
    margin = max(c.score_init - c.threshold for c in configs)
    warn_at_caller(f"FastLoraCallback: no Selective LoRA gate switched in this run of {steps} optimizer steps, so it "
                   f"trained as plain LoRA: a score must fall by score_init - threshold = {margin:.3g}, about lr per "
                   f"step under AdamW, i.e. about {margin / learning_rate:.0f} steps at this run's mean lr "
                   f"{learning_rate:g}; train longer or at a larger learning rate (a decaying schedule lowers the "
                   f"mean: Trainer's default linear decay halves it)")


class FastLoraTrainer(Trainer):
    """``transformers.Trainer`` that adds ``fastlora.regularization_loss(model)`` to the training
    loss (once per optimizer step across gradient accumulation) and a ``FastLoraCallback``
    unless one is given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._builds_optimizer = self.optimizer is None  # not given one: it builds (and rebuilds) its own
        if not any(isinstance(c, FastLoraCallback) for c in self.callback_handler.callbacks):
            self.add_callback(FastLoraCallback())

    def create_optimizer(self, *args, **kwargs):
        """Trainer's optimizer, built again (with its state) when the one it built earlier misses some of
        the model's trainable parameters: a ``train()`` after next_task, add_adapter or set_adapter trains
        the new adapters (Trainer itself builds its optimizer once). One given to the Trainer is kept, and
        so is one whose tensors are not the parameters (DeepSpeed's partitions)."""
        model = args[0] if args else kwargs.get("model")
        if self._builds_optimizer and self.optimizer is not None and \
                parameters_left_out(self.model if model is None else model, [unwrapped_optimizer(self.optimizer)]):
            self.optimizer = None
        return super().create_optimizer(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            penalty = regularization_loss(self.accelerator.unwrap_model(model)).to(loss.device, loss.dtype)
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                penalty = penalty / getattr(self, "current_gradient_accumulation_steps",
                                            self.args.gradient_accumulation_steps)
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether Trainer will not divide this loss by the accumulation steps (it is normalised
        over the whole accumulated batch), the rule of ``Trainer.training_step``."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return scaled
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

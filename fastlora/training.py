"""The training-rule hook API: works with any torch optimizer.

    hooks = attach_training_hooks(model, optimizer)   # post-step rules run automatically
    loss = task_loss + regularization_loss(model)     # method regularisers (Selective LoRA)
    ...
    hooks.remove()

After every ``optimizer.step()`` each adapter's ``after_optimizer_step(lr)`` runs
with the learning rate of the param group holding its ``rule_parameter()`` (CoDyRA's proximal
step, LoRASC's cascade schedule); parameters a rule restarts lose their optimizer
state (Adam moments), as a freshly created parameter would have none.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .inject import adapter_layers


def regularization_loss(model: nn.Module) -> Tensor:
    """Sum of every adapter's regulariser (a 0-dim tensor, 0 when no method has one)."""
    terms = [t for _, layer in adapter_layers(model) if (t := layer.adapter.regularization_loss()) is not None]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack([t.float() for t in terms]).sum()


def _learning_rates(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """id(parameter) -> learning rate of its param group."""
    return {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}


class TrainingHooks:
    """Handle of the hooks attached by ``attach_training_hooks``; ``remove()`` detaches them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        rates = _learning_rates(optimizer)
        for _, layer in adapter_layers(self.model):
            lr = rates.get(id(layer.adapter.rule_parameter()))
            if lr is not None:
                for restarted in layer.adapter.after_optimizer_step(lr):
                    optimizer.state.pop(restarted, None)

    def remove(self) -> None:
        self._handle.remove()


def attach_training_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingHooks:
    """Run each adapter's post-step rule after every ``optimizer.step()``."""
    if not any(True for _ in adapter_layers(model)):
        raise ValueError("model has no fastlora adapters; call fastlora.inject first")
    return TrainingHooks(model, optimizer)

"""The task sequence of continual learning: after each task, fold what the adapters learned into W for
good and start fresh adapters for the next task, in one call.

    for task in tasks:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=...)
        hooks = fastlora.attach_training_hooks(model, optimizer, total_steps=..., steps_per_epoch=...)
        train(model, optimizer, task)
        fastlora.next_task(model)        # also removes the hooks: the next task needs a new optimizer

What each method keeps (its ``delta_weight``), then W <- W + ΔW and a fresh adapter:
- LoRA: s B A.  NEAT: s B_n act(A_n W) (the fresh adapter projects the updated W).
- Selective LoRA: s B A of blocks that are on; blocks switched off are dropped. Fresh score = score_init.
- CoDyRA: s B diag(w) A, ranks at w = 0 dropped; the next task's adapter is a fresh increment whose
  threshold schedule starts again.
- CURLoRA: alpha W[:, J] U W[I, :]; the fresh adapter resamples I and J from the updated W.
- LoRASC: W already holds the task's folded stages and the noise of each stage that trained; the fast pair
  is merged, W <- W + s B A (the model the task ended with; a task that ended on a stage boundary left no
  untrained noise). The next task's adapter starts its own stage record from that W (stage 0, whose noise
  enters W at the next task's first training forward, not at next_task: nothing is stacked; with
  keep_pretrained_copy it copies that W): the old record is dropped.

Choices (ours): the fresh adapters of task t (t = 1, 2, ... tasks done) are built with layer index
t * L + k (L adapted layers, k the layer's position), so CURLoRA's sampler and LoRASC's noise draw new
values per task and per layer, reproducibly; the count of tasks done is kept on each layer
(``tasks_done``, a buffer of each adapter: in state dicts and adapter-only checkpoints, so a run resumed
from them builds the next task's adapters as the uninterrupted run does; a LoRASC adapter takes its
layer index from its record's seeds when loaded). W is updated for good: ``unmerge`` cannot go back past a
``next_task``.
"""
from __future__ import annotations

import torch
from torch import nn

from .merging import merge
from .methods import build_adapter
from .model_tree import required_adapter_layers
from .parallel_guards import refuse_new_adapters
from .training import remove_attached_hooks


@torch.no_grad()
def next_task(model: nn.Module) -> nn.Module:
    """End the current task: every adapted layer's W <- W + ΔW (what the method keeps; the copies
    ``merge`` keeps to undo a failure midway are held in host memory, not beside W on the GPU, and
    dropped after), and a fresh adapter of the same config in place of the old one (new
    parameters: build a new optimizer and attach the training hooks again; live hooks of ``model``
    are removed). Returns ``model``.

    Raises ValueError when the model has no adapters, when it holds several named adapters (W, which
    they share, would change under the inactive ones), when adapters are disabled (what should be
    kept is then ambiguous), or, as ``merge`` does, when a W is shared with another module.
    """
    layers = required_adapter_layers(model)
    refuse_new_adapters(model, "next_task")
    names = layers[0][1].adapter_names()
    if len(names) > 1:
        raise ValueError(f"the model holds named adapters {names}: next_task folds the active one into W, which "
                         f"the others share, so their outputs would change; delete_adapter the others first (save "
                         f"them with save_adapter(model, path, adapter_name=...))")
    disabled = [name for name, layer in layers if not layer.adapter_enabled]
    if disabled:
        raise ValueError(f"adapters of {disabled[:5]} are disabled; enable them (set_adapters_enabled(model, "
                         f"True)) before next_task, which keeps what they learned")
    merge(model, backup_device="cpu")
    remove_attached_hooks(model)
    for position, (_, layer) in enumerate(layers):
        task = layer.tasks_done + 1
        layer.weight_before_merge = None
        layer.merged = False
        layer.adapter = build_adapter(layer.config, layer.in_features, layer.out_features, layer.weight.detach(),
                                      layer_index=task * len(layers) + position).train(layer.training)
        layer.adapter.tasks_done.fill_(task)
        layer.adapter.bind(layer)
    return model

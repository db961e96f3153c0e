"""What a data-parallel wrapper around a model rules out, refused with the way that works.

DistributedDataParallel syncs the gradients of the parameters it found when it was built, and FSDP
shards the parameters it found when ``fully_shard`` ran (gathering W for each forward): adapters
built after wrapping (``inject``, ``add_adapter``, ``next_task``, ``load_adapter`` into a model
without adapters) or switched in inside DDP (``set_adapter``: an inactive adapter is frozen, so DDP
left it out) would train apart on each rank, or fail inside the first sharded forward. A merge writes
W in place, which FSDP holds as shards, and ``merge_and_unload`` / ``unload`` put modules FSDP does not
manage in place of the adapted layers. DDP is seen only when the wrapper itself is given (the module
inside it cannot tell).
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

DDP, FSDP = "DistributedDataParallel", "FSDP"
#: the way to what FSDP rules out
UNSHARDED_COPY = ("gather a full state dict into an unsharded copy (torch.distributed.checkpoint.state_dict."
                  "get_model_state_dict with full_state_dict=True)")


def parallel_wrapping(model: nn.Module) -> Optional[str]:
    """DDP when ``model`` (inside torch.compile's wrapper or not) is a DistributedDataParallel, FSDP when
    one of its modules is sharded by FSDP (``fully_shard``, or a FullyShardedDataParallel wrapper), else None
    (at once without a process group: both wrappers need one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDP
    if any(isinstance(module, _fsdp_types()) for module in model.modules()):
        return FSDP
    return None


def _fsdp_types() -> tuple[type, ...]:
    """FSDP's module types: FullyShardedDataParallel, and fully_shard's FSDPModule (torch.distributed.fsdp from
    torch 2.6, its composable package before)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return (FullyShardedDataParallel,)
    return (FSDPModule, FullyShardedDataParallel)


def refuse_new_adapters(model: nn.Module, caller: str) -> None:
    """ValueError when ``caller`` would build adapters the model's wrapper does not know."""
    wrapping = parallel_wrapping(model)
    if wrapping == DDP:
        rewrap = caller in ("next_task", "set_adapter")
        remedy = (f"call fastlora.{caller}(model.module{', ...' if caller == 'set_adapter' else ''}), then wrap "
                  f"model.module in a new DistributedDataParallel (and build its optimizer and training hooks)"
                  if rewrap else f"call fastlora.{caller} on the plain model before wrapping it")
        what = "the adapter it switches in (frozen then)" if caller == "set_adapter" else "adapters built now"
        raise ValueError(f"fastlora.{caller}: the model is wrapped in DistributedDataParallel, which syncs only the "
                         f"gradients of the parameters it found trainable when it was built: {what} would train "
                         f"apart on each rank; {remedy}")
    if wrapping == FSDP:
        remedy = (f"{UNSHARDED_COPY}, call {caller} there and shard it again" if caller == "next_task"
                  else f"call fastlora.{caller} on the model before fully_shard")
        raise ValueError(f"fastlora.{caller}: the model is sharded by FSDP, which shards the parameters it found "
                         f"when it was applied: adapters built now would not be sharded with them; {remedy}")


def refuse_weight_writes(model: nn.Module, caller: str) -> None:
    """ValueError when ``caller`` would write W in place in a model sharded by FSDP."""
    _refuse_under_fsdp(model, caller, "which holds W as shards and gathers it for each forward: W cannot be changed "
                                      "in place here")


def refuse_module_swaps(model: nn.Module, caller: str) -> None:
    """ValueError when ``caller`` would replace the adapted layers of a model sharded by FSDP."""
    _refuse_under_fsdp(model, caller, "which manages the modules and parameters it found when it was applied: "
                                      "layers put in their place would hold parameters outside it")


def _refuse_under_fsdp(model: nn.Module, caller: str, why: str) -> None:
    if parallel_wrapping(model) == FSDP:
        raise ValueError(f"fastlora.{caller}: the model is sharded by FSDP, {why}; {UNSHARDED_COPY} and {caller} there")

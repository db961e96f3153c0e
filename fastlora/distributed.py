"""Views of a parameter that may be a sharded DTensor (FSDP2's ``fully_shard``).

Inside the owning module's forward FSDP2 hands the module plain, gathered tensors; outside
it (post-step rules, stats) a parameter is a DTensor holding this rank's shard. Rules
written against these views run unchanged on plain tensors (single process, DDP):

    local_view(p)              this rank's shard, writable in place (p itself when plain)
    full_view(p)               the whole value as a plain tensor (all-gather: every rank calls it)
    local_part(full, p)        the part of a plain whole value ``full`` that p's shard holds
    placed_like(full, p)       ``full`` as a DTensor laid out as p (this rank's part; no communication)
    copy_full_(p, full)        p <- full, each rank writing its own shard (no communication)
"""
from __future__ import annotations

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (sharded or replicated across ranks)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_view(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (shares its storage), the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_view(tensor: Tensor) -> Tensor:
    """The whole value as a plain tensor: a DTensor's shards gathered (a collective, every
    rank must call it; differentiable), the tensor itself otherwise."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """The part of ``full`` (a plain tensor of like's global shape, equal on every rank) that
    like's local shard holds, with like's placements; ``full`` itself when like is plain."""
    if not is_dtensor(like):
        return full
    if full.shape != like.shape:
        raise ValueError(f"full value of shape {tuple(full.shape)} does not match the parameter's "
                         f"global shape {tuple(like.shape)}")
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def placed_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (a plain tensor of like's global shape, equal on every rank) laid out as ``like``: a DTensor
    holding this rank's part of it when like is one (no communication), ``full`` itself otherwise."""
    if not is_dtensor(like):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def copy_full_(tensor: Tensor, full: Tensor) -> Tensor:
    """tensor <- full (a plain tensor of tensor's global shape, equal on every rank); each
    rank writes its own shard, without communication. Returns ``tensor``."""
    local_view(tensor).copy_(local_part(full, tensor))
    return tensor

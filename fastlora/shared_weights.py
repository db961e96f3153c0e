"""Which tensors of a model share memory with a layer's weight (tied or shared weights).

A write into such a W would change the other module too: ``merge`` and ``inject`` of a method that
writes W (LoRASC) check with ``shared_weight_owners`` first.
"""
from __future__ import annotations

from torch import Tensor, nn


def _memory_span(tensor: Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of the memory ``tensor`` can reach."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    reach = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride())) + 1
    return tensor.untyped_storage().data_ptr(), start, start + reach * size


def shared_weight_owners(model: nn.Module, layers: list[tuple[str, nn.Module, Tensor]]) -> dict[str, list[str]]:
    """{layer name: the other tensors (qualified names) its W shares memory with} for each (name, module, W)
    of ``layers`` whose W overlaps a parameter or buffer of another module (an lm_head tied to the input
    embeddings, one W in two layers); layers sharing nothing are left out."""
    owners = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for key, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None and tensor.numel() and not tensor.is_meta:
                owners.append((module, f"{prefix}.{key}" if prefix else key, _memory_span(tensor)))
    shared = {}
    for name, layer, weight in layers:
        if weight.is_meta or not weight.numel():
            continue
        address, start, end = _memory_span(weight)
        others = sorted({owner for module, owner, (a, s, e) in owners
                         if module is not layer and a == address and s < end and start < e})
        if others:
            shared[name] = others
    return shared

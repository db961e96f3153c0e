"""HostReads: counts reads of tensor values on the host and tensors made from host data
(not collected: no test_ prefix).

float(t), bool(t), int(t) and t.item() all dispatch aten._local_scalar_dense; on a GPU each
is a device sync. torch.tensor(value, device=...) dispatches aten.lift_fresh: on a GPU a
host-to-device copy (it syncs the stream and cannot be captured in a CUDA graph). A fast
path does neither per call.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.count`` (host reads) and ``reads.copies``
    (tensors made from host data)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        if func is torch.ops.aten.lift_fresh.default:
            self.copies += 1
        return func(*args, **(kwargs or {}))

"""HostReads: counts reads of tensor values on the host (not collected: no test_ prefix).

float(t), bool(t), int(t) and t.item() all dispatch aten._local_scalar_dense; on a GPU each
is a device sync, so a fast path must not do them per call.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.count``."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

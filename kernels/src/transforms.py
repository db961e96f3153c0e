"""Whether an eager torch.func transform (grad, vjp, vmap...) is running: its wrapped tensors have no
storage, and it differentiates and batches torch's recorded ops, not the plans' autograd.Functions.
(torch.compile's own tracing also runs under functorch's interpreters: it is not counted.)"""
from __future__ import annotations

import torch


def functorch_active() -> bool:
    """Whether the call runs inside an eager torch.func transform."""
    return torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling()

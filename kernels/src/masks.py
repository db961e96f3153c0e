"""The dropout mask of the low-rank path, regenerated from a seed (nothing is stored between the
forward and the backward pass).

Where the Triton kernels can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
every plan uses the kernels' own draw, counter-based Philox4x32-10 (``philox.py``), so every plan
computes the same result there. On a GPU the torch plan's mask (a call given a seed, or under
torch.compile, where the plan runs through the autograd Function) is drawn by one Triton kernel
(``triton/dropout.py``) in the dtypes the kernels take; elsewhere (float64, the reference's dtype,
the interpreter, where that kernel is far slower, or no Triton) by the same Philox in torch ops:
about a hundred elementwise integer ops over (N, d_in), which on a GPU cost far more than the
layer. On CPU otherwise, only the torch plan runs: it draws
from torch's CPU generator seeded with the seed (a handful of ops, about what ``nn.Dropout``
costs), which gives another mask for the same seed. Either way the seed alone determines the mask,
so a recomputation (backward, gradient checkpointing) sees the same one. (An eager torch-plan call
given no seed uses none of these, on CPU and on a GPU: its mask is ``F.dropout``'s, kept by autograd for
the backward, one op as ``nn.Dropout``'s; see ``unseeded_torch_dropout``.)
"""
from __future__ import annotations

import numbers
import threading

import torch
from torch import Tensor

from .eligibility import triton_ineligibility, triton_interpreter_on
from .philox import philox_mask, seed_tensor


def kernels_draw(device: torch.device) -> bool:
    """Whether masks on ``device`` are the Triton kernels' Philox draw (else torch's CPU generator)."""
    return device.type != "cpu" or triton_interpreter_on()


def unseeded_torch_dropout() -> bool:
    """Whether a torch-plan call given no dropout seed (recorded by autograd) draws its mask with torch's
    own dropout, as nn.Dropout does, instead of drawing a seed for the kernels' Philox: everywhere but
    under the Triton interpreter, where every plan keeps the kernels' draw so that tests compare the
    plans mask for mask."""
    return not triton_interpreter_on()


def dropout_mask(n: int, d_in: int, p: float, seed, device=None, dtype=torch.float32) -> Tensor:
    """The dropout mask (n, d_in) every plan on ``device`` uses: 1/(1-p) where kept, 0 where dropped.

    ``seed``: an int or a 1-element int64 tensor (its device is used when ``device`` is None);
    ``dtype``: a floating dtype.
    """
    for name, value in (("n", n), ("d_in", d_in)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")
    if isinstance(seed, Tensor) and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"a seed tensor must hold one int64 element, got {seed.dtype} of shape {tuple(seed.shape)}")
    return draw_mask(n, d_in, p, seed, device, dtype)


def draw_mask(n: int, d_in: int, p: float, seed, device=None, dtype=torch.float32) -> Tensor:
    """``dropout_mask`` without its argument checks (the op's own calls, validated already)."""
    seed = seed_tensor(seed, device if device is not None else "cpu") if not isinstance(seed, Tensor) else seed
    device = seed.device if device is None else torch.device(device)
    if not kernels_draw(device):
        return _cpu_mask(n, d_in, p, seed, dtype)
    if mask_kernel_draws(device, dtype):
        from .triton.dropout import dropout_mask as kernel_mask
        return kernel_mask(n, d_in, p, seed.to(device), device, dtype)
    return philox_mask(n, d_in, p, seed.to(device), dtype)


def mask_kernel_draws(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dropout_mask`` draws with the Triton mask kernel (one launch): on CUDA, in the
    kernels' dtypes, with Triton installed."""
    return device.type == "cuda" and triton_ineligibility(device, dtype) is None


_CPU = threading.local()  # one reseeded generator per thread (building one per call costs host time)


def _cpu_mask(n: int, d_in: int, p: float, seed: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask drawn from torch's CPU generator seeded with ``seed`` (a CPU value: no device sync):
    fp32 uniforms whatever ``dtype``, so the keep pattern depends on the seed alone."""
    generator = getattr(_CPU, "generator", None)
    if generator is None:
        generator = _CPU.generator = torch.Generator()
    generator.manual_seed(seed.item())
    keep = torch.rand(n, d_in, generator=generator, dtype=torch.float32) >= p  # whatever torch's default dtype
    if dtype == torch.float32:  # the common case: fp32(1 / (1 - p)), as the scalar rounds in an fp32 product
        return keep.to(dtype).mul_(1.0 / (1.0 - p))
    return keep.to(dtype) / (1.0 - p)

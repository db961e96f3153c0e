"""Elementwise activations of NEAT's weight path with their derivatives (torch)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def _gelu_grad(z: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _silu_grad(z: Tensor) -> Tensor:
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "relu": (torch.relu, lambda z: (z > 0).to(z.dtype)),
    "gelu": (torch.nn.functional.gelu, _gelu_grad),
    "silu": (torch.nn.functional.silu, _silu_grad),
    "tanh": (torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2),
    "sigmoid": (torch.sigmoid, lambda z: torch.sigmoid(z) * (1.0 - torch.sigmoid(z))),
    "identity": (lambda z: z, torch.ones_like),
}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")


def activation(name: str, z: Tensor) -> Tensor:
    return ACTIVATIONS[name][0](z)


def activation_grad(name: str, z: Tensor) -> Tensor:
    """act'(z), elementwise."""
    return ACTIVATIONS[name][1](z)

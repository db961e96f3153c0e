"""fastlora.kernels: the compute layer (torch reference, Triton kernels, autograd, dispatch).

No nn.Module and no config here; ``fastlora`` builds on these functions.
"""
from .activations import ACTIVATIONS
from .dispatch import BACKENDS, select_backend, triton_backend
from .neat import neat_projection, neat_projection_reference
from .ops import adapted_linear
from .reference import adapted_linear_reference
from .torch_impl import dropout_keep_mask

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "adapted_linear",
    "adapted_linear_reference",
    "dropout_keep_mask",
    "neat_projection",
    "neat_projection_reference",
    "select_backend",
    "triton_backend",
]

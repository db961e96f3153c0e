"""fastlora.kernels: the compute layer (torch reference, Triton kernels, autograd, dispatch).

No nn.Module and no config here; ``fastlora`` builds on these functions.
"""
from .activations import ACTIVATIONS
from .dispatch import BACKENDS, PLANS
from .eligibility import triton_backend
from .masks import dropout_mask
from .neat import neat_projection, neat_projection_reference
from .ops import adapted_linear
from .reference import adapted_linear_reference

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "PLANS",
    "adapted_linear",
    "adapted_linear_reference",
    "dropout_mask",
    "neat_projection",
    "neat_projection_reference",
    "triton_backend",
]

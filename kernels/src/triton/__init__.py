"""Triton kernels of the adapted linear and NEAT's projection; ``impl`` is the backend module."""

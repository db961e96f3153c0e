"""Who forms the skinny products where one of torch's GEMMs (cuBLAS on a GPU) could: the Triton kernels
("triton") or torch.mm ("cublas"). The GEMM reads the same operands once with cuBLAS's tiling (none of
the kernels' per-block re-reads of the (N, r) or (r, d) operand, no partial sums), in the operands'
dtype with fp32 accumulation and one rounding of the product; the kernels keep their fp32 results.
Where the dropout mask applies (the shrink of x, dA) the kernels draw it in registers and stay.

Both choices are "triton" until a GPU run shows the GEMMs faster: gpu_check's section "products" times
each product both ways at the benchmark shapes (``against_cublas`` in benchmarks/check_kernels.py;
``python -m benchmarks.decisions`` reads the verdict from its report).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

#: the dy pass where it reads dy twice anyway (its single pass is not the cheaper; plain factors, no
#: dbias): dP = dy B by the shrink and dB = dy^T v by the column pass, or two GEMMs
DY_TWICE = "triton"
#: the shrink t = x A^T and dA = dt^T x without dropout (plain factors)
UNMASKED = "triton"


def by_gemm(choice: str) -> bool:
    """Whether a product with this choice is formed by torch's GEMM."""
    return choice == "cublas"


@contextlib.contextmanager
def triton_only() -> Iterator[None]:
    """Every skinny product on its Triton kernel while the block runs (to time the kernels against cuBLAS)."""
    global DY_TWICE, UNMASKED
    saved = DY_TWICE, UNMASKED
    DY_TWICE = UNMASKED = "triton"
    try:
        yield
    finally:
        DY_TWICE, UNMASKED = saved

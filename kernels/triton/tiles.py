"""Tile loads shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def load_factor(base, idx_ptr, rr, kk, R, K, stride_r, stride_k, GATHER: tl.constexpr):
    """Tile of a rank factor F (r, K): F[j, k] = base[j, k], or base[idx[j], k] when GATHER.

    ``rr`` (rank indices) and ``kk`` (column indices) are broadcastable 2-D index blocks;
    their orientation sets the tile's. Entries with j >= R or k >= K read 0. With GATHER,
    rows of a frozen weight are read in place by index (CURLoRA's R = W[I] and C = W[:, J]).
    """
    mask = (rr < R) & (kk < K)
    if GATHER:
        rows = tl.load(idx_ptr + rr, mask=rr < R, other=0).to(tl.int64)
    else:
        rows = rr.to(tl.int64)
    return tl.load(base + rows * stride_r + kk.to(tl.int64) * stride_k, mask=mask, other=0.0)

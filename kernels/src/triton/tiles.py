"""Tile helpers shared by the kernels: which output tile a GEMM program owns, and factor tile loads."""
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


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n): the output tile of this program of a 1-D GEMM grid of cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    programs, ordered in groups of GROUP_M row tiles so that neighbouring programs share W tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m

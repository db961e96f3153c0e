"""Kernel-layer edges the mutation sample showed unguarded: the dropout seed spans the whole int64 range, the
fused kernel's default low-rank scale, the launch metadata's byte and FLOP counts, tile pruning without a token
bucket, a single partial's dtype, the weight's rank check."""
import re

import pytest
import torch

from fastlora.kernels.philox import draw_seed

from utils import rel


def test_drawn_seeds_cover_negative_and_positive_int64_values():
    torch.manual_seed(0)
    seeds = torch.cat([draw_seed("cpu") for _ in range(64)])
    assert seeds.dtype == torch.int64 and seeds.shape == (64,)
    assert (seeds < -(2**62)).any() and (seeds > 2**62).any()  # both signs, high bits used
    assert seeds.unique().numel() == 64


def test_fused_linear_adds_the_low_rank_term_unscaled_by_default():
    pytest.importorskip("triton")
    from fastlora.kernels.triton.fused_linear import fused_linear

    generator = torch.Generator().manual_seed(1)
    x, w, bias = (torch.randn(shape, generator=generator) for shape in [(5, 7), (6, 7), (6,)])
    v, u = torch.randn(5, 3, generator=generator), torch.randn(3, 6, generator=generator)
    expected = x.double() @ w.double().T + bias.double() + v.double() @ u.double()
    assert rel(fused_linear(x, w.t(), bias, v, u).double(), expected) < 1e-5


def test_launch_metadata_counts_each_operand_once_for_every_kernel():
    pytest.importorskip("triton")
    from fastlora.kernels.triton import metadata

    bf16, fp32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)
    m, n, k, r = 1000, 300, 700, 12  # not powers of two: a sum and an XOR or OR of the terms differ
    shrink = metadata.shrink(None, None, dict(M=m, K=k, R=r, x_ptr=bf16))
    assert shrink == {"name": f"fastlora.shrink M={m} K={k} r={r}", "flops16": 2 * m * k * r,
                      "bytes": 2 * m * k + 2 * r * k + 4 * m * r}  # x, A read; t (fp32) written
    for dp, db in [(1, 1), (1, 0), (0, 1)]:
        columns = metadata.dy_columns(None, None, dict(M=m, D=n, R=r, dy_ptr=bf16, COMPUTE_DP=dp, COMPUTE_DB=db))
        assert columns["flops16"] == (dp + db) * 2 * m * n * r
        assert columns["bytes"] == 2 * m * n + 2 * n * r + 4 * m * r * (dp + db)  # dy, B; dP and/or dB partials
    down = metadata.down_grad(None, None, dict(M=m, K=k, R=r, x_ptr=fp32))
    assert down == {"name": f"fastlora.down_grad M={m} K={k} r={r}", "flops32": 2 * m * k * r,
                    "bytes": 4 * m * k + 4 * m * r + 4 * r * k}  # x, dt read; dA written
    neat = metadata.neat_projection(None, None, dict(D_OUT=n, D_IN=k, R=r, w_ptr=bf16))
    assert neat == {"name": f"fastlora.neat D_OUT={n} D_IN={k} r={r}", "flops16": 2 * n * k * r,
                    "bytes": 2 * (n * k + n * r + 2 * k * r)}  # W, A_n read; H' (d_in, r) written and read
    forward = metadata.onepass_forward(None, None, dict(M=m, N=n, K=k, R=r, out_ptr=bf16))
    assert forward["bytes"] == 2 * (m * k + k * n + m * n + r * k + r * n) + 4 * m * r
    assert forward["flops16"] == 2 * m * n * k + 2 * m * n * r + 2 * m * k * r


def test_gemm_configs_keep_tall_tiles_when_no_token_bucket_is_given():
    triton = pytest.importorskip("triton")
    from fastlora.kernels.triton.launch_config import prune_gemm_configs

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}) for bm in (16, 64, 256)]
    assert prune_gemm_configs(configs, {}) == configs
    assert [c.kwargs["BLOCK_M"] for c in prune_gemm_configs(configs, {"M_BUCKET": 8})] == [16]


def test_partials_are_the_output_with_one_split_and_summed_in_fp32_with_several():
    pytest.importorskip("triton")
    from fastlora.kernels.triton.partials import partial_buffer, sum_partials

    one = partial_buffer(1, (4, 3), torch.float16, "cpu")
    assert one.shape == (4, 3) and one.dtype == torch.float16
    assert sum_partials(one, 1, torch.float16) is one  # the kernel wrote the output itself
    part = partial_buffer(3, (4, 3), torch.float16, "cpu")
    assert part.shape == (3, 4, 3) and part.dtype == torch.float32
    part.copy_(torch.randn(3, 4, 3, dtype=torch.float64))
    expected = part.double().sum(0)
    assert torch.allclose(sum_partials(part, 3, torch.float32).double(), expected, rtol=1e-6, atol=1e-6)
    half = sum_partials(part, 3, torch.float16)
    assert half.dtype == torch.float16 and torch.allclose(half.double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("shape", [(6,), (2, 4, 6)])
def test_a_weight_that_is_not_2d_is_refused_by_name(shape):
    from fastlora.kernels import adapted_linear

    x, a, b = torch.randn(3, 6), torch.randn(2, 6), torch.randn(4, 2)
    with pytest.raises(ValueError, match=rf"weight must be 2-D \(d_out, d_in\), got shape {re.escape(str(shape))}"):
        adapted_linear(x, torch.randn(shape), None, a, b, scale=1.0, backend="torch")

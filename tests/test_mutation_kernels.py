"""Kernel-layer edges the mutation sample showed unguarded: the dropout seed spans the whole int64 range, the
fused kernel's default low-rank scale."""
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

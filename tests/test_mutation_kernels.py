"""Kernel-layer edges the mutation sample showed unguarded: the dropout seed spans the whole int64 range."""
import torch

from fastlora.kernels.philox import draw_seed


def test_drawn_seeds_cover_negative_and_positive_int64_values():
    torch.manual_seed(0)
    seeds = torch.cat([draw_seed("cpu") for _ in range(64)])
    assert seeds.dtype == torch.int64 and seeds.shape == (64,)
    assert (seeds < -(2**62)).any() and (seeds > 2**62).any()  # both signs, high bits used
    assert seeds.unique().numel() == 64

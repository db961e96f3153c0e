"""The input checks at their edges: valid calls there run (values against the float64 reference), and the
refusals just past them name the problem. Rank 1, ranks and widths above 256 (past CPython's small-int
cache), 3-D inputs, dropout near its bound, an index longer than the rank, an empty index."""
import pytest
import torch

from fastlora.kernels import adapted_linear, adapted_linear_reference, dropout_mask

F64 = torch.float64


def _rel(out, ref):
    return float((out - ref).norm() / ref.norm())


def _tensors(n, d_in, d_out, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g, dtype=F64), torch.randn(d_out, d_in, generator=g, dtype=F64),
            torch.randn(d_out, generator=g, dtype=F64), torch.randn(r, d_in, generator=g, dtype=F64),
            torch.randn(d_out, r, generator=g, dtype=F64))


@pytest.mark.parametrize("n, d_in, d_out, r", [(3, 5, 4, 1), (4, 300, 310, 260), (2, 257, 3, 2)])
def test_factor_ranks_and_widths_at_the_edges_run(n, d_in, d_out, r):
    x, w, b, a, bb = _tensors(n, d_in, d_out, r)
    out = adapted_linear(x, w, b, a, bb, scale=0.7, backend="torch")
    assert _rel(out, adapted_linear_reference(x, w, b, a, bb, scale=0.7)) < 1e-12


@pytest.mark.parametrize("r", [1, 270])
def test_gathered_factors_of_rank_one_and_above_256_run(r):
    x, w, b, _, _ = _tensors(3, 290, 300, r, seed=1)
    g = torch.Generator().manual_seed(2)
    rows, cols = torch.randperm(300, generator=g)[:r], torch.randperm(290, generator=g)[:r]
    middle = torch.randn(r, r, generator=g, dtype=F64) / r
    out = adapted_linear(x, w, b, None, None, middle=middle, row_index=rows, col_index=cols, backend="torch")
    ref = adapted_linear_reference(x, w, b, None, None, middle=middle, row_index=rows, col_index=cols)
    assert _rel(out, ref) < 1e-12


def test_a_3d_input_runs_and_keeps_its_leading_dimensions():
    x, w, b, a, bb = _tensors(6, 5, 4, 2)
    x3 = x.view(2, 3, 5)
    out = adapted_linear(x3, w, b, a, bb, backend="torch")
    assert out.shape == (2, 3, 4)
    assert _rel(out, adapted_linear_reference(x3, w, b, a, bb)) < 1e-12


@pytest.mark.parametrize("p", [0.05, 0.5, 0.99])
def test_dropout_below_one_runs_with_the_seeded_mask(p):
    x, w, b, a, bb = _tensors(8, 6, 4, 2)
    out = adapted_linear(x, w, b, a, bb, dropout=p, dropout_seed=11, backend="torch")
    mask = dropout_mask(8, 6, p, 11, dtype=F64)
    assert _rel(out, adapted_linear_reference(x, w, b, a, bb, dropout_mask=mask)) < 1e-12


def test_an_index_longer_than_the_rank_is_refused():
    x, w, b, _, _ = _tensors(3, 6, 5, 2)
    with pytest.raises(ValueError, match=r"col_index must have r=2 entries, got 3"):
        adapted_linear(x, w, b, None, None, row_index=torch.tensor([0, 1]), col_index=torch.tensor([0, 1, 2]),
                       backend="torch")


def test_an_empty_index_is_refused_by_name():
    x, w, b, a, bb = _tensors(3, 6, 5, 2)
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="row_index must not be empty"):
        adapted_linear(x, w, b, None, bb, row_index=empty, backend="torch")
    with pytest.raises(ValueError, match="col_index must not be empty"):
        adapted_linear(x, w, b, a, None, col_index=empty, backend="torch")

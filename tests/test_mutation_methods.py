"""Method details that only mutation testing showed unchecked; expected values come from the authors'
sampling procedure (tests/test_oracles.py) or are written out here, never read from the adapter."""
import pytest
import torch
from torch import nn

import fastlora
from fastlora import CurLoraConfig
from fastlora.methods.curlora import CurLoraAdapter, inverted_probabilities
from test_oracles import authors_cur_indices


def uneven_weight(d_out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return w * torch.linspace(0.05, 3.0, d_in)[None, :] * torch.linspace(0.2, 2.0, d_out)[:, None]


def test_curlora_adapter_built_directly_samples_with_the_config_seed():
    """Without a layer index the adapter is layer 0: it samples with the config's seed itself."""
    weight = uneven_weight(30, 40, seed=1)
    adapter = CurLoraAdapter(CurLoraConfig(r=6, seed=11), 40, 30, weight)
    rows, cols = authors_cur_indices(weight, 6, 11)
    assert torch.equal(adapter.row_index, rows)
    assert torch.equal(adapter.col_index, cols)


def test_curlora_layer_k_samples_with_seed_plus_k():
    """inject numbers the adapted layers 0, 1, 2, ...; layer k samples with seed + k (7 + k, not 7 | k)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(40, 40) for _ in range(4))).double()
    with torch.no_grad():
        for index, linear in enumerate(model):
            linear.weight.copy_(uneven_weight(40, 40, seed=10 + index))
    weights = [linear.weight.detach().clone() for linear in model]
    fastlora.inject(model, CurLoraConfig(r=5, seed=7, target_modules="all-linear"))
    for index, layer in enumerate(model):
        rows, cols = authors_cur_indices(weights[index], 5, 7 + index)
        assert torch.equal(layer.adapter.row_index, rows), index
        assert torch.equal(layer.adapter.col_index, cols), index


def test_curlora_accepts_a_weight_of_small_norm():
    """||W||_F^2 = 0.01 * ||W0||_F^2 < 1 is a valid weight: the probabilities are scale-free."""
    weight = uneven_weight(30, 40, seed=2)
    small = weight * (0.1 / weight.norm())
    assert float(small.square().sum()) < 1.0
    adapter = CurLoraAdapter(CurLoraConfig(r=6, seed=4), 40, 30, small)
    rows, cols = authors_cur_indices(small, 6, 4)
    assert torch.equal(adapter.row_index, rows)
    assert torch.equal(adapter.col_index, cols)


@pytest.mark.parametrize("dim,what,zeros", [(0, "column", (6, 2)), (1, "row", (4, 9))])
def test_curlora_zero_line_error_names_the_first_zero_column_or_row(dim, what, zeros):
    """With eps = 0 a zero column (row) has p = 0: the error names its kind and the lowest such index."""
    weight = uneven_weight(12, 14, seed=3)
    for index in zeros:
        if dim == 0:
            weight[:, index] = 0.0
        else:
            weight[index, :] = 0.0
    with pytest.raises(ValueError, match=rf"^W {what} {min(zeros)} is all zeros"):
        inverted_probabilities(weight, dim, 0.0)

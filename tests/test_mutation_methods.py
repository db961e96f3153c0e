"""Method details that only mutation testing showed unchecked; expected values come from the authors'
sampling procedure (tests/utils.py) or are written out here, never read from the adapter."""
import math

import pytest
import torch
from torch import nn

import fastlora
from fastlora import CurLoraConfig
from fastlora.methods.curlora import CurLoraAdapter, inverted_probabilities

from utils import authors_cur_indices


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


def test_codyra_first_step_of_a_fresh_adapter_is_step_one():
    """A freshly built adapter (no checkpoint, no refresh) counts its first optimizer step as step 1:
    with 2 sparse steps and 2 levels, kappa(1) = 0.25 and kappa(2) = 0.5, so w = 1.0 becomes 0.75."""
    config = fastlora.RankSelectiveLoraConfig(r=3, importance_init=1.0, total_steps=2, dense_fraction=0.0,
                                              threshold_levels=2, kappa_max=0.5)
    model = fastlora.inject(nn.Sequential(nn.Linear(8, 6, dtype=torch.float64)), config)
    adapter = model[0].adapter
    assert not adapter.schedule_done
    adapter.after_optimizer_step(0.1)
    assert torch.equal(adapter.importance.detach(), torch.full((3,), 0.75, dtype=torch.float64))
    assert int(adapter.optimizer_steps) == 1 and adapter.extra_stats()["optimizer_steps"] == 1.0
    assert adapter.extra_stats()["kappa"] == 0.25
    assert not adapter.schedule_done  # one of two steps done
    adapter.after_optimizer_step(0.1)
    assert torch.equal(adapter.importance.detach(), torch.full((3,), 0.25, dtype=torch.float64))
    assert adapter.schedule_done


def test_codyra_randn_init_from_a_config_string_read_at_run_time():
    """importance_init read from a file is an equal string, not the interned literal: still the N(0, 1) draw
    (after A's kaiming-uniform draw from the same default generator)."""
    config = fastlora.RankSelectiveLoraConfig(r=4, importance_init="".join(["ran", "dn"]))
    model = nn.Sequential(nn.Linear(8, 6, dtype=torch.float64))
    torch.manual_seed(5)
    fastlora.inject(model, config)
    torch.manual_seed(5)
    nn.init.kaiming_uniform_(torch.empty(4, 8, dtype=torch.float64), a=math.sqrt(5))
    assert torch.equal(model[0].adapter.importance.detach(), torch.randn(4, dtype=torch.float64))

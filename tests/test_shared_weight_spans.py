"""shared_weight_owners against the elements themselves: views of one storage share memory exactly when
they hold a common element (adjacent slices share nothing, one common element is enough), at any offset,
element size and row layout, for every name a module is registered under."""
import pytest
import torch
from torch import nn

from fastlora.shared_weights import shared_weight_owners


def _holder(tensor: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(tensor, requires_grad=False)  # a Parameter aliases the view's storage
    return module


def _elements(view: torch.Tensor) -> set[int]:
    """The storage elements a view of an arange holds (its values are their indices)."""
    return {int(v) for v in view.flatten().tolist()}


# (layer's view, other module's view) as slices of one 1-D storage of 96 elements
SPANS = {
    "adjacent after": (slice(24, 36), slice(36, 48)),
    "adjacent before": (slice(24, 36), slice(12, 24)),
    "last element": (slice(24, 36), slice(35, 39)),
    "first element": (slice(24, 36), slice(21, 25)),
    "inside": (slice(24, 36), slice(28, 30)),
    "around": (slice(24, 36), slice(20, 40)),
    "far after": (slice(24, 36), slice(60, 96)),
    "far before": (slice(24, 36), slice(0, 8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", SPANS)
def test_slices_of_one_storage_share_exactly_when_they_hold_a_common_element(case, dtype):
    base = torch.arange(96, dtype=dtype)
    mine, theirs = SPANS[case]
    weight = base[mine].view(3, 4)
    model = nn.Module()
    model.layer, model.other = _holder(weight), _holder(base[theirs])
    expected = {"layer": ["other.weight"]} if _elements(weight) & _elements(base[theirs]) else {}
    assert shared_weight_owners(model, [("layer", model.layer, weight)]) == expected


@pytest.mark.parametrize("rows, shares", [((4, 6), False), ((1, 2), False), ((3, 5), True), ((1, 3), True),
                                          ((0, 10), True)])
def test_row_blocks_of_a_matrix_and_a_transposed_view(rows, shares):
    """W = rows 2-3 of a (10, 4) matrix, seen through a transposed view (as a Conv1D layer sees its weight)."""
    base = torch.arange(40, dtype=torch.float32).view(10, 4)
    weight = base[2:4].t()  # (4, 2), strides (1, 4)
    model = nn.Module()
    model.layer, model.other = _holder(weight), _holder(base[rows[0]:rows[1]])
    assert bool(_elements(weight) & _elements(base[rows[0]:rows[1]])) is shares
    expected = {"layer": ["other.weight"]} if shares else {}
    assert shared_weight_owners(model, [("layer", model.layer, weight)]) == expected


def test_every_name_of_a_module_registered_twice_is_an_owner():
    base = torch.arange(32, dtype=torch.float32)
    model = nn.Module()
    model.layer, model.other = _holder(base[:16].view(4, 4)), _holder(base[8:24])
    model.alias = model.other
    assert shared_weight_owners(model, [("layer", model.layer, model.layer.weight)]) == {
        "layer": ["alias.weight", "other.weight"]}


def test_a_meta_or_empty_weight_is_skipped_and_the_layers_after_it_are_still_checked():
    base = torch.arange(32, dtype=torch.float32)
    model = nn.Module()
    model.layer, model.other = _holder(base[:16].view(4, 4)), _holder(base[12:20])
    meta, empty = torch.empty(4, 4, device="meta"), base[14:14].view(0, 4)  # empty, inside other's span
    layers = [("meta", nn.Module(), meta), ("empty", nn.Module(), empty),
              ("layer", model.layer, base[:16].view(4, 4))]
    assert shared_weight_owners(model, layers) == {"layer": ["other.weight"]}


def test_the_layers_own_tensors_and_other_storages_are_not_owners():
    model = nn.Module()
    model.layer = _holder(torch.randn(4, 4))
    model.layer.register_buffer("copy", model.layer.weight.detach()[1:3])  # the layer's own module: not another
    model.other = _holder(torch.randn(4, 4))  # same shape, another storage
    assert shared_weight_owners(model, [("layer", model.layer, model.layer.weight)]) == {}

"""The argument bundles of the compute layer (kernels/src/spec.py) and the plan contract on skipped factors.

Found by mutation testing: the plan-level contract ("a tensor for every input flagged in ``needs``, None where
not needed", immutable bundles shared by forward and backward) was only seen through autograd, which ignores
extra gradients and never reads ``rank`` or builds ``Grads`` with arguments.
"""
import pytest
import torch

from fastlora.kernels import torch_impl
from fastlora.kernels.spec import Grads, GradsNeeded, LowRankTerm

D_IN, D_OUT, R, N = 11, 7, 3, 5
NEEDS_FIELDS = ("x", "bias", "a", "b", "middle", "rank_weights", "gate")


def make_term(*, gathered=False, gate=1.0, middle=False, rank_weights=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = None if gathered else torch.randn(R, D_IN, generator=g, dtype=torch.float64)
    b = None if gathered else torch.randn(D_OUT, R, generator=g, dtype=torch.float64)
    return LowRankTerm(
        a=a, b=b,
        middle=torch.randn(R, R, generator=g, dtype=torch.float64) if middle else None,
        rank_weights=torch.randn(R, generator=g, dtype=torch.float64) if rank_weights else None,
        row_index=torch.tensor([4, 0, 6]) if gathered else None,
        col_index=torch.tensor([10, 2, 5]) if gathered else None,
        scale=0.5, gate=gate, dropout_p=0.0, dropout_seed=None)


def needs(**flags):
    return GradsNeeded(**{name: flags.get(name, False) for name in NEEDS_FIELDS})


@pytest.mark.parametrize("gathered", [False, True], ids=["factors", "gathered"])
def test_rank_is_the_number_of_rows_of_a(gathered):
    # R = 3 differs from D_IN = 11, so the wrong axis or the wrong tensor gives another number
    term = make_term(gathered=gathered)
    assert term.rank == R
    assert isinstance(term.rank, int)


def test_bundles_are_immutable():
    term = make_term()
    with pytest.raises(AttributeError):  # named tuples: no field can be set
        term.scale = 2.0
    assert term.scale == 0.5
    flags = needs(a=True)
    with pytest.raises(AttributeError):
        flags.a = False
    assert flags.a is True


@pytest.mark.parametrize("name", ["a", "b", "middle", "rank_weights", "gate"])
def test_any_lowrank_is_true_for_each_lowrank_input_alone(name):
    assert needs(**{name: True}).any_lowrank is True


def test_any_lowrank_is_false_for_x_and_bias_only():
    assert needs(x=True, bias=True).any_lowrank is False


def test_grads_take_keyword_arguments_and_default_to_none():
    dx, da = torch.ones(2), torch.zeros(3)
    grads = Grads(x=dx, a=da)
    assert grads.x is dx and grads.a is da
    assert (grads.bias, grads.b, grads.middle, grads.rank_weights, grads.gate) == (None,) * 5


@pytest.mark.parametrize("requested", [(), ("a",), ("b",), ("a", "b", "middle", "rank_weights")],
                         ids=["none", "a", "b", "all"])
def test_gate_off_zero_grads_only_for_requested_factors(requested):
    """Gate off: every factor asked for gets an exact zero gradient of its shape, the others None."""
    term = make_term(gate=0.0, middle=True, rank_weights=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    weight = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    dy = torch.randn(N, D_OUT, generator=g, dtype=torch.float64)
    grads = torch_impl.backward(dy, x, weight, term, None, needs(x=True, **{name: True for name in requested}))
    torch.testing.assert_close(grads.x, dy @ weight, rtol=1e-12, atol=0)
    for name, like in (("a", term.a), ("b", term.b), ("middle", term.middle), ("rank_weights", term.rank_weights)):
        got = getattr(grads, name)
        if name in requested:
            assert got is not None and got.shape == like.shape and torch.count_nonzero(got) == 0, name
        else:
            assert got is None, f"{name} was not asked for but got a gradient"

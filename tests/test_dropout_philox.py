"""The dropout mask every plan uses, checked against an independent scalar Philox4x32-10.

The reference below is written from the Philox definition with Python integers (no torch,
no Triton) and pinned to the published known-answer vectors; the torch implementation and
the Triton kernel must reproduce it bit for bit, keep 1 - p of the entries, and agree with
the masks the forward and backward passes actually apply.
"""
import math

import pytest
import torch

from fastlora.kernels import adapted_linear, dropout_mask
from fastlora.kernels.eligibility import triton_backend, triton_interpreter_on
from fastlora.kernels.philox import keep_threshold, philox4x32, philox_mask, random_words, seed_tensor

MASK32 = 0xFFFFFFFF


def philox_scalar(counter, key, rounds=10):
    """Philox4x32 on Python ints: the textbook round, one block."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        prod_a, prod_b = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((prod_b >> 32) ^ c1 ^ k0) & MASK32, prod_b & MASK32, ((prod_a >> 32) ^ c3 ^ k1) & MASK32, \
            prod_a & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def mask_scalar(n, d_in, p, seed):
    """The documented mask rule, entry by entry: lane k % 4 of the block at counter (k // 4, n, 0, 0)."""
    seed &= (1 << 64) - 1
    key = (seed & MASK32, seed >> 32)
    threshold = round(p * 2**31)
    out = torch.zeros(n, d_in, dtype=torch.float64)
    for row in range(n):
        for col in range(d_in):
            word = philox_scalar((col // 4, row, 0, 0), key)[col % 4]
            out[row, col] = 1.0 / (1.0 - p) if (word >> 1) >= threshold else 0.0
    return out


# Known-answer vectors of Philox4x32-10 (Random123's kat_vectors)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert philox_scalar(counter, key) == expected
    as_tensor = philox4x32(tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in as_tensor) == expected


@pytest.mark.parametrize("seed", [0, 1234, -7, 2**40 + 3])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_matches_scalar_reference(seed, p):
    assert torch.equal(philox_mask(9, 22, p, seed_tensor(seed, "cpu"), torch.float64), mask_scalar(9, 22, p, seed))


def p_at_the_draw_of(seed: int, row: int, col: int) -> float:
    """The drop rate whose threshold round(p 2^31) is entry (row, col)'s own 31-bit draw (exact in a float)."""
    word = int(random_words(seed_tensor(seed, "cpu"), torch.tensor([row]), torch.tensor([col]))[0, 0]) >> 1
    p = word / 2**31
    assert keep_threshold(p) == word
    return p


def test_an_entry_whose_draw_equals_the_threshold_is_kept():
    """Kept when word >> 1 >= round(p 2^31): at a p whose threshold is one entry's draw, that entry stays."""
    p = p_at_the_draw_of(1234, 3, 6)
    mask = philox_mask(5, 9, p, seed_tensor(1234, "cpu"), torch.float64)
    assert mask[3, 6] == 1 / (1 - p)
    assert torch.equal(mask, mask_scalar(5, 9, p, 1234))


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63 - 1])
def test_seed_tensor_holds_every_64_bit_seed(seed):
    assert seed_tensor(seed, "cpu").tolist() == [seed]


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1])
def test_seed_tensor_refuses_seeds_past_64_bits(seed):
    with pytest.raises(ValueError, match=f"dropout_seed must fit in 64 bits, got {seed}"):
        seed_tensor(seed, "cpu")


@pytest.mark.parametrize("seed", [True, 1.5, "3", None])
def test_seed_tensor_refuses_what_is_not_an_int(seed):
    with pytest.raises(TypeError, match=f"dropout_seed must be an int, got {type(seed).__name__}"):
        seed_tensor(seed, "cpu")


def test_keep_rate_and_independence():
    p, n, d = 0.3, 256, 384
    keep = dropout_mask(n, d, p, 99) != 0
    total = n * d
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / total)
    # rows and columns (all four Philox lanes) keep at the same rate: no lane or row is biased
    for lane in range(4):
        lane_rate = keep[:, lane::4].double().mean().item()
        assert abs(lane_rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (total / 4))
    # neighbouring entries are uncorrelated (lanes of one block, and adjacent rows)
    flat = keep.double() - (1 - p)
    for a, b in ((flat[:, :-1], flat[:, 1:]), (flat[:-1], flat[1:])):
        corr = (a * b).mean().item() / (p * (1 - p))
        assert abs(corr) < 0.02
    # another seed gives another mask
    other = dropout_mask(n, d, p, 100) != 0
    assert (keep != other).double().mean().item() > 0.3


def test_no_overflow_beyond_2_31_elements():
    """Rows and column groups are separate 32-bit counters: rows past 2^31 / d_in are distinct."""
    seed = seed_tensor(5, "cpu")
    rows = torch.tensor([0, 2**31 // 64, 2**31 // 64 + 1, 2**31 + 3, 2**32 - 1])
    words = random_words(seed, rows, torch.arange(64))
    assert len({tuple(w.tolist()) for w in words}) == len(rows)
    key = (5, 0)
    for i, row in enumerate(rows.tolist()):
        for col in (0, 1, 2, 3, 63):
            assert int(words[i, col]) == philox_scalar((col // 4, row, 0, 0), key)[col % 4]


def test_forward_and_backward_use_the_same_independent_mask():
    """y and every gradient equal the float64 formula with the scalar reference mask (torch plan)."""
    torch.manual_seed(0)
    n, d_in, d_out, r, p = 6, 10, 7, 3, 0.5
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    a = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    y = adapted_linear(x, weight, None, a, b, dropout=p, dropout_seed=31, backend="torch")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    mask = mask_scalar(n, d_in, p, 31)
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    ref = leaves[0] @ weight.t() + (leaves[0] * mask) @ leaves[1].t() @ leaves[2].t()
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # an inverted mask (kept <-> dropped) gives another output
    inverted = leaves[0] @ weight.t() + (leaves[0] * (1 / (1 - p) - mask)) @ leaves[1].t() @ leaves[2].t()
    assert (y - inverted).abs().max() > 1e-3


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreter_on()) or triton_backend() is None,
                    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
def test_triton_kernel_draws_the_same_mask():
    from fastlora.kernels.triton.dropout import dropout_mask as kernel_mask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed, p in ((3, 0.25), (-(2**62), 0.6)):
        expected = mask_scalar(19, 70, p, seed)
        got = kernel_mask(19, 70, p, seed, device).cpu()
        assert torch.equal(got != 0, expected != 0)
        assert torch.equal(got[got != 0], torch.full_like(got[got != 0], 1 / (1 - p)))
    rows = torch.tensor([2**31 + 1, 2**32 - 2])
    got = kernel_mask(2, 12, 0.5, 8, device, rows=rows).cpu()
    want = (random_words(seed_tensor(8, "cpu"), rows, torch.arange(12)) >> 1) >= 2**30
    assert torch.equal(got != 0, want)
    # an entry whose draw equals the threshold is kept, as in the torch draw
    p = p_at_the_draw_of(1234, 3, 6)
    got = kernel_mask(5, 9, p, 1234, device).cpu()
    assert got[3, 6] != 0 and torch.equal(got != 0, mask_scalar(5, 9, p, 1234) != 0)

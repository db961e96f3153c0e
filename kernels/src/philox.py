"""The dropout mask of every execution plan: counter-based Philox4x32-10, in torch ops.

Entry (n, k) of an (N, d_in) input draws from one Philox4x32-10 block keyed by the
64-bit seed (key = (seed_lo, seed_hi)) at counter (k // 4, n, 0, 0); the block's four
32-bit words serve the four columns 4 * (k // 4) + lane, lane = 0..3. The entry is kept
when ``word >> 1 >= round(p * 2^31)`` (keep rate 1 - p to within 2^-31) and then scaled by
1 / (1 - p). Rows and column groups are separate 32-bit counters, so no offset product can
overflow: up to 2^32 rows of up to 2^34 columns. The Triton kernels draw the same words
with ``tl.philox`` (``triton/dropout.py``); this module is the torch path's mask where the
kernels run too (``masks.py``) and the tests' reference. The seed is a 1-element int64 tensor
on the input's device: drawing, storing and using it never reads a value on the host (no sync,
CUDA-graph capturable).

Unsigned 32-bit words live in int64 tensors; a 32 x 32-bit product fits 64 bits, and
torch's int64 multiply wraps modulo 2^64, so the high and low halves come out exact.
"""
from __future__ import annotations

import torch
from torch import Tensor

_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85      # Philox4x32 key increments (Weyl sequence)
_LOW32 = 0xFFFFFFFF
ROUNDS = 10


def _mulhilo(multiplier: int, word: Tensor) -> tuple[Tensor, Tensor]:
    product = word * multiplier  # < 2^64 as unsigned; wraps in int64 with the same bits
    return (product >> 32) & _LOW32, product & _LOW32


def philox4x32(counters: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor],
               rounds: int = ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` of broadcastable int64 tensors holding unsigned 32-bit words."""
    c0, c1, c2, c3 = counters
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _LOW32, (k1 + _KEY_B) & _LOW32
    return c0, c1, c2, c3


def keep_threshold(p: float) -> int:
    """Entries whose 31-bit draw is below this are dropped: round(p * 2^31)."""
    return round(p * 2**31)


def random_words(seed: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The 32-bit Philox word (as int64) of each entry (rows[i], cols[j]): shape (len(rows), len(cols))."""
    seed = seed.reshape(()).to(torch.int64)
    key = (seed & _LOW32, (seed >> 32) & _LOW32)
    rows = rows.to(torch.int64)[:, None]
    groups = cols.to(torch.int64)[None, :] // 4
    zero = torch.zeros((), dtype=torch.int64, device=rows.device)
    words = philox4x32((groups, rows, zero, zero), key)
    lane = (cols.to(torch.int64) % 4)[None, :]
    out = words[3]
    for index in (2, 1, 0):
        out = torch.where(lane == index, words[index], out)
    return out


def philox_mask(n: int, d_in: int, p: float, seed: Tensor, dtype=torch.float32) -> Tensor:
    """The kernels' dropout mask (n, d_in) on the seed's device: 1/(1-p) where kept, 0 where dropped."""
    rows = torch.arange(n, device=seed.device)
    cols = torch.arange(d_in, device=seed.device)
    keep = (random_words(seed, rows, cols) >> 1) >= keep_threshold(p)
    return keep.to(dtype) / (1.0 - p)


def seed_tensor(seed, device) -> Tensor:
    """An int seed as a (1,) int64 tensor on ``device`` (a fill kernel, no host-to-device copy)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"dropout_seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"dropout_seed must fit in 64 bits, got {seed}")
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def draw_seed(device) -> Tensor:
    """A fresh (1,) int64 seed drawn on ``device`` by torch's generator: no host read, and a
    CUDA graph replays the draw with torch's advancing Philox offset (a new mask per replay)."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)

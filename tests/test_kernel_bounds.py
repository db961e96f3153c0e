"""Every Triton kernel at every launch configuration it can be given, bounds-checked, against float64.

Under the interpreter each launch runs inside ``bounds_check.bounds_checked``: every masked-in lane of every
load and store must address an element of one of the launch's tensor arguments. The configurations are
forced (``kernel_tiles``): every tile a GPU may use (the autotuned kernels' tiles whether or not their prune
keeps them, and every block pair ``skinny_blocks`` picks on a GPU), the interpreter's, and small unequal
ones, so a kernel that swaps two block sizes shows. Shapes follow the tiles: M, N, K are primes past one and
a half (N: two and a half) tiles, so the last tile is partial after full ones (and a persistent run ends in a
partial tile); single rows; ranks 5, 12 and 67 (past 64: R_PAD 128); factors gathered by index; dropout on.
Values and partial sums are fp32, ``||out - ref|| / ||ref|| < 1e-5`` against float64 on the same rounded
inputs; every ``torch.empty`` is NaN-filled so an unwritten output shows.
"""
import inspect
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastlora.kernels import dropout_mask, neat_projection_reference  # noqa: E402
from fastlora.kernels.triton import fused_linear, neat_kernels, onepass_backward, onepass_forward, skinny  # noqa: E402
from fastlora.kernels.triton import shrink as shrink_module  # noqa: E402
from fastlora.kernels.triton.dropout import dropout_mask as kernel_dropout_mask  # noqa: E402

import bounds_check  # noqa: E402
import kernel_tiles  # noqa: E402
from utils import assert_close, poison_empty  # noqa: E402

F64 = torch.float64
TOL = 1e-5
SEED = torch.tensor([4321], dtype=torch.int64)
SKINNY = kernel_tiles.skinny_tiles()
GEMM = kernel_tiles.gemm_tiles()
PERSISTENT = kernel_tiles.persistent_tiles()


@pytest.fixture
def checked(monkeypatch):
    """Bounds checking on and torch.empty NaN-filled for the test; yields the ``bounds_check.Report``."""
    reason = bounds_check.unavailable()
    if reason is not None:
        pytest.skip(reason)
    poison_empty(monkeypatch)
    with bounds_check.bounds_checked() as report:
        yield report


def prime_at_least(n: int) -> int:
    return next(p for p in range(max(n, 2), 2 * n + 3) if all(p % d for d in range(2, math.isqrt(p) + 1)))


def past(tiles: float, block: int) -> int:
    """A prime number of rows or columns past ``tiles`` blocks (never a multiple of a power-of-two block)."""
    return prime_at_least(int(tiles * block) + 1)


class Draw:
    """Seeded float64 draws, rounded to fp32: ``draw(n, k, s=...)`` (N(0, s^2)), ``draw.index(high, r)``."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, s: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.generator, dtype=F64) * s).float().double()

    def index(self, high: int, r: int) -> torch.Tensor:
        return torch.randint(0, high, (r,), generator=self.generator)


def f32(tensor):
    return None if tensor is None else tensor.float()


def strided(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 as a view whose last dimension has stride 2 (rows of a matrix: stride 2 * columns)."""
    return torch.stack([t.float(), t.float() + 1], dim=-1)[..., 0]


def mask_of(rows: int, cols: int, p: float) -> torch.Tensor:
    return dropout_mask(rows, cols, p, SEED, dtype=F64) if p else torch.ones(rows, cols, dtype=F64)


# --------------------------------------------------------------------------- skinny kernels


def check_shrink(n, d_in, r, *, p=0.0, gathered=False, seed=0):
    """t = dropout_p(x) F^T (n, r) fp32 with F = A (r, d_in) or the rows a_index of a (2 r + 3, d_in) matrix."""
    draw = Draw(seed)
    x, a = draw(n, d_in), draw(2 * r + 3 if gathered else r, d_in, s=d_in ** -0.5)
    index = draw.index(a.shape[0], r) if gathered else None
    t = shrink_module.shrink(strided(x), f32(a), index, p, SEED)
    f = a[index] if gathered else a
    assert_close(t, (x * mask_of(n, d_in, p)) @ f.t(), TOL, "shrink t")


def check_dy_pass(n, d_out, r, *, gathered=False, seed=1):
    """dP = dy F^T, dB = s g dy^T v, dbias = sum dy of dy (n, d_out), F = B^T (r, d_out) or gathered rows."""
    draw = Draw(seed)
    dy, b = draw(n, d_out), draw(r + 7 if gathered else r, d_out, s=r ** -0.5)
    v, gate = draw(n, r), torch.tensor(0.6)
    index = draw.index(b.shape[0], r) if gathered else None
    dp, db, dbias = skinny.dy_pass(f32(dy), f32(b), index, None if gathered else f32(v), True, v_scale=0.7,
                                   gate=None if gathered else gate)
    f = b[index] if gathered else b
    assert_close(dp, dy @ f.t(), TOL, "dy pass dP")
    assert_close(dbias, dy.sum(0), TOL, "dy pass dbias")
    if gathered:
        assert db is None
    else:
        assert_close(db, 0.7 * 0.6 * dy.t() @ v, TOL, "dy pass dB")


def check_down_grad(n, d_in, r, *, p, seed=2):
    """dA = s g dt^T dropout_p(x) (r, d_in) for dt (n, r) fp32 and x (n, d_in) a transposed view."""
    draw = Draw(seed)
    dt, x, gate = draw(n, r), draw(n, d_in), torch.tensor(0.6)
    da = skinny.down_grad(f32(dt), x.float().t().contiguous().t(), p, SEED, dt_scale=0.7, gate=gate)
    assert_close(da, 0.7 * 0.6 * dt.t() @ (x * mask_of(n, d_in, p)), TOL, "down_grad dA")


def check_neat(d_out, d_in, r, act="gelu", seed=3):
    """NEAT's Z = W^T A_n^T, H = act(Z) (d_in, r) and dA_n = (W (dH ⊙ act'(Z)))^T (r, d_out)."""
    draw = Draw(seed)
    weight, a_n, dh = draw(d_out, d_in, s=d_out ** -0.5), draw(r, d_out), draw(d_in, r)
    h, z = neat_kernels.neat_forward(f32(weight), f32(a_n), act)
    a_ref = a_n.clone().requires_grad_()
    h_ref = neat_projection_reference(weight, a_ref, act)
    (da_ref,) = torch.autograd.grad(h_ref, a_ref, dh)
    assert_close(z, weight.t() @ a_n.t(), TOL, "NEAT Z")
    assert_close(h, h_ref, TOL, "NEAT H")
    assert_close(neat_kernels.neat_backward(f32(dh), f32(weight), z, act), da_ref, TOL, "NEAT dA_n")


SKINNY_KERNELS = {"_shrink_kernel", "_dy_columns_kernel", "_down_grad_kernel", "_neat_forward_kernel",
                  "_neat_backward_kernel"}


@pytest.mark.parametrize("blocks", SKINNY, ids=kernel_tiles.tile_id)
def test_skinny_kernels(blocks, checked, monkeypatch):
    """Shrink (strided x, dropout, r = 67; gathered, one row), the dy pass (dP from the column pass with dB,
    dbias and a device gate; dP from the shrink, gathered, r = 67), dA (dropout, transposed x) and NEAT's
    projection, with rows and columns past 1.5 and 2.5 blocks; the split reductions' partial sums included."""
    kernel_tiles.force_skinny(monkeypatch, blocks)
    n, d_in, d_out = past(1.5, blocks["BLOCK_M"]), past(1.5, blocks["BLOCK_K"]), past(2.5, blocks["BLOCK_K"])
    one_pass = [skinny.one_pass_is_cheaper(torch.empty(n, d_out), r, skinny.column_blocks(d_out, r, torch.float32))
                for r in (5, 67)]
    assert one_pass == [True, False], "both ways of forming dP"
    check_shrink(n, d_in, 67, p=0.3)
    check_shrink(1, d_in, 5, gathered=True)
    check_dy_pass(n, d_out, 5)
    check_dy_pass(n, d_out, 67, gathered=True)
    check_down_grad(n, d_in, 67, p=0.3)
    check_neat(d_out, n, 12)
    assert SKINNY_KERNELS <= set(checked.launches), sorted(checked.launches)


def test_dropout_mask_kernel(checked):
    """The mask kernel (fixed 16 x 64 blocks) on one row and on odd shapes, against the torch Philox mask."""
    for n, d_in in ((1, 5), (37, 67), (130, 129)):
        mask, ref = kernel_dropout_mask(n, d_in, 0.3, SEED, "cpu"), dropout_mask(n, d_in, 0.3, SEED, dtype=F64)
        assert torch.equal(mask == 0, ref == 0) and 0 < int((ref == 0).sum()) < ref.numel()
        assert_close(mask, ref, TOL, "dropout mask")
    assert checked.launches["_keep_kernel"] == 3


# --------------------------------------------------------------------------- fused GEMM


@pytest.mark.parametrize("blocks", GEMM, ids=kernel_tiles.tile_id)
def test_fused_linear(blocks, checked, monkeypatch):
    """out = X Wkn + bias + drop(s g v U) at one tile: the forward (X, W^T a view, a strided bias, r = 67, device gate),
    the input gradient (one row, W as stored, U gathered by index, dropout) and the expand alone with a bias
    (the output the cuBLAS plan's GEMM accumulates into); M, N, K past 1.5 tiles."""
    kernel_tiles.force_gemm(monkeypatch, blocks)
    m, n, k = (past(1.5, blocks[name]) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    draw = Draw(4)
    gate = torch.tensor(0.6)

    x, w, bias, v, b = draw(m, k), draw(n, k, s=k ** -0.5), draw(n), draw(m, 67), draw(n, 67, s=67 ** -0.5)
    out = fused_linear.fused_linear(f32(x), f32(w).t(), strided(bias), f32(v), f32(b).t(), v_scale=0.7, gate=gate)
    assert_close(out, x @ w.t() + bias + 0.42 * v @ b.t(), TOL, "forward")

    dy, w, dt, u = draw(1, k), draw(k, n, s=k ** -0.5), draw(1, 5), draw(9, n)
    index = draw.index(9, 5)
    out = fused_linear.fused_linear(f32(dy), f32(w), None, f32(dt), f32(u), index, v_scale=0.7, p=0.3, seed=SEED)
    assert_close(out, dy @ w + 0.7 * (dt @ u[index]) * mask_of(1, n, 0.3), TOL, "input gradient")

    bias, v, u = draw(n), draw(m, 5), draw(5, n)
    out = fused_linear.fused_linear(None, None, strided(bias), f32(v), f32(u), v_scale=0.7, gate=gate,
                                    out_dtype=torch.float32)
    assert_close(out, bias + 0.42 * v @ u, TOL, "expand alone")
    assert checked.launches["_fused_linear_kernel"] == 3


# --------------------------------------------------------------------------- one-pass kernels


def check_onepass_forward(m, n, k, r, *, gathered, groups, p, seed=5):
    """y = x W^T + bias + s g ((xd A^T) M^T ⊙ m) B^T and t = xd A^T of the persistent forward kernel.

    Factors: A, B, M, m, a device gate, x and the bias strided views; gathered: A = W[I], B = W[:, J], M, a host
    gate."""
    draw = Draw(seed)
    x, w, middle = draw(m, k), draw(n, k, s=k ** -0.5), draw(r, r, s=r ** -0.5)
    if gathered:
        a_index, b_index = draw.index(n, r), draw.index(k, r)
        a, b, rank_weights, bias, gate = w[a_index], w[:, b_index], None, None, None
        a_arg, b_arg = f32(w), f32(w).t()
    else:
        a_index = b_index = None
        a, b, rank_weights, bias = draw(r, k, s=k ** -0.5), draw(n, r, s=r ** -0.5), draw(r) + 2.0, draw(n)
        gate = torch.tensor(0.6)
        a_arg, b_arg = f32(a), f32(b).t()
    t_ref = (x * mask_of(m, k, p)) @ a.t()
    v_ref = (t_ref @ middle.t()) * (rank_weights if rank_weights is not None else 1.0)
    y_ref = x @ w.t() + 0.7 * 0.6 * v_ref @ b.t() + (bias if bias is not None else 0.0)
    y, t = onepass_forward.onepass_forward(
        f32(x) if gathered else strided(x), f32(w).t(), None if gathered else strided(bias), a_arg, a_index, b_arg,
        b_index, f32(middle), f32(rank_weights), v_scale=0.7 if gate is not None else 0.42, gate=gate, p=p,
        seed=SEED, groups=groups)
    assert_close(y, y_ref, TOL, "one-pass forward y")
    assert_close(t, t_ref, TOL, "one-pass forward t")


def check_onepass_input_grad(m, n, k, r, *, gathered, groups, p, seed=6):
    """dx = dy W + drop(s g ((dy B ⊙ m) M) A), dP = dy B, dB = s g dy^T v, dbias = sum dy of the persistent
    input-gradient kernel. Factors: A, B, M, m, v (dB), a device gate, dbias; gathered: A = W[I], B = W[:, J],
    dy a strided view, a host gate, dbias, no dB."""
    draw = Draw(seed)
    dy, w, middle, rank_weights = draw(m, k), draw(k, n, s=k ** -0.5), draw(r, r, s=r ** -0.5), draw(r) + 2.0
    if gathered:
        a_index, b_index = draw.index(k, r), draw.index(n, r)
        a, b, v, gate = w[a_index], w[:, b_index], None, None
        f_arg, a_arg = f32(w).t(), f32(w)
    else:
        a_index = b_index = None
        a, b, v, gate = draw(r, n, s=n ** -0.5), draw(k, r, s=r ** -0.5), draw(m, r), torch.tensor(0.6)
        f_arg, a_arg = f32(b).t(), f32(a)
    dp_ref = dy @ b
    dx_ref = dy @ w + 0.42 * ((dp_ref * rank_weights) @ middle @ a) * mask_of(m, n, p)
    dx, dp, db, dbias = onepass_backward.onepass_input_grad(
        strided(dy) if gathered else f32(dy), f32(w), f_arg, b_index, a_arg, a_index, f32(middle),
        f32(rank_weights), f32(v), True, v_scale=0.42 if gate is None else 0.7, gate=gate, p=p, seed=SEED,
        db_dtype=torch.float32, dbias_dtype=torch.float32, groups=groups)
    assert_close(dx, dx_ref, TOL, "one-pass input gradient dx")
    assert_close(dp, dp_ref, TOL, "one-pass input gradient dP")
    assert_close(dbias, dy.sum(0), TOL, "one-pass input gradient dbias")
    if gathered:
        assert db is None
    else:
        assert_close(db, 0.42 * dy.t() @ v, TOL, "one-pass input gradient dB")


@pytest.mark.parametrize("blocks", PERSISTENT, ids=kernel_tiles.tile_id)
def test_onepass_kernels(blocks, checked, monkeypatch):
    """Both persistent kernels at one tile (the input gradient's partials at its BLOCK_M): M and K past 1.5
    tiles, N past 2.5 (three column tiles, the last partial): two programs per row block (runs of 2 and 1)
    with every factor, r = 12 and dropout; the default grid (one run of 3 here) gathered with r = 67 and,
    for the input gradient, dropout and a strided dy; one row."""
    kernel_tiles.force_persistent(monkeypatch, blocks)
    m, n, k = past(1.5, blocks["BLOCK_M"]), past(2.5, blocks["BLOCK_N"]), past(1.5, blocks["BLOCK_K"])
    check_onepass_forward(m, n, k, 12, gathered=False, groups=2, p=0.3)
    check_onepass_forward(m, n, k, 67, gathered=True, groups=None, p=0.0)
    check_onepass_forward(1, n, k, 5, gathered=False, groups=None, p=0.3)
    check_onepass_input_grad(m, n, k, 12, gathered=False, groups=2, p=0.3)
    check_onepass_input_grad(m, n, k, 67, gathered=True, groups=None, p=0.3)
    check_onepass_input_grad(1, n, k, 5, gathered=False, groups=None, p=0.0)
    assert checked.launches["_onepass_forward_kernel"] == 3 and checked.launches["_onepass_input_grad_kernel"] == 3


# --------------------------------------------------------------------------- the checker and the tile sweep


@triton.jit
def _tile(ptr, rows, cols, M, N, stride, ROW_MASK: tl.constexpr):
    """The (rows, cols) tile of a (M, N) matrix; without ROW_MASK the rows past M are not masked out."""
    if ROW_MASK:
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < N))
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=cols[None, :] < N)


@triton.jit
def _scale_rows(x_ptr, out_ptr, M, N, stride_x, LOAD_ROW_MASK: tl.constexpr, STORE_ROW_MASK: tl.constexpr,
                BLOCK: tl.constexpr):
    """out = 2 x for x (M, N) with row stride stride_x and out (M, N) contiguous; grid (cdiv(M, BLOCK),)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    tile = _tile(x_ptr, rows, cols, M, N, stride_x, LOAD_ROW_MASK)
    ok = (rows[:, None] < M) & (cols[None, :] < N) if STORE_ROW_MASK else cols[None, :] < N
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], 2.0 * tile, mask=ok)


@pytest.mark.parametrize("broken,argument", [("load", "x_ptr"), ("store", "out_ptr")])
def test_a_dropped_row_mask_is_caught(broken, argument, checked):
    """A kernel whose load (in a nested jit function) or store drops its row mask: the masked version passes
    and gives 2 x; the broken one raises OutOfBounds naming the kernel, the argument and rows past M."""
    x = Draw(7)(21, 14).float()[:, :13]  # (21, 13) view of row stride 14: its span ends at element 20 * 14 + 13
    out = torch.empty(21, 13)
    _scale_rows[(2,)](x, out, 21, 13, 14, LOAD_ROW_MASK=True, STORE_ROW_MASK=True, BLOCK=16)
    assert torch.equal(out, 2 * x)
    assert checked.lanes["_scale_rows"] == 2 * 21 * 13
    with pytest.raises(bounds_check.OutOfBounds) as caught:
        _scale_rows[(2,)](x, out, 21, 13, 14, LOAD_ROW_MASK=broken != "load", STORE_ROW_MASK=broken != "store",
                          BLOCK=16)
    message = str(caught.value)
    assert message.startswith(f"{broken} out of bounds in kernel _scale_rows, program (1, 0, 0)"), message
    stride = 14 if broken == "load" else 13
    assert f"nearest argument {argument} " in message and f"min {21 * stride}," in message, message


def test_an_empty_tensor_admits_no_access(checked):
    """A tensor of no elements has an empty span: any lane addressing it is out of bounds."""
    with pytest.raises(bounds_check.OutOfBounds, match="nearest argument x_ptr"):
        _scale_rows[(1,)](torch.empty(0, 4), torch.empty(2, 4), 2, 4, 4, LOAD_ROW_MASK=True, STORE_ROW_MASK=True,
                          BLOCK=16)


def test_a_changed_interpreter_is_reported_not_hooked(monkeypatch):
    """Where the interpreter's internals differ (another Triton), ``unavailable`` names what it misses."""
    from triton.runtime import interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", lambda self, ptrs, mask, value: None)
    reason = bounds_check.unavailable()
    assert reason is not None and "no interpreter_builder.create_masked_store(ptrs, value, mask, ...)" in reason
    with pytest.raises(RuntimeError, match="cannot hook Triton"), bounds_check.bounds_checked():
        pass


def test_shrink_rows_counted_in_column_blocks_are_caught_at_gpu_tiles(checked, monkeypatch):
    """A mutant shrink that counts its row blocks with BLOCK_K: invisible at the interpreter's equal 16 x 16
    blocks, caught at the GPU's 64 x 128 (rows past the first 64 are never written)."""
    source = inspect.getsource(shrink_module.shrink)
    line = 'm_blocks = cdiv(m, cfg["BLOCK_M"])'
    assert source.count(line) == 1, "the shrink's row-block count moved: update the mutant"
    mutant = {}  # defined with the module's own globals: it sees the blocks forced below
    exec(compile(source.replace(line, line.replace("BLOCK_M", "BLOCK_K")), shrink_module.__file__, "exec"),
         vars(shrink_module), mutant)
    monkeypatch.setattr(shrink_module, "shrink", mutant["shrink"])
    gpu = {"BLOCK_M": 64, "BLOCK_K": 128}
    assert gpu in SKINNY
    for blocks, caught in (({"BLOCK_M": 16, "BLOCK_K": 16}, False), (gpu, True)):
        kernel_tiles.force_skinny(monkeypatch, blocks)
        n, d_in = past(1.5, blocks["BLOCK_M"]), past(1.5, blocks["BLOCK_K"])
        if caught:
            with pytest.raises(AssertionError, match="non-finite"):
                check_shrink(n, d_in, 5)
        else:
            check_shrink(n, d_in, 5)

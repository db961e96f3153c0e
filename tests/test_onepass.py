"""The "onepass" plan (kernels/src/triton/onepass*.py) against the float64 reference, values and every gradient.

Under the Triton interpreter on CPU (fp32, fp16; bf16 on a GPU only): odd shapes that cross the
16-wide interpreter tiles, ranks that are not powers of two, strided x, every optional factor,
gathered factors (CURLoRA), dropout (the reference uses the mask of every plan), a host or a
device gate, gate 0; the persistent forward with runs of every length up to ``COLUMN_RUN`` column
tiles per program. The other plans' code paths are made to fail where the one-pass kernels
must run, and every ``torch.empty`` is NaN-filled so an unwritten output or partial shows up.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from fastlora.kernels import adapted_linear_reference, dropout_mask  # noqa: E402
from fastlora.kernels.dispatch import plan_implementation  # noqa: E402
from fastlora.kernels.function import AdaptedLinearFunction  # noqa: E402

from utils import poison_empty, rel  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 needs a GPU: the Triton interpreter gives wrong bf16 arithmetic, dot and stores"))]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
NAMES = ("x", "bias", "a", "b", "middle", "rank_weights", "gate")
TENSORS = ("x", "weight", "bias", "a", "b", "middle", "rank_weights")


@pytest.fixture(scope="module")
def impl(triton_impl):
    return triton_impl


@pytest.fixture(scope="module")
def onepass(impl):
    from fastlora.kernels.triton import onepass
    return onepass


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch, impl):
    """torch.empty / empty_like return NaN-filled floating tensors for the test's duration."""
    poison_empty(monkeypatch)


@pytest.fixture
def one_pass_only(monkeypatch, impl, onepass):
    """The fused plan's base GEMM and dy pass fail if called: the one-pass kernels must do that work."""
    def fail(*args, **kwargs):
        raise AssertionError("a two-pass kernel ran on the onepass plan")
    monkeypatch.setattr(impl, "fused_linear", fail)
    monkeypatch.setattr(impl, "dy_pass", fail)


def make_case(dtype, n=37, d_in=53, d_out=29, r=5, *, bias=True, middle=False, rank_weights=False,
              gathered=False, seed=0):
    """Random, never-zero inputs (B random, not zero), scaled to O(1) outputs, in float64."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype).to(F64)

    case = dict(x=rnd(n, d_in), weight=rnd(d_out, d_in, s=1 / math.sqrt(d_in)), bias=rnd(d_out) if bias else None,
                a=None if gathered else rnd(r, d_in, s=1 / math.sqrt(d_in)),
                b=None if gathered else rnd(d_out, r, s=1 / math.sqrt(r)),
                middle=rnd(r, r, s=1 / math.sqrt(r)) if middle else None,
                rank_weights=(0.5 + rnd(r).abs()) * rnd(r).sign() if rank_weights else None)
    if gathered:
        case["row_index"] = torch.randint(0, d_out, (r,), generator=g)
        case["col_index"] = torch.randint(0, d_in, (r,), generator=g)
    return case


def run(case, dtype, *, plan="onepass", gate=1.0, device_gate=False, gate_grad=True, dropout=0.0,
        x_layout=None, needs=NAMES):
    """Outputs and gradients {name: tensor} of ``plan`` in ``dtype`` (float64 inputs: the reference).

    device_gate: the gate is a tensor whose value the op does not read on the host (as under
    torch.compile); x_layout "transposed" or "strided": x is a non-contiguous view.
    """
    ref = dtype == F64
    leaves = {k: v.to(DEVICE, dtype).requires_grad_(k in needs) for k, v in case.items()
              if k in TENSORS and v is not None}
    g = torch.tensor(gate, device=DEVICE, dtype=dtype if ref else torch.float32, requires_grad=gate_grad)
    x = leaves["x"]
    if x_layout == "transposed":
        x = x.t().contiguous().t()
    elif x_layout == "strided":
        x = torch.stack([x, x.detach() + 1], dim=2)[:, :, 0]
    assert x_layout is None or not x.is_contiguous()
    index = {k: case[k].to(DEVICE) if k in case else None for k in ("row_index", "col_index")}
    seed = torch.tensor([4321], dtype=torch.int64, device=DEVICE)
    if ref:
        mask = dropout_mask(x.shape[0], x.shape[1], dropout, seed, DEVICE, F64) if dropout else None
        y = adapted_linear_reference(x, leaves["weight"], leaves.get("bias"), leaves.get("a"), leaves.get("b"),
                                     middle=leaves.get("middle"), rank_weights=leaves.get("rank_weights"), gate=g,
                                     scale=0.7, dropout_mask=mask, **index)
    else:
        y = AdaptedLinearFunction.apply(
            x, leaves["weight"], leaves.get("bias"), leaves.get("a"), leaves.get("b"), leaves.get("middle"),
            leaves.get("rank_weights"), g if device_gate or gate_grad else None, index["row_index"],
            index["col_index"], seed if dropout else None, 0.7, None if device_gate else gate, dropout, plan)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=F64).to(DEVICE, dtype)
    wrt = {k: v for k, v in leaves.items() if v.requires_grad}
    if gate_grad:
        wrt["gate"] = g
    grads = torch.autograd.grad(y, list(wrt.values()), dy)
    return y, dict(zip(wrt, grads))


def gate_scale(case, **kwargs):
    """sum |dy ⊙ s v B^T|: the size of the terms of dg = sum(dy ⊙ s v B^T), whose sum may cancel."""
    kwargs.update(device_gate=False, gate_grad=False)
    (y1, _), (y0, _) = (run(case, F64, **{**kwargs, "gate": g}) for g in (1.0, 0.0))
    dy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(9), dtype=F64).to(DEVICE)
    return float((dy * (y1 - y0)).abs().sum().detach())


def check(case, dtype, **kwargs):
    """The plan in ``dtype`` against float64: relative error below TOL (for the scalar gate gradient,
    relative to the size of its terms), exact zeros where the reference is 0."""
    y, grads = run(case, dtype, **kwargs)
    y_ref, grads_ref = run(case, F64, **kwargs)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel(y, y_ref) < TOL[dtype], "output"
    assert sorted(grads) == sorted(grads_ref)
    for name, want in grads_ref.items():
        got = grads[name]
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        if torch.count_nonzero(want) == 0:
            assert torch.count_nonzero(got) == 0, f"grad of {name} is not zero"
        elif name == "gate":
            assert abs(float(got) - float(want)) < TOL[dtype] * gate_scale(case, **kwargs), "grad of gate"
        else:
            assert rel(got, want) < TOL[dtype], f"grad of {name}: {rel(got, want)}"
    return y, grads


CASES = {
    "lora": dict(),
    "middle_rank_weights": dict(case=dict(r=7, middle=True, rank_weights=True)),
    "gathered_middle": dict(case=dict(r=6, gathered=True, middle=True)),
    "dropout": dict(case=dict(middle=True, rank_weights=True), dropout=0.3),
    "gathered_dropout_no_bias": dict(case=dict(r=3, gathered=True, middle=True, bias=False), dropout=0.2),
    "device_gate": dict(case=dict(rank_weights=True), gate=0.6, device_gate=True, dropout=0.1),
    "transposed_x": dict(case=dict(n=53, d_in=37), x_layout="transposed", dropout=0.2),
    "strided_x": dict(case=dict(middle=True), x_layout="strided"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_float64(name, dtype, one_pass_only):
    spec = dict(CASES[name])
    check(make_case(dtype, **spec.pop("case", {})), dtype, **spec)


@pytest.mark.parametrize("n,d_in,d_out,r", [(1, 16, 16, 1), (70, 33, 45, 17), (19, 8, 3, 2), (40, 70, 150, 12)])
def test_odd_shapes(n, d_in, d_out, r, one_pass_only):
    case = make_case(torch.float32, n, d_in, d_out, r, rank_weights=True, middle=r > 2)
    check(case, torch.float32, dropout=0.1)


@pytest.mark.parametrize("in_kernel", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_db_from_row_block_partials_or_one_gemm(in_kernel, dtype, monkeypatch, onepass, one_pass_only):
    """dB (and the gate's device value in it) either from the input-gradient kernel's partials or from dy^T v."""
    decided = []

    def decide(dy, r):
        decided.append(r)
        return in_kernel

    monkeypatch.setattr(onepass, "db_partials_are_cheaper", decide)
    check(make_case(dtype, n=45, r=9, rank_weights=True), dtype, gate=0.8, device_gate=True)
    assert decided == [9]


def test_db_partials_are_chosen_by_bytes(onepass):
    from fastlora.kernels.triton.onepass_backward import db_partials_are_cheaper
    from fastlora.kernels.triton.onepass_tiles import BACKWARD_BLOCK_M
    n = 64 * BACKWARD_BLOCK_M
    dy = torch.empty(n, 10, dtype=torch.float16)  # partials 2 * 64 * r * 4 bytes a column, dy n * 2
    assert db_partials_are_cheaper(dy, BACKWARD_BLOCK_M // 4)
    assert not db_partials_are_cheaper(dy, BACKWARD_BLOCK_M // 4 + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gate_off_with_gate_grad(dtype, monkeypatch, onepass):
    """Host gate 0: the base GEMM alone (no one-pass kernel); the gate gets s * sum(dP ⊙ v), factors exact zeros."""
    def fail(*args, **kwargs):
        raise AssertionError("a one-pass kernel ran with the gate off")
    monkeypatch.setattr(onepass, "onepass_forward", fail)
    monkeypatch.setattr(onepass, "onepass_input_grad", fail)
    case = make_case(dtype, rank_weights=True, middle=True)
    y, grads = check(case, dtype, gate=0.0)
    assert torch.count_nonzero(grads["gate"]) == 1
    base = torch.nn.functional.linear(*(case[k].to(DEVICE, dtype) for k in ("x", "weight", "bias")))
    assert torch.equal(y, base)


def test_device_gate_zero_runs_the_kernels_and_zeroes_the_factors(one_pass_only):
    """A device gate of 0 is unknown on the host: the kernels run, multiplied by it."""
    check(make_case(torch.float32, middle=True), torch.float32, gate=0.0, device_gate=True)


def test_only_some_gradients(one_pass_only):
    check(make_case(torch.float32, middle=True), torch.float32, needs=("x",), gate_grad=False)


def test_factor_gradients_without_input_gradient_use_the_fused_plan():
    check(make_case(torch.float32, rank_weights=True), torch.float32, needs=("a", "b", "rank_weights"), dropout=0.2)


def test_backward_is_deterministic():
    case = make_case(torch.float32, n=70, r=3, rank_weights=True)
    first, second = (run(case, torch.float32, dropout=0.2)[1] for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_forward_keeps_t_and_matches_the_fused_plan(impl):
    """t = xd A^T (N, r) fp32 from the first column tile's programs, as the fused plan's shrink gives it."""
    case = make_case(torch.float32, n=33, d_out=40, r=5, middle=True)
    plans = {name: plan_implementation(name) for name in ("onepass", "triton")}
    from fastlora.kernels.spec import LowRankTerm
    seed = torch.tensor([7], dtype=torch.int64)
    term = LowRankTerm(case["a"].float(), case["b"].float(), case["middle"].float(), None, None, None, 0.5, 1.0,
                       0.25, seed)
    (y1, t1), (y2, t2) = (plans[k].forward(case["x"].float(), case["weight"].float(), case["bias"].float(), term,
                                           False) for k in ("onepass", "triton"))
    assert t1.dtype == torch.float32 and t1.shape == (33, 5)
    assert rel(t1, t2) < 1e-6 and rel(y1, y2) < 1e-6


@pytest.mark.parametrize("n_out,groups,features", [
    (80, 1, "factors"), (80, 3, "gathered"), (80, 5, "factors"), (120, 1, "gathered"), (120, 3, "factors"),
    (7, None, "gathered")])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_persistent_forward_runs(n_out, groups, features, dtype, onepass):
    """y and t of the persistent forward kernel against float64 for several programs per row block:
    with the interpreter's 16-wide tiles, N = 80 gives one run of 5, runs of 2, 2 and 1, or 1 tile each;
    N = 120 (the last tile partial) one run of 8 or runs of 3, 3 and 2; 50 rows end in a partial row block.
    "factors": A, B, M, m, a device gate, dropout and a bias; "gathered": A = W[I], B = W[:, J]
    (CURLoRA) with M and a host gate, no bias, x a strided view."""
    from fastlora.kernels.triton.onepass_forward import onepass_forward
    g = torch.Generator().manual_seed(3)
    m, k, r, p, scale = 50, 40, 5, (0.25 if features == "factors" else 0.0), 0.7

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype).to(F64)

    x, w = rnd(m, k), rnd(n_out, k, s=k ** -0.5)
    middle, gate = rnd(r, r, s=r ** -0.5), torch.tensor(0.6, dtype=F64)
    seed = torch.tensor([11], dtype=torch.int64)
    if features == "factors":
        a, b, a_index, b_index = rnd(r, k, s=k ** -0.5), rnd(n_out, r, s=r ** -0.5), None, None
        rank_weights, bias = rnd(r).abs() + 0.5, rnd(n_out)
        a_ref, b_ref = a, b
    else:
        a_index, b_index = torch.randint(0, n_out, (r,), generator=g), torch.randint(0, k, (r,), generator=g)
        a, b, rank_weights, bias = None, None, None, None
        a_ref, b_ref = w[a_index], w[:, b_index]
    mask = dropout_mask(m, k, p, seed, dtype=F64) if p else torch.ones(m, k, dtype=F64)
    t_ref = (x * mask) @ a_ref.t()
    v_ref = t_ref @ middle.t() * (rank_weights if rank_weights is not None else 1.0)
    y_ref = x @ w.t() + scale * float(gate) * v_ref @ b_ref.t() + (bias if bias is not None else 0.0)

    def dev(tensor):
        return None if tensor is None else tensor.to(DEVICE, dtype)

    xd = dev(x) if features == "factors" else torch.stack([dev(x), dev(x) + 1], dim=2)[:, :, 0]
    wd = dev(w)
    y, t = onepass_forward(
        xd, wd.t(), dev(bias), dev(a) if a is not None else wd, a_index, dev(b).t() if b is not None else wd.t(),
        b_index, dev(middle), dev(rank_weights), v_scale=scale * (1.0 if features == "factors" else float(gate)),
        gate=gate.to(DEVICE, torch.float32) if features == "factors" else None, p=p, seed=seed.to(DEVICE),
        groups=groups)
    assert y.dtype == dtype and t.dtype == torch.float32 and t.shape == (m, r)
    assert rel(y, y_ref) < TOL[dtype] and rel(t, t_ref) < TOL[dtype]


@pytest.mark.parametrize("n_in,groups,runs,features", [
    (64, 1, [4], "factors"), (80, 2, [3, 2], "gathered"), (120, None, [4, 4], "bias"), (120, 3, [3, 3, 2], "factors"),
    (48, 2, [2, 1], "bias"), (40, None, [3], "gathered"), (80, 5, [1] * 5, "factors"), (7, None, [1], "bias")])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_persistent_input_grad_runs(n_in, groups, runs, features, dtype, onepass):
    """dx, dP, dB and dbias of the persistent input-gradient kernel against float64 for runs of 1 to 4
    column tiles of dx (16 wide under the interpreter; N = 40, 7 and 120 end in a partial tile) and a
    partial last run; 50 rows give three full row blocks and a partial one, each with its own dB and
    dbias partials. "factors": A, B, M, m, a device gate, dropout, dB and dbias; "gathered":
    A = W[I], B = W[:, J] (CURLoRA) with M, a host gate and dy a strided view, neither dB nor dbias;
    "bias": A, B, m, a host gate, W a transposed view, dbias without dB."""
    from fastlora.kernels.triton.launch_config import INTERPRETED
    from fastlora.kernels.triton.onepass_backward import onepass_input_grad
    from fastlora.kernels.triton.onepass_tiles import BACKWARD_BLOCK_M, column_groups
    g = torch.Generator().manual_seed(5)
    m, k, r, scale, gate = 50, 40, 5, 0.7, 0.6
    p = 0.25 if features == "factors" else 0.0
    if INTERPRETED:
        columns = -(-n_in // 16)
        programs = column_groups(-(-m // BACKWARD_BLOCK_M), columns, DEVICE, groups)
        run = -(-columns // programs)
        assert BACKWARD_BLOCK_M == 16 and [min(run, columns - i * run) for i in range(programs)] == runs

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype).to(F64)

    dy, w, v = rnd(m, k), rnd(k, n_in, s=k ** -0.5), torch.randn(m, r, generator=g, dtype=F64)
    middle = rnd(r, r, s=r ** -0.5) if features != "bias" else None
    rank_weights = rnd(r).abs() + 0.5 if features != "gathered" else None
    seed = torch.tensor([13], dtype=torch.int64)
    if features == "gathered":
        a_index, b_index = torch.randint(0, k, (r,), generator=g), torch.randint(0, n_in, (r,), generator=g)
        a_ref, b_ref = w[a_index], w[:, b_index]
    else:
        a_index, b_index = None, None
        a_ref, b_ref = rnd(r, n_in, s=n_in ** -0.5), rnd(k, r, s=r ** -0.5)
    dp_ref = dy @ b_ref
    dt = dp_ref * rank_weights if rank_weights is not None else dp_ref
    dt = dt @ middle if middle is not None else dt
    mask = dropout_mask(m, n_in, p, seed, dtype=F64) if p else 1.0
    dx_ref = dy @ w + scale * gate * (dt @ a_ref) * mask
    db_ref, dbias_ref = scale * gate * dy.t() @ v, dy.sum(0)

    def dev(tensor):
        return None if tensor is None else tensor.to(DEVICE, dtype)

    dyd, wd = dev(dy), dev(w)
    if features == "gathered":
        dyd = torch.stack([dyd, dyd + 1], dim=2)[:, :, 0]
    if features == "bias":
        wd = wd.t().contiguous().t()
    device_gate = features == "factors"
    dx, dp, db, dbias = onepass_input_grad(
        dyd, wd, wd.t() if b_index is not None else dev(b_ref).t(), b_index, wd if a_index is not None else dev(a_ref),
        a_index, dev(middle), dev(rank_weights), v.to(DEVICE, torch.float32) if features == "factors" else None,
        features != "gathered", v_scale=scale * (1.0 if device_gate else gate),
        gate=torch.tensor(gate, device=DEVICE) if device_gate else None, p=p, seed=seed.to(DEVICE),
        db_dtype=dtype, dbias_dtype=dtype, groups=groups)
    assert dx.dtype == dtype and dp.dtype == torch.float32 and dp.shape == (m, r)
    assert rel(dx, dx_ref) < TOL[dtype] and rel(dp, dp_ref) < TOL[dtype]
    assert (db is None) == (features != "factors") and (dbias is None) == (features == "gathered")
    if db is not None:
        assert db.dtype == dtype and rel(db, db_ref) < TOL[dtype]
    if dbias is not None:
        assert dbias.dtype == dtype and rel(dbias, dbias_ref) < TOL[dtype]


def test_column_groups_keep_runs_short_and_non_empty(monkeypatch, onepass):
    """Programs per row block: by default enough for every SM (132 here) and runs of at most COLUMN_RUN
    tiles; a wanted count is kept but for the cap at one tile each; no program is without a tile, and
    the kernel's runs of cdiv(C, G) tiles cover the C column tiles."""
    from types import SimpleNamespace

    from fastlora.kernels.triton.onepass_tiles import COLUMN_RUN, column_groups
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert COLUMN_RUN == 4
    assert column_groups(64, 16, cuda) == 4  # N = 8192 tokens, 4096 outputs, 128x256 tiles: runs of 4
    assert column_groups(64, 43, cuda) == 11  # 11008 outputs: ten runs of 4 and one of 3
    assert column_groups(32, 32, cuda) == 8  # 256x128 tiles: 5 programs per row block fill 132 SMs; runs of 4
    assert column_groups(2, 16, cuda) == 16  # few rows: one tile per program
    assert column_groups(4, 5, torch.device("cpu")) == 2 and column_groups(4, 5, cuda, wanted=3) == 3
    assert column_groups(64, 16, cuda, wanted=1) == 1 and column_groups(64, 16, cuda, wanted=10**6) == 16
    for tiles in range(1, 40):
        for wanted in (None, *range(1, 45)):
            groups = column_groups(1 + tiles % 7, tiles, cuda, wanted=wanted)
            run = -(-tiles // groups)
            assert (groups - 1) * run < tiles <= groups * run
            assert run <= (COLUMN_RUN if wanted is None else -(-tiles // min(wanted, tiles)))


def test_tiles_fit_registers_and_shared_memory(monkeypatch, onepass):
    from types import SimpleNamespace

    from fastlora.kernels.triton import launch_config, onepass_tiles
    monkeypatch.setattr(launch_config, "INTERPRETED", False)
    monkeypatch.setattr(launch_config, "shared_memory_limit", lambda index: 227 * 1024)
    x = SimpleNamespace(element_size=lambda: 2, is_cuda=True, device=SimpleNamespace(index=0))
    configs = launch_config.gemm_configs()
    backward = onepass_tiles.backward_configs(128)
    assert backward and all(c.kwargs["BLOCK_M"] == 128 for c in backward)
    for r_pad, compute_db in ((16, False), (64, False), (64, True)):
        for listed in (configs, backward):
            kept = onepass_tiles.prune_onepass_configs(listed, {"x_ptr": x, "M_BUCKET": 8192}, R_PAD=r_pad,
                                                       COMPUTE_DB=compute_db)
            assert kept
            for c in kept:
                bm, bn, bk = (c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                assert c.num_stages * (bm + bn + r_pad) * bk * 2 <= 227 * 1024
                assert bm * bn + (1 + compute_db) * bm * r_pad <= launch_config.ACCUMULATOR_REGISTERS * 32 * c.num_warps
    wide = onepass_tiles.prune_onepass_configs(configs, {"x_ptr": x, "M_BUCKET": 8192}, R_PAD=16)
    assert any(c.kwargs["BLOCK_N"] == 256 for c in wide)


def test_input_gradient_tiles_with_dropout_budget_a_second_output_tile(monkeypatch):
    """With dropout the input gradient's dt A is masked before it joins dy W (two fp32 output tiles; 128x256
    on 8 warps spilled ~2 KB compiled for sm_90): those tiles are dropped; the forward's dropout (on the
    shrink input only) keeps one output tile."""
    from types import SimpleNamespace

    from fastlora.kernels.triton import launch_config, onepass_tiles
    monkeypatch.setattr(launch_config, "INTERPRETED", False)
    monkeypatch.setattr(launch_config, "shared_memory_limit", lambda index: 227 * 1024)
    dev = SimpleNamespace(element_size=lambda: 2, is_cuda=True, device=SimpleNamespace(index=0))
    backward = onepass_tiles.backward_configs(128)

    def prune(name, dropout):
        return onepass_tiles.prune_onepass_configs(backward, {name: dev, "M_BUCKET": 8192}, R_PAD=16,
                                                   COMPUTE_DB=True, DROPOUT=dropout)

    budget = launch_config.ACCUMULATOR_REGISTERS * 32
    masked = prune("dy_ptr", True)
    assert masked and all(2 * 128 * c.kwargs["BLOCK_N"] + 2 * 128 * 16 <= budget * c.num_warps for c in masked)
    assert not any(c.kwargs["BLOCK_N"] == 256 for c in masked)
    assert any(c.kwargs["BLOCK_N"] == 256 for c in prune("dy_ptr", False))
    assert any(c.kwargs["BLOCK_N"] == 256 for c in prune("x_ptr", True))

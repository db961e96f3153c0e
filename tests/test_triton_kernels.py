"""The Triton path of the compute layer against the float64 reference, values and gradients.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
read by ``@triton.jit`` when fastlora's kernel modules are imported), with small shapes.
``||out - ref|| / ||ref||`` < 1e-5 for fp32 and < 1e-2 for fp16/bf16; the reference runs on
float64 copies of the same (rounded) inputs. bf16 runs on CUDA only: the interpreter computes
bf16 arithmetic, dots and stores wrongly. Every ``torch.empty`` during a test is NaN-filled, so
an output or partial-sum entry a kernel forgets to write shows up.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from fastlora.kernels import (  # noqa: E402
    ACTIVATIONS,
    adapted_linear,
    adapted_linear_reference,
    dropout_mask,  # noqa: E402
    neat_projection,
    neat_projection_reference,
)
from fastlora.kernels.dispatch import select_plan  # noqa: E402
from fastlora.kernels.spec import LowRankTerm  # noqa: E402

from utils import poison_empty, rel  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not CUDA, reason="bf16 needs a GPU: the Triton interpreter gives wrong bf16 arithmetic, dot and stores")),
]


@pytest.fixture(scope="module")
def impl(triton_impl):
    return triton_impl


PLAN = {"name": "triton"}


@pytest.fixture(autouse=True, params=["triton", "cublas"])
def plan(request):
    """Every test runs on both Triton plans: fused base GEMMs, and cuBLAS base GEMMs + Triton low-rank kernels."""
    PLAN["name"] = request.param
    return request.param


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch, impl):
    """torch.empty / empty_like return NaN-filled floating tensors for the test's duration."""
    poison_empty(monkeypatch)


def make_inputs(dtype, n=37, d_in=53, d_out=29, r=5, *, bias=True, middle=False, rank_weights=False,
                seed=0):
    """Random, never-zero inputs (B random, not PEFT's zero init), scaled to O(1) outputs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(device=DEVICE, dtype=dtype)

    return dict(
        x=rnd(n, d_in),
        weight=rnd(d_out, d_in, s=1.0 / math.sqrt(d_in)),
        bias=rnd(d_out) if bias else None,
        lora_a=rnd(r, d_in, s=1.0 / math.sqrt(d_in)),
        lora_b=rnd(d_out, r, s=1.0 / math.sqrt(r)),
        middle=rnd(r, r, s=1.0 / math.sqrt(r)) if middle else None,
        rank_weights=(0.5 + rnd(r).abs()) * rnd(r).sign() if rank_weights else None,
    )


def run_both(inputs, requires, *, x_view=None, gate=1.0, gate_grad=False, **kwargs):
    """adapted_linear(backend=<the test's plan>) and the float64 reference on the same inputs.

    requires: input names that need a gradient; x_view maps the x leaf to the x passed in
    (non-contiguous or 3-D views); gate_grad: the gate is a 0-dim tensor that needs grad.
    Returns ((y, grads), (y_ref, grads_ref)), grads keyed by name (plus "gate").
    """
    x_view = x_view or (lambda t: t)
    dy = None
    results = []
    for dtype in (None, F64):
        leaves = {k: (v if dtype is None else v.to(dtype)) for k, v in inputs.items() if v is not None}
        leaves = {k: v.detach().clone().requires_grad_(k in requires) for k, v in leaves.items()}
        args = {k: leaves.get(k) for k in ("x", "weight", "bias", "lora_a", "lora_b")}
        extra = {k: leaves[k] for k in ("middle", "rank_weights") if k in leaves}
        g = torch.tensor(gate, device=DEVICE, dtype=F64 if dtype else torch.float32, requires_grad=gate_grad)
        g = g if gate_grad else gate
        x = x_view(args.pop("x"))
        if dtype is None:
            y = adapted_linear(x, *args.values(), gate=g, backend=PLAN["name"], **extra, **kwargs)
        else:
            ref_kwargs = dict(kwargs)
            p, seed = ref_kwargs.pop("dropout", 0.0), ref_kwargs.pop("dropout_seed", None)
            if p > 0.0:
                mask = dropout_mask(x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1], p, seed, DEVICE, F64)
                ref_kwargs["dropout_mask"] = mask.reshape(x.shape)
            y = adapted_linear_reference(x, *args.values(), gate=g, **extra, **ref_kwargs)
        if dy is None:
            gen = torch.Generator().manual_seed(99)
            dy = torch.randn(y.shape, generator=gen, dtype=F64).to(DEVICE)
        names = [k for k in requires if k in leaves]
        wrt = [leaves[k] for k in names] + ([g] if gate_grad else [])
        grads = torch.autograd.grad(y, wrt, dy.to(y.dtype)) if wrt else ()
        results.append((y, dict(zip(names + (["gate"] if gate_grad else []), grads))))
    return results


def check(results, dtype, expect, zero=()):
    """Output and the gradients named in ``expect`` within tolerance; those in ``zero`` exactly 0."""
    (y, grads), (y_ref, grads_ref) = results
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel(y, y_ref) < tol, "output"
    assert sorted(grads) == sorted(list(expect) + list(zero))
    for name in expect:
        assert grads[name].shape == grads_ref[name].shape, name
        assert rel(grads[name], grads_ref[name]) < tol, f"grad of {name}: {rel(grads[name], grads_ref[name])}"
    for name in zero:
        assert grads[name].shape == grads_ref[name].shape and torch.count_nonzero(grads_ref[name]) == 0
        assert torch.count_nonzero(grads[name]) == 0, f"grad of {name} is not zero"


LORA_GRADS = ["x", "bias", "lora_a", "lora_b"]


# --------------------------------------------------------------------------- adapted linear


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_lora(dtype):
    inputs = make_inputs(dtype)
    check(run_both(inputs, LORA_GRADS, scale=0.7), dtype, LORA_GRADS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_middle_and_rank_weights(dtype):
    inputs = make_inputs(dtype, r=7, middle=True, rank_weights=True)
    names = LORA_GRADS + ["middle", "rank_weights"]
    check(run_both(inputs, names, scale=1.3), dtype, names)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_on_with_gate_grad(dtype):
    inputs = make_inputs(dtype, middle=True, rank_weights=True)
    check(run_both(inputs, LORA_GRADS, gate=1.0, gate_grad=True, scale=0.5), dtype, LORA_GRADS + ["gate"])


def _forbid(monkeypatch, impl, *names):
    """Make the named kernel launchers of the Triton backend fail if called."""
    def fail(*args, **kwargs):
        raise AssertionError("low-rank kernel launched with the gate off")
    for name in names:
        monkeypatch.setattr(impl, name, fail)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_off_with_gate_grad(dtype, impl, monkeypatch):
    """Only the shrink (t) and the dy pass (dP) run; the gate gets s*sum(dP ⊙ v), factors zeros."""
    _forbid(monkeypatch, impl, "fused_linear", "down_grad")
    inputs = make_inputs(dtype, rank_weights=True)
    results = run_both(inputs, LORA_GRADS + ["rank_weights"], gate=0.0, gate_grad=True, scale=0.5)
    check(results, dtype, ["x", "bias", "gate"], zero=["lora_a", "lora_b", "rank_weights"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_off_without_gate_grad(dtype, impl, monkeypatch):
    """No low-rank launch at all; y is F.linear exactly; needed factors get zero gradients (not None)."""
    _forbid(monkeypatch, impl, "fused_linear", "down_grad", "dy_pass", "shrink")
    inputs = make_inputs(dtype, middle=True)
    results = run_both(inputs, LORA_GRADS + ["middle"], gate=0.0)
    check(results, dtype, ["x", "bias"], zero=["lora_a", "lora_b", "middle"])
    base = torch.nn.functional.linear(inputs["x"], inputs["weight"], inputs["bias"])
    assert torch.equal(results[0][0], base)


@pytest.mark.parametrize("repeat", [1, 3])  # r = 6 and 18: dP in the single dy pass, or by the shrink kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_curlora_gather_by_index(dtype, repeat, monkeypatch):
    """A = W[I], B = W[:, J] read by index in the kernels; the gathered copies are never built."""
    def no_copy(self, weight):
        raise AssertionError("W[I] / W[:, J] materialised")
    monkeypatch.setattr(LowRankTerm, "down", no_copy)
    monkeypatch.setattr(LowRankTerm, "up", no_copy)
    inputs = make_inputs(dtype, r=6 * repeat, middle=True)
    inputs["lora_a"] = inputs["lora_b"] = None
    rows = torch.tensor([3, 0, 28, 3, 11, 7] * repeat, device=DEVICE)
    cols = torch.tensor([52, 1, 4, 4, 30, 0] * repeat, device=DEVICE)
    names = ["x", "bias", "middle"]
    check(run_both(inputs, names, row_index=rows, col_index=cols), dtype, names)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_with_triton_mask(dtype):
    inputs = make_inputs(dtype, middle=True)
    names = LORA_GRADS + ["middle"]
    check(run_both(inputs, names, dropout=0.3, dropout_seed=1234, scale=0.8), dtype, names)


def test_dropout_mask_values(impl):
    mask = impl.dropout_mask(64, 40, 0.25, 7, DEVICE)
    assert mask.shape == (64, 40) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1.0 / 0.75).item()}
    assert 0.15 < float((mask == 0).float().mean()) < 0.35
    assert torch.equal(mask, impl.dropout_mask(64, 40, 0.25, 7, DEVICE))
    assert not torch.equal(mask, impl.dropout_mask(64, 40, 0.25, 8, DEVICE))
    # entry (n, k) depends on n * d_in + k only: a prefix of rows is the same mask
    assert torch.equal(mask[:10], impl.dropout_mask(10, 40, 0.25, 7, DEVICE))


@pytest.mark.parametrize("n,d_in,d_out,r", [(1, 16, 16, 1), (70, 33, 45, 17), (19, 8, 3, 2)])
def test_odd_shapes(n, d_in, d_out, r):
    inputs = make_inputs(torch.float32, n, d_in, d_out, r, rank_weights=True)
    names = LORA_GRADS + ["rank_weights"]
    check(run_both(inputs, names, dropout=0.1, dropout_seed=5), torch.float32, names)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_x(dtype):
    inputs = make_inputs(dtype, n=53, d_in=37)
    inputs["x"] = inputs["x"].t().contiguous()  # leaf (37, 53): x = leaf.t() has strides (1, 53)
    check(run_both(inputs, LORA_GRADS, x_view=lambda t: t.t(), dropout=0.2, dropout_seed=3), dtype,
          LORA_GRADS)


def test_strided_x_columns():
    inputs = make_inputs(torch.float32, d_in=2 * 53)
    inputs["lora_a"] = inputs["lora_a"][:, ::2].contiguous()
    inputs["weight"] = inputs["weight"][:, ::2].contiguous()
    check(run_both(inputs, LORA_GRADS, x_view=lambda t: t[:, ::2]), torch.float32, LORA_GRADS)


def test_strided_weight_bias_factors_and_indices():
    """Transposed weight storage and strided bias, factors and index vectors, used as given."""
    g = torch.Generator().manual_seed(4)
    d_in, d_out, r = 37, 29, 5

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(DEVICE, torch.float32)

    x, weight, bias, middle = rnd(23, d_in), rnd(d_in, d_out).t(), rnd(2 * d_out)[::2], rnd(r, r)
    factors = dict(lora_a=rnd(d_in, r).t(), lora_b=rnd(d_out, 2 * r)[:, ::2])
    gathered = dict(lora_a=None, lora_b=None, row_index=torch.arange(2 * r, device=DEVICE)[::2] * 3,
                    col_index=torch.arange(2 * r, device=DEVICE)[1::2] * 2)
    for kwargs in (factors, gathered):
        y = adapted_linear(x, weight, bias, middle=middle, scale=0.5, backend="triton", **kwargs)
        kwargs64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in kwargs.items()}
        ref = adapted_linear_reference(x.double(), weight.double(), bias.double(), middle=middle.double(),
                                       scale=0.5, **kwargs64)
        assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_x(dtype):
    inputs = make_inputs(dtype, n=2 * 9)
    inputs["x"] = inputs["x"].reshape(2, 9, -1)
    check(run_both(inputs, LORA_GRADS, dropout=0.25, dropout_seed=11), dtype, LORA_GRADS)


def test_backward_is_deterministic():
    inputs = make_inputs(torch.float32, n=70, r=9, rank_weights=True)
    names = LORA_GRADS + ["rank_weights"]
    first = run_both(inputs, names, dropout=0.2, dropout_seed=2)[0][1]
    second = run_both(inputs, names, dropout=0.2, dropout_seed=2)[0][1]
    for name in names:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("r,one_pass", [(2, True), (12, False)])
def test_partial_sums_stay_small(r, one_pass, monkeypatch, impl):
    """Split reductions keep small partials: either a handful of splits (bounded by the programs
    that fill the device), or, for dP from the single pass over dy, one (N, r) slice per column
    block only while those cost fewer bytes than reading dy again (never hundreds of MB as one
    slice per block at r = 64, N = 8192, d_out = 11008 would be). Both paths are exact."""
    from fastlora.kernels.triton.launch_config import target_programs
    from fastlora.kernels.triton.skinny import column_blocks, one_pass_is_cheaper
    n, d_out = 40, 150
    dy_bytes = n * d_out * 4
    assert one_pass_is_cheaper(torch.empty(n, d_out), r, column_blocks(d_out, r, torch.float32)) == one_pass
    shapes = []
    empty = torch.empty

    def recording_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        if out.dim() == 3:
            shapes.append(tuple(out.shape))
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", recording_empty)
    inputs = make_inputs(torch.float32, n=n, d_in=70, d_out=d_out, r=r)
    check(run_both(inputs, LORA_GRADS, scale=0.7), torch.float32, LORA_GRADS)
    assert shapes
    for shape in shapes:
        assert shape[0] <= target_programs(DEVICE) or 2 * math.prod(shape) * 4 <= dy_bytes, shape
    assert any(shape[0] > target_programs(DEVICE) for shape in shapes) == one_pass


@pytest.mark.parametrize("by", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skinny_products_by_either(by, dtype, monkeypatch, impl):
    """The skinny products a GEMM of torch's could form, formed by the Triton kernels or by torch.mm
    (``products``): where one pass over dy is not the cheaper (r = 12 at d_out = 150) dP and dB, and without
    dropout the shrink and dA, give the reference's values and gradients either way; with dropout, the
    shrink and dA stay on their kernels (the mask) while the dy pass follows the choice; a trainable bias
    keeps the column pass (which sums it)."""
    from fastlora.kernels.triton import products, shrink, skinny
    monkeypatch.setattr(products, "DY_TWICE", by)
    monkeypatch.setattr(products, "UNMASKED", by)
    mm_calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args: mm_calls.append(args[0].shape) or mm(*args))
    launches = []
    for module, name in ((shrink, "_shrink_kernel"), (skinny, "_dy_columns_kernel"), (skinny, "_down_grad_kernel")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, _Counted(kernel, name, launches))
    inputs = make_inputs(dtype, n=40, d_in=70, d_out=150, r=12)
    names = ["x", "lora_a", "lora_b"]
    check(run_both(inputs, names, scale=0.7), dtype, names)
    if by == "cublas":
        assert launches == [] and len(mm_calls) == 4, (launches, mm_calls)  # shrink, dP, dB, dA
    else:
        assert launches == ["_shrink_kernel", "_shrink_kernel", "_dy_columns_kernel", "_down_grad_kernel"]
        assert mm_calls == []
    launches.clear()
    check(run_both(inputs, names, scale=0.7, dropout=0.2, dropout_seed=3), dtype, names)
    masked = ["_shrink_kernel", "_down_grad_kernel"]
    assert sorted(launches) == sorted(masked if by == "cublas" else masked + ["_shrink_kernel", "_dy_columns_kernel"])
    launches.clear()
    check(run_both(inputs, LORA_GRADS, scale=0.7), dtype, LORA_GRADS)
    assert "_dy_columns_kernel" in launches


class _Counted:
    """A Triton kernel whose launches (``kernel[grid](...)``) are recorded by name, then run."""

    def __init__(self, kernel, name: str, launches: list) -> None:
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


def test_products_by_gemms_with_a_device_gate(monkeypatch, impl):
    """By torch's GEMMs (``products`` set to "cublas"), g a 0-dim device tensor (as under torch.compile):
    dP = dy F^T and dB = s g dy^T v, dB in the factor's dtype (fp16 here: factors stored in another dtype
    than dy's); dA = s g dt^T x in its factor's dtype; the shrink of fp16 x by an fp32 factor, in fp32."""
    from fastlora.kernels.triton import products, shrink, skinny
    monkeypatch.setattr(products, "DY_TWICE", "cublas")
    monkeypatch.setattr(products, "UNMASKED", "cublas")
    g = torch.Generator().manual_seed(5)
    dy, f, v, x = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((40, 150), (12, 150), (40, 12), (40, 70)))
    gate = torch.tensor(0.6, device=DEVICE)
    dp, db, dbias = skinny.dy_pass(dy.float().to(DEVICE), f.float().to(DEVICE), None, v.float().to(DEVICE), False,
                                   v_scale=0.7, gate=gate, db_dtype=torch.float16)
    assert dbias is None and dp.dtype == torch.float32 and db.dtype == torch.float16
    assert rel(dp, (dy @ f.t()).to(DEVICE)) < 1e-5
    assert rel(db, (0.7 * 0.6 * dy.t() @ v).to(DEVICE)) < 1e-3
    da = skinny.down_grad(v.float().to(DEVICE), x.float().to(DEVICE), dt_scale=0.7, gate=gate, out_dtype=torch.float16)
    assert da.dtype == torch.float16 and rel(da, (0.7 * 0.6 * v.t() @ x).to(DEVICE)) < 1e-3
    t = shrink.shrink(x.half().to(DEVICE), f[:, :70].float().to(DEVICE), None)  # fp32 factor over fp16 x
    assert t.dtype == torch.float32 and rel(t, (x @ f[:, :70].t()).to(DEVICE)) < 1e-2


def test_only_the_input_gradient():
    inputs = make_inputs(torch.float32)
    check(run_both(inputs, ["x"], scale=0.7), torch.float32, ["x"])


@pytest.mark.skipif(not CUDA, reason="backend='auto' picks Triton only for CUDA tensors")
def test_auto_backend_picks_triton_on_cuda(impl):
    x = torch.randn(4, 8, device=DEVICE)
    assert select_plan("auto", x, x.dtype, lambda: "cublas") == "cublas"


# --------------------------------------------------------------------------- NEAT projection


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_neat_projection(act, dtype):
    g = torch.Generator().manual_seed(3)
    d_out, d_in, r = 29, 45, 6
    weight = (torch.randn(d_out, d_in, generator=g, dtype=F64) / math.sqrt(d_out)).to(DEVICE, dtype)
    a_n = (torch.randn(r, d_out, generator=g, dtype=F64)).to(DEVICE, dtype)
    a_n[2] = 0.0  # Z's column 2 is exactly 0, where act'(0) applies (relu'(0) = 0, as torch's autograd has it)
    dh = torch.randn(d_in, r, generator=g, dtype=F64).to(DEVICE)
    a_leaf = a_n.clone().requires_grad_(True)
    h = neat_projection(weight, a_leaf, act, backend="triton")
    (da,) = torch.autograd.grad(h, a_leaf, dh.to(dtype))
    a_ref = a_n.to(F64).requires_grad_(True)
    h_ref = neat_projection_reference(weight.to(F64), a_ref, act)
    (da_ref,) = torch.autograd.grad(h_ref, a_ref, dh)
    assert h.dtype == dtype and h.shape == (d_in, r) and da.shape == (r, d_out)
    assert rel(h, h_ref) < TOL[dtype]
    assert rel(da, da_ref) < TOL[dtype]
    assert rel(da[2], da_ref[2], zero_ref_ok=act == "relu") < TOL[dtype]


def test_neat_forward_returns_preactivation(impl):
    weight = torch.randn(20, 33, device=DEVICE)
    a_n = torch.randn(3, 20, device=DEVICE)
    h, z = impl.FUSED.neat_forward(weight, a_n, "relu")
    z_ref = weight.double().t() @ a_n.double().t()
    assert rel(z, z_ref) < 1e-5
    assert torch.equal(h, torch.relu(z))

"""The custom ops of the compute layer (kernels/src/custom_ops.py) and what they buy under torch.compile.

opcheck: schema, fake (meta) implementation against the real outputs, AOT dispatch, on random
odd shapes in fp32 and float64 (torch backend; fp32 on the Triton backend under the
interpreter). Compile: a LoRA and a CURLoRA AdapterLinear trace with fullgraph=True, 0 graph
breaks, one opaque custom-op node per call in the forward and in the backward graph, and
give the eager outputs and gradients; dropout seeds drawn per call cause no recompilation.
"""
import dataclasses

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import fastlora
from fastlora import AdapterLinear, CurLoraConfig, LoraConfig
from fastlora.kernels import custom_ops, dispatch  # noqa: F401  (registers the ops)

from utils import rel

OPS = torch.ops.fastlora
N, D_IN, D_OUT, R = 7, 13, 11, 3  # odd on purpose
TOLERANCE = 1e-6


def _triton_ready() -> bool:
    impl = dispatch.triton_backend()
    return impl is not None and (torch.cuda.is_available() or impl.INTERPRETER_READY)


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ready(), reason="Triton not installed, or no GPU and not built for TRITON_INTERPRET=1"))]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _fwd_args(dtype, *, gathered=False, bias=True, middle=False, rank_weights=False, dropout=0.0,
              gate=0.7, keep_t=False, backend="torch", seed=0, device_gate=None):
    """The forward op's arguments; device_gate: the gate as a trailing 0-dim tensor (host gate 1)."""
    gen = torch.Generator().manual_seed(seed)
    weight = _rand(D_OUT, D_IN, dtype=dtype, gen=gen)
    a, b, rows, cols = None, None, None, None
    if gathered:
        rows, cols = torch.tensor([5, 0, 9]), torch.tensor([12, 3, 7])
    else:
        a, b = _rand(R, D_IN, dtype=dtype, gen=gen), _rand(D_OUT, R, dtype=dtype, gen=gen)
    return (_rand(N, D_IN, dtype=dtype, gen=gen), weight, _rand(D_OUT, dtype=dtype, gen=gen) if bias else None,
            a, b, _rand(R, R, dtype=dtype, gen=gen) if middle else None,
            _rand(R, dtype=dtype, gen=gen) if rank_weights else None, rows, cols,
            torch.tensor([1234], dtype=torch.int64) if dropout else None,
            1.5, gate if device_gate is None else 1.0, dropout, keep_t, backend,
            *(() if device_gate is None else (torch.tensor(device_gate, dtype=dtype),)))


FWD_CASES = {
    "factors": {},
    "no_bias_middle_weights": dict(bias=False, middle=True, rank_weights=True),
    "gathered": dict(gathered=True),
    "gathered_no_bias": dict(gathered=True, bias=False),  # t read from the base output's columns
    "dropout": dict(dropout=0.3, middle=True),
    "gate_off": dict(gate=0.0),
    "negative_gate": dict(gate=-0.5),  # on: t is formed (the fake states its shape)
    "gate_off_keep_t": dict(gate=0.0, keep_t=True),
    "device_gate": dict(device_gate=0.6, rank_weights=True),
    "device_gate_off": dict(device_gate=0.0, keep_t=True),
}


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


def _cases(backend):
    return [(name, dtype) for name in FWD_CASES for dtype in _dtypes(backend)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_adapted_linear_fwd(backend):
    for name, dtype in _cases(backend):
        args = _fwd_args(dtype, backend=backend, **FWD_CASES[name])
        torch.library.opcheck(OPS.adapted_linear_fwd, args)


#: subsets of (x, bias, a, b, middle, rank_weights, gate) needing a gradient, besides "all"
NEEDS_SUBSETS = ([False, False, True, True, True, True, False], [True] + [False] * 6, [False] * 6 + [True])


def test_eager_calls_run_what_the_ops_run():
    """Eager mode skips the dispatcher (custom_ops calls the op's implementation): same results bitwise."""
    for name in FWD_CASES:
        args = _fwd_args(torch.float64, **FWD_CASES[name])
        for got, ref in zip(custom_ops.adapted_linear_fwd(*args), OPS.adapted_linear_fwd(*args)):
            assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_adapted_linear_bwd(backend):
    """Every case with every gradient, and with one subset; t saved or recomputed, alternately."""
    for i, (name, dtype) in enumerate(_cases(backend)):
        fwd = _fwd_args(dtype, backend=backend, **FWD_CASES[name])
        x, weight, bias, a, b, middle, rank_weights, rows, cols, seed, scale, gate, p = fwd[:13]
        device_gate = fwd[15:]  # () or (gate tensor,)
        _, t = OPS.adapted_linear_fwd(x, weight, bias, a, b, middle, rank_weights, rows, cols, seed,
                                      scale, gate, p, True, backend, *device_gate)
        dy = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        present = [True, bias is not None, a is not None, b is not None, middle is not None,
                   rank_weights is not None, True]
        for mask in ([True] * 7, NEEDS_SUBSETS[i % len(NEEDS_SUBSETS)]):
            needs = [has and wanted for has, wanted in zip(present, mask)]
            args = (dy, x, weight, a, b, middle, rank_weights, rows, cols, t if i % 2 == 0 else None, seed,
                    scale, gate, p, needs, backend, *device_gate)
            torch.library.opcheck(OPS.adapted_linear_bwd, args)
            assert len(OPS.adapted_linear_bwd(*args)) == sum(needs)


@pytest.mark.skipif(not _triton_ready(), reason="Triton not installed, or no GPU and not built for TRITON_INTERPRET=1")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck_cublas_with_fp32_factors_over_fp16(dropout):
    """The cublas plan takes factors of another float dtype than x (fp32 over fp16) uncast: the fakes state
    its outputs (the factors' gradients in fp32), forward and backward."""
    fwd = list(_fwd_args(torch.float16, backend="cublas", middle=True, rank_weights=True, dropout=dropout))
    fwd[3:7] = [f.float() for f in fwd[3:7]]  # a, b, middle, rank_weights
    torch.library.opcheck(OPS.adapted_linear_fwd, tuple(fwd))
    x, weight, bias, a, b, middle, rank_weights, rows, cols, seed, scale, gate, p = fwd[:13]
    _, t = OPS.adapted_linear_fwd(*fwd[:13], True, "cublas")
    dy = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1), dtype=torch.float64).half()
    args = (dy, x, weight, a, b, middle, rank_weights, rows, cols, t, seed, scale, gate, p, [True] * 7, "cublas")
    torch.library.opcheck(OPS.adapted_linear_bwd, args)
    grads = OPS.adapted_linear_bwd(*args)
    assert [g.dtype for g in grads[2:6]] == [torch.float32] * 4 and grads[0].dtype == torch.float16


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("cublas", marks=BACKENDS[1].marks)])
def test_t_and_the_gate_gradient_come_in_the_plans_dtype(backend):
    """t = xd A^T and the gate's gradient: in x's dtype on the torch plan, fp32 on the Triton plans (their
    kernels accumulate in fp32 and the backward reads t as it is). A negative gate is on: t is formed."""
    fwd = _fwd_args(torch.float16, backend=backend, gate=-0.5)
    want = torch.float16 if backend == "torch" else torch.float32
    _, t = custom_ops.adapted_linear_fwd(*fwd)
    assert t.shape == (N, R) and t.dtype == want
    dy = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(1)).half()
    x, weight, bias, a, b, middle, rank_weights, rows, cols, seed, scale, gate, p = fwd[:13]
    needs = [False] * 6 + [True]  # the gate's gradient alone
    (grad_gate,) = custom_ops.adapted_linear_bwd(dy, x, weight, a, b, middle, rank_weights, rows, cols, t, seed,
                                                 scale, gate, p, needs, backend)
    assert grad_gate.shape == () and grad_gate.dtype == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "gelu", "identity"])
def test_opcheck_neat(backend, act):
    for dtype in _dtypes(backend):
        gen = torch.Generator().manual_seed(2)
        weight, a_n = _rand(D_OUT, D_IN, dtype=dtype, gen=gen), _rand(R, D_OUT, dtype=dtype, gen=gen)
        torch.library.opcheck(OPS.neat_fwd, (weight, a_n, act, backend))
        _, z = OPS.neat_fwd(weight, a_n, act, backend)
        torch.library.opcheck(OPS.neat_bwd, (_rand(D_IN, R, dtype=dtype, gen=gen), weight, z, act, backend))


class _Recorder:
    """A torch.compile backend (AOTAutograd, then eager) that keeps each graph's fastlora op calls."""

    def __init__(self):
        self.dynamo_graphs = 0
        self.forward_ops, self.backward_ops = [], []

    def _keep(self, calls):
        def compiler(gm, _):
            calls.append([str(n.target) for n in gm.graph.nodes
                          if n.op == "call_function" and str(n.target).startswith("fastlora.")])
            return make_boxed_func(gm)
        return compiler

    def __call__(self, gm, example_inputs):
        self.dynamo_graphs += 1
        return aot_autograd(fw_compiler=self._keep(self.forward_ops),
                            bw_compiler=self._keep(self.backward_ops))(gm, example_inputs)


def _layer(config, backend="torch"):
    torch.manual_seed(0)
    config = dataclasses.replace(config, backend=backend)
    layer = AdapterLinear(D_IN, D_OUT, config=config)
    with torch.no_grad():  # random B instead of the zero init, so every gradient is non-zero
        for param in layer.adapter.parameters():
            param.normal_(0.0, 0.5)
    return layer


def _out_and_grads(layer, call, x, dy):
    x = x.detach().clone().requires_grad_(True)
    for param in layer.parameters():
        param.grad = None
    out = call(x)
    out.backward(dy)
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


CONFIGS = {"lora": LoraConfig(r=R, alpha=4.5), "curlora": CurLoraConfig(r=R, alpha=2.0, seed=5)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_fullgraph_compile_traces_one_op_per_call(method, backend):
    layer = _layer(CONFIGS[method], backend)
    x = torch.randn(2, N, D_IN)  # 3-D: leading dims flattened around the op
    dy = torch.randn(2, N, D_OUT)
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()
    recorder = _Recorder()
    compiled = torch.compile(layer, backend=recorder, fullgraph=True)
    eager = _out_and_grads(layer, layer, x, dy)
    for _ in range(2):  # the second call reuses the compiled graphs
        got = _out_and_grads(layer, compiled, x, dy)
        for g, e in zip(got, eager):
            assert rel(g, e) < TOLERANCE
    assert recorder.dynamo_graphs == 1
    assert recorder.forward_ops == [["fastlora.adapted_linear_fwd.default"]]
    assert recorder.backward_ops == [["fastlora.adapted_linear_bwd.default"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_value", [1.0, 0.0, 0.6])
def test_compiled_tensor_gate_multiplies_on_the_device(gate_value, backend):
    """Under torch.compile a tensor gate is not read on the host (fullgraph, one op node): the
    low-rank term is multiplied by it; output and every gradient (the gate's included) match
    the float64 autograd reference, with exact zeros for A and B when the gate is 0."""
    gen = torch.Generator().manual_seed(3)
    x, weight, bias, a, b, *_ = _fwd_args(torch.float32, backend=backend, seed=3)
    gate = torch.tensor(gate_value)
    dy = torch.randn(N, D_OUT, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, gate)]

    def call(x_, a_, b_, g_):
        return fastlora.kernels.adapted_linear(x_, weight, bias, a_, b_, gate=g_, scale=1.5, backend=backend)

    recorder = _Recorder()
    out = torch.compile(call, backend=recorder, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, a, b, gate)]
    ref = fastlora.kernels.adapted_linear_reference(ref_leaves[0], weight.double(), bias.double(), ref_leaves[1],
                                                    ref_leaves[2], gate=ref_leaves[3], scale=1.5)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert recorder.forward_ops == [["fastlora.adapted_linear_fwd.default"]]
    assert rel(out.detach().double(), ref.detach()) < 1e-5
    for name, got, want in zip(("x", "a", "b", "gate"), grads, ref_grads):
        if gate_value == 0.0 and name in ("a", "b"):
            assert torch.count_nonzero(got) == 0, name
        else:
            assert rel(got.double(), want) < 1e-5, name


def test_dropout_seeds_drawn_in_the_graph_cause_no_recompile():
    """A fresh seed per call: each call's mask differs, one graph serves them all."""
    layer = _layer(LoraConfig(r=R, alpha=4.5, dropout=0.4)).train()
    recorder = _Recorder()
    compiled = torch.compile(layer, backend=recorder, fullgraph=True)
    x = torch.randn(N, D_IN)
    outs = [compiled(x).detach() for _ in range(3)]
    assert recorder.dynamo_graphs == 1 and len(recorder.forward_ops) == 1
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    torch.manual_seed(11)
    got = compiled(x)
    torch.manual_seed(11)
    assert torch.equal(got, layer(x)), "the compiled draw is eager's draw from the same global seed"


def test_neat_projection_compiles_to_its_ops():
    recorder = _Recorder()
    weight = torch.randn(D_OUT, D_IN)
    a_n = torch.randn(R, D_OUT, requires_grad=True)
    fn = torch.compile(lambda a: fastlora.kernels.neat_projection(weight, a, "gelu", backend="torch"),
                       backend=recorder, fullgraph=True)
    dh = torch.randn(D_IN, R)
    (grad,) = torch.autograd.grad(fn(a_n), a_n, dh)
    (ref,) = torch.autograd.grad(fastlora.kernels.neat_projection(weight, a_n, "gelu", backend="torch"), a_n, dh)
    assert rel(grad, ref) < TOLERANCE
    assert recorder.forward_ops == [["fastlora.neat_fwd.default"]]
    assert recorder.backward_ops == [["fastlora.neat_bwd.default"]]


def test_eager_matches_the_reference_through_the_ops():
    """The ops are what eager mode runs: output and gradients against the autograd reference."""
    layer = _layer(CONFIGS["curlora"])
    x, dy = torch.randn(N, D_IN, dtype=torch.float32), torch.randn(N, D_OUT)
    got = _out_and_grads(layer, layer, x, dy)
    ref = _out_and_grads(layer, layer.reference_forward, x, dy)
    for g, e in zip(got, ref):
        assert rel(g, e) < 1e-5

"""Every bad input to the compute layer raises a clear error that names the problem."""
import math

import pytest
import torch

from fastlora.kernels import ACTIVATIONS, adapted_linear, neat_projection

from host_reads import HostReads

D_IN, D_OUT, R = 7, 5, 3
F32 = torch.float32


def good(dtype=F32):
    g = torch.Generator().manual_seed(0)
    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)
    return dict(x=r(4, D_IN), weight=r(D_OUT, D_IN), bias=r(D_OUT), lora_a=r(R, D_IN),
                lora_b=r(D_OUT, R))


def call(overrides=None, **kwargs):
    """adapted_linear on good inputs, with some replaced (``overrides``) and keyword args added."""
    t = good()
    t.update(overrides or {})
    return adapted_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                          **{"backend": "torch", **kwargs})


def test_good_inputs_run():
    assert call().shape == (4, D_OUT)


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("x_shape", [(4, D_IN + 1), (4, D_IN - 1), (D_IN, 4), (2, 3, 1)])
def test_wrong_x_last_dim(x_shape):
    with pytest.raises(ValueError, match=r"x must have last dimension d_in=7"):
        call({"x": torch.randn(x_shape)})


def test_zero_dim_x():
    with pytest.raises(ValueError, match=r"x must have last dimension"):
        call({"x": torch.tensor(1.0)})


def test_weight_not_2d():
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        call({"weight": torch.randn(D_OUT, D_IN, 1)})


@pytest.mark.parametrize("name,shape", [
    ("lora_a", (R, D_IN + 1)), ("lora_a", (D_IN, R)), ("lora_a", (R * D_IN,)),
    ("lora_b", (D_OUT + 1, R)), ("lora_b", (R, D_OUT)), ("lora_b", (D_OUT, R, 1)),
    ("bias", (D_OUT + 1,)), ("bias", (1, D_OUT)),
])
def test_wrong_factor_or_bias_shape(name, shape):
    with pytest.raises(ValueError, match=rf"{name} must have shape"):
        call({name: torch.randn(shape)})


def test_rank_mismatch_between_a_and_b():
    with pytest.raises(ValueError, match=r"lora_b must have shape \(5, 3\), got \(5, 4\)"):
        call({"lora_b": torch.randn(D_OUT, R + 1)})


@pytest.mark.parametrize("shape", [(R, R + 1), (R + 1, R + 1), (R,)])
def test_wrong_middle_shape(shape):
    with pytest.raises(ValueError, match=r"middle must have shape \(3, 3\)"):
        call(middle=torch.randn(shape))


@pytest.mark.parametrize("shape", [(R + 1,), (1, R), (R, R)])
def test_wrong_rank_weights_shape(shape):
    with pytest.raises(ValueError, match=r"rank_weights must have shape \(3,\)"):
        call(rank_weights=torch.randn(shape))


def test_zero_rank():
    with pytest.raises(ValueError, match=r"rank r must be positive"):
        call({"lora_a": torch.randn(0, D_IN), "lora_b": torch.randn(D_OUT, 0)})


# --------------------------------------------------------------------------- dtypes and devices

@pytest.mark.parametrize("name", ["x", "weight", "bias", "lora_a", "lora_b", "middle", "rank_weights"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtype(name, dtype):
    shapes = dict(x=(4, D_IN), weight=(D_OUT, D_IN), bias=(D_OUT,), lora_a=(R, D_IN),
                  lora_b=(D_OUT, R), middle=(R, R), rank_weights=(R,))
    bad = torch.ones(shapes[name], dtype=dtype)
    with pytest.raises(TypeError, match=rf"{name} must be a floating tensor.*{dtype}"):
        if name in ("middle", "rank_weights"):
            call(**{name: bad})
        else:
            call({name: bad})


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_mismatched_x_weight_dtype(x_dtype, w_dtype):
    t = good()
    with pytest.raises(TypeError, match=r"x dtype .* does not match weight dtype"):
        call({"x": t["x"].to(x_dtype), "weight": t["weight"].to(w_dtype)})


def test_mismatched_x_weight_dtype_allowed_under_autocast():
    t = good()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call({"weight": t["weight"].to(torch.bfloat16)})
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["weight", "bias", "lora_a", "lora_b", "middle", "rank_weights"])
def test_tensor_on_meta_device(name):
    shapes = dict(weight=(D_OUT, D_IN), bias=(D_OUT,), lora_a=(R, D_IN), lora_b=(D_OUT, R),
                  middle=(R, R), rank_weights=(R,))
    bad = torch.randn(shapes[name], device="meta")
    with pytest.raises(RuntimeError, match=rf"{name} is on meta but x is on cpu"):
        if name in ("middle", "rank_weights"):
            call(**{name: bad})
        else:
            call({name: bad})


def test_x_on_meta_device():
    with pytest.raises(RuntimeError, match=r"weight is on cpu but x is on meta"):
        call({"x": torch.randn(4, D_IN, device="meta")})


@pytest.mark.parametrize("which", ["row_index", "col_index"])
def test_index_on_meta_device(which):
    over = {"lora_a": None} if which == "row_index" else {"lora_b": None}
    with pytest.raises(RuntimeError, match=rf"{which} is on meta but x is on cpu"):
        call(over, **{which: torch.zeros(R, dtype=torch.long, device="meta")})


def test_weight_requires_grad():
    t = good()
    with pytest.raises(ValueError, match=r"weight \(\d+, \d+\) requires grad: .* frozen base weight .*"
                                         r"model.requires_grad_\(True\)"):
        call({"weight": t["weight"].requires_grad_()})


# --------------------------------------------------------------------------- CURLoRA indices

def test_both_lora_a_and_row_index():
    with pytest.raises(ValueError, match=r"exactly one of lora_a and row_index"):
        call(row_index=torch.tensor([0, 1, 2]))


def test_neither_lora_a_nor_row_index():
    with pytest.raises(ValueError, match=r"exactly one of lora_a and row_index"):
        call({"lora_a": None})


def test_both_lora_b_and_col_index():
    with pytest.raises(ValueError, match=r"exactly one of lora_b and col_index"):
        call(col_index=torch.tensor([0, 1, 2]))


def test_neither_lora_b_nor_col_index():
    with pytest.raises(ValueError, match=r"exactly one of lora_b and col_index"):
        call({"lora_b": None})


@pytest.mark.parametrize("index", [[0, 1, D_OUT], [-1, 0, 1], [0, 100, 2]])
def test_row_index_out_of_range(index):
    with pytest.raises(IndexError, match=rf"row_index values must lie in \[0, {D_OUT}\)"):
        call({"lora_a": None}, row_index=torch.tensor(index))


@pytest.mark.parametrize("index", [[0, 1, D_IN], [-2, 0, 1]])
def test_col_index_out_of_range(index):
    with pytest.raises(IndexError, match=rf"col_index values must lie in \[0, {D_IN}\)"):
        call({"lora_b": None}, col_index=torch.tensor(index))


def test_index_range_is_read_once_and_checked_again_after_a_write():
    """Gathered factors: an index tensor's range is read on the host (a GPU sync) on its first
    use, not on every call, and read again once the tensor is written."""
    rows, cols = torch.tensor([4, 0, 2]), torch.tensor([6, 1, 1])
    gathered = {"lora_a": None, "lora_b": None}
    with HostReads() as first:
        call(gathered, row_index=rows, col_index=cols)
    with HostReads() as again:
        call(gathered, row_index=rows, col_index=cols)
    assert first.count == 4 and again.count == 0
    rows[1] = D_OUT
    with pytest.raises(IndexError, match=rf"row_index values must lie in \[0, {D_OUT}\)"):
        call(gathered, row_index=rows, col_index=cols)


@pytest.mark.parametrize("which", ["row_index", "col_index"])
@pytest.mark.parametrize("bad", [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([[0, 1, 2]]),
                                 torch.tensor([True, False, True]), torch.tensor(1)],
                         ids=["float", "2d", "bool", "0d"])
def test_bad_index_dtype_or_shape(which, bad):
    over = {"lora_a": None} if which == "row_index" else {"lora_b": None}
    with pytest.raises(TypeError, match=rf"{which} must be a 1-D int32/int64 tensor"):
        call(over, **{which: bad})


def test_col_index_rank_mismatch():
    with pytest.raises(ValueError, match=r"col_index must have r=3 entries, got 2"):
        call({"lora_b": None}, col_index=torch.tensor([0, 1]))


def test_row_index_with_wrong_lora_b_rank():
    with pytest.raises(ValueError, match=r"lora_b must have shape \(5, 2\)"):
        call({"lora_a": None}, row_index=torch.tensor([0, 1]))


# --------------------------------------------------------------------------- scalars

@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan])
def test_dropout_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        call(dropout=p, dropout_seed=0)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_non_finite_scale(scale):
    with pytest.raises(ValueError, match=r"scale must be finite"):
        call(scale=scale)


@pytest.mark.parametrize("shape", [(2,), (1, 2), (0,)])
def test_non_scalar_gate(shape):
    with pytest.raises(ValueError, match=r"gate must be a scalar"):
        call(gate=torch.ones(shape))


@pytest.mark.parametrize("gate", [math.nan, math.inf, torch.tensor(math.nan), torch.tensor(-math.inf)],
                         ids=["nan", "inf", "tensor_nan", "tensor_-inf"])
def test_non_finite_gate(gate):
    with pytest.raises(ValueError, match=r"gate must be finite"):
        call(gate=gate)


@pytest.mark.parametrize("gate, match", [("1", "gate must be a float or a 0-dim floating tensor, got str"),
                                         (None, "gate must be a float or a 0-dim floating tensor, got NoneType"),
                                         (torch.tensor(1), "a tensor gate must be floating point .* torch.int64"),
                                         (torch.tensor(True), "a tensor gate must be floating point .* torch.bool")])
def test_a_gate_that_is_not_a_real_number_is_refused(gate, match):
    with pytest.raises(TypeError, match=match):
        call(gate=gate)


def test_gate_value_only_with_a_tensor_gate():
    with pytest.raises(TypeError, match=r"gate_value is the host copy of a tensor gate"):
        call(gate=1.0, gate_value=1.0)


@pytest.mark.parametrize("gate_value", [math.nan, math.inf])
def test_non_finite_gate_value(gate_value):
    with pytest.raises(ValueError, match=r"gate_value must be finite"):
        call(gate=torch.tensor(1.0), gate_value=gate_value)


def test_gate_value_given_as_a_tensor():
    with pytest.raises(TypeError, match=r"gate_value must be a Python float"):
        call(gate=torch.tensor(1.0), gate_value=torch.tensor(1.0))


def test_scale_tensor_requiring_grad_is_refused():
    """scale is a host scalar: a learnable scale would silently get no gradient."""
    with pytest.raises(TypeError, match=r"scale .* gets no gradient"):
        call(scale=torch.tensor(0.5, requires_grad=True))
    assert call(scale=torch.tensor(0.5)).shape == (4, D_OUT)   # a plain tensor value is fine


# --------------------------------------------------------------------------- backends

@pytest.mark.parametrize("backend", ["cuda", "TORCH", "", "Triton"])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be one of"):
        call(backend=backend)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    """Forced Triton on CPU tensors without the interpreter: a clear RuntimeError, never a silent
    fallback and never a crash inside a kernel. Holds whether or not Triton is installed."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton'") as info:
        call(backend="triton")
    message = str(info.value)
    assert "not installed" in message or ("CUDA" in message and "TRITON_INTERPRET" in message), message


def test_triton_backend_on_cpu_neat_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = good()
    with pytest.raises(RuntimeError, match=r"backend='triton'"):
        neat_projection(t["weight"], torch.randn(R, D_OUT), "relu", backend="triton")


# --------------------------------------------------------------------------- NEAT

@pytest.mark.parametrize("shape", [(R, D_OUT + 1), (R, D_IN), (D_OUT, R), (D_OUT,), (1, R, D_OUT), (R, D_OUT, 1)])
def test_neat_a_n_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"a_n must have shape \(r, d_out=5\)"):
        neat_projection(good()["weight"], torch.randn(shape), "relu", backend="torch")


@pytest.mark.parametrize("weight_shape", [(D_OUT,), (D_OUT, 2, D_IN)], ids=["1d", "3d"])
def test_neat_weight_not_2d(weight_shape):
    """A weight that is not 2-D has no d_out to name: the message says '?' and both shapes."""
    weight = torch.randn(weight_shape)
    with pytest.raises(ValueError, match=rf"a_n must have shape \(r, d_out=\?\), got \({R}, {D_OUT}\) for weight "
                                         rf"\({', '.join(map(str, weight_shape))},?\)"):
        neat_projection(weight, torch.randn(R, D_OUT), "relu", backend="torch")


@pytest.mark.parametrize("act", ["swish", "ReLU", "", "softmax"])
def test_neat_unknown_activation(act):
    assert act not in ACTIVATIONS
    with pytest.raises(ValueError, match=r"activation must be one of"):
        neat_projection(good()["weight"], torch.randn(R, D_OUT), act, backend="torch")


def test_neat_weight_requires_grad():
    w = good()["weight"].requires_grad_()
    with pytest.raises(ValueError, match=r"weight .* must have requires_grad=False"):
        neat_projection(w, torch.randn(R, D_OUT), "relu", backend="torch")


def test_neat_a_n_on_meta_device():
    with pytest.raises(RuntimeError, match=r"a_n is on meta but weight is on cpu"):
        neat_projection(good()["weight"], torch.randn(R, D_OUT, device="meta"), "relu", backend="torch")


def test_neat_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        neat_projection(good()["weight"], torch.randn(R, D_OUT), "relu", backend="cuda")


@pytest.mark.parametrize("name", ["weight", "a_n"])
def test_neat_integer_dtype(name):
    t = dict(weight=good()["weight"], a_n=torch.randn(R, D_OUT))
    t[name] = t[name].to(torch.int64)
    with pytest.raises(TypeError, match=rf"{name} must be a floating tensor"):
        neat_projection(t["weight"], t["a_n"], "relu", backend="torch")


def test_meta_inputs_are_refused_pointing_to_the_layers():
    meta = {name: t.to("meta") for name, t in good().items()}
    with pytest.raises(RuntimeError, match=r"x is on the meta device \(no values\): .* call the layer \(AdapterLinear"):
        call(meta)

"""The contract every method keeps, run over one table of (method, config) cases.

Disabled adapters give the base output; merge/unmerge restores W bit for bit; save/load reproduces the
model; the fused path on every backend matches the float64 reference (values and gradients); one
torch.compile(fullgraph=True) training step, autocast training and activation checkpointing give the
eager results. The table holds every registered method, a user's subclass of LoraConfig and a seventh
method registered below the way a method module registers one. DDP and FSDP2 run in
tests/test_distributed.py (torchrun); longer compiled and checkpointed training runs with parts switched
off in tests/test_compile.py and tests/test_gradient_checkpointing.py.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastlora
from fastlora import (
    AdapterConfig,
    AdapterLinear,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.methods.base import Adapter, adapter_factory
from fastlora.methods.lora import LoraAdapter
from fastlora.registry import method_of, register_method

from utils import assert_close

D_IN, D_HIDDEN, D_OUT, N = 12, 10, 6, 7


@dataclass(frozen=True)
class MiddleLoraConfig(AdapterConfig):
    """A seventh method, defined and registered here as a method module would: y = x W^T + b + s (x A^T) M^T B^T."""

    method: ClassVar[str] = "middle_lora"
    scale: float = 0.5


class MiddleLoraAdapter(Adapter):
    """lora_A (r, d_in), middle M (r, r) = identity, lora_B (d_out, r) = zeros: all three trained."""

    def __init__(self, config: MiddleLoraConfig, in_features: int, out_features: int, weight: torch.Tensor,
                 layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features)
        factory = adapter_factory(weight)
        self.lora_A = nn.Parameter(torch.randn(config.r, in_features, **factory) / in_features ** 0.5)
        self.middle = nn.Parameter(torch.eye(config.r, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **factory))

    def op_arguments(self, weight: torch.Tensor) -> dict:
        return {"lora_a": self.lora_A, "lora_b": self.lora_B, "middle": self.middle, "scale": self.config.scale}


register_method(MiddleLoraConfig, MiddleLoraAdapter)


@dataclass(frozen=True)
class UserLoraConfig(LoraConfig):
    """A user's subclass of LoraConfig (another default alpha): runs and saves as plain LoRA."""

    alpha: float = 12.0


CASES = {
    "lora": LoraConfig(r=3, alpha=6.0),
    "lora_user_subclass": UserLoraConfig(r=3),
    "selective_lora": SelectiveLoraConfig(r=3, alpha=6.0),
    "rank_selective_lora": RankSelectiveLoraConfig(r=3, alpha=6.0, total_steps=500),
    "curlora": CurLoraConfig(r=3, alpha=1.5, seed=3),
    "neat": NeatConfig(r=3, scale=0.7),
    "neat_depth2_gelu": NeatConfig(r=3, depth=2, activation="gelu", scale=0.5),
    "cascade_lora": CascadeLoraConfig(r=3, alpha=2.0, cascade_interval=1, noise_intensity=0.05),
    "middle_lora": MiddleLoraConfig(r=3),
}
# what training, a training rule or a hand edit changes beyond the parameters, per method
RULE_CHANGES = {
    "selective_lora": lambda adapter: adapter.score.fill_(-1.0),  # the gate flips off
    "cascade_lora": lambda adapter: pytest.raises(ValueError, adapter.cascade_step),  # a stage writes W: refused
}

parametrize_cases = pytest.mark.parametrize("config", list(CASES.values()), ids=list(CASES))


def _base(dtype=torch.float64, layers: int = 2) -> nn.Sequential:
    """Seeded Linear(D_IN, D_HIDDEN) -> tanh -> Linear(D_HIDDEN, D_OUT), or its first Linear alone (layers=1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN, dtype=dtype), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT, dtype=dtype))
    return model if layers == 2 else model[:1]


def _randomise(model: nn.Module) -> nn.Module:
    """Noise into every adapter parameter of more than one element (zero-initialised factors matter; a
    one-element score keeps its switched-on init)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            for p in layer.adapter.parameters():
                if p.numel() > 1:
                    p.copy_(0.5 * torch.randn_like(p))
            if hasattr(layer.adapter, "refresh_active_ranks"):
                layer.adapter.refresh_active_ranks()
    return model


def _model(config: AdapterConfig, dtype=torch.float64, layers: int = 2, **changes) -> nn.Sequential:
    """The base model with ``config`` (fields replaced by ``changes``) on its Linears, adapters randomised."""
    return _randomise(fastlora.inject(_base(dtype, layers), dataclasses.replace(config, **changes)))


def _x(dtype=torch.float64) -> torch.Tensor:
    """Fixed inputs (2, N, D_IN): the same values in every dtype."""
    return torch.randn(2, N, D_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` on the torch backend (the reference runs in float64, which Triton does not)."""
    copied = copy.deepcopy(model).double()
    for _, layer in fastlora.adapter_layers(copied):
        layer.config = layer.adapter.config = dataclasses.replace(layer.config, backend="torch")
    return copied


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model with every adapted layer computed by its pure-torch reference formula."""
    for module in model:
        x = module.reference_forward(x) if isinstance(module, AdapterLinear) else module(x)
    return x


def _dense(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model with every adapted layer computed as a plain Linear of W + ΔW (no adapter op)."""
    for module in model:
        if isinstance(module, AdapterLinear):
            x = F.linear(x, module.weight + module.adapter.delta_weight(module.weight), module.bias)
        else:
            x = module(x)
    return x


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _step_grads(model: nn.Module, call, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and gradients (input and trainable parameters) of one loss = mse(call(x), target) + regulariser."""
    x = x.clone().requires_grad_(True)
    out = call(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    loss = F.mse_loss(out, target) + fastlora.regularization_loss(model)
    names, params = zip(*_trainable(model))
    grads = torch.autograd.grad(loss, [x, *params])
    return {"out": out.detach(), "x": grads[0], **dict(zip(names, grads[1:]))}


@parametrize_cases
def test_registered_method_and_config_round_trip(config):
    method = method_of(config)
    assert isinstance(config, method.config) and method.name == config.method
    assert all(type(layer.adapter) is method.adapter for _, layer in fastlora.adapter_layers(_model(config)))
    again = AdapterConfig.from_dict(config.to_dict())
    assert type(again) is method.config and again.to_dict() == config.to_dict()


@parametrize_cases
def test_disabled_adapters_give_the_base_output(config):
    x = _x()
    expected = _base()(x).detach()
    model = _model(config)
    if isinstance(config, CascadeLoraConfig):  # LoRASC's first training forward writes stage 0's noise into W:
        model(x)  # its base is W as it is after that
        expected = fastlora.unload(copy.deepcopy(model))(x).detach()
    assert not torch.equal(model(x), expected)
    fastlora.set_adapters_enabled(model, False)
    assert torch.equal(model(x), expected)
    fastlora.set_adapters_enabled(model, True)
    fastlora.merge(model)
    assert not torch.equal(model(x), expected)
    fastlora.set_adapters_enabled(model, False)
    assert torch.equal(model(x), expected)
    assert torch.equal(model[0].reference_forward(x), F.linear(x, model[0].weight_before_merge, model[0].bias))
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastlora.set_adapters_enabled(model, "no")


@parametrize_cases
def test_merge_unmerge_round_trip(config):
    model = _model(config).eval()
    x = _x()
    before = model(x).detach()
    weights = [layer.weight.detach().clone() for _, layer in fastlora.adapter_layers(model)]
    fastlora.merge(model)
    assert not torch.equal(model[0].weight, weights[0])
    assert_close(model(x), before, 1e-12, "merged output")
    assert_close(model[0].weight, weights[0] + model[0].adapter.delta_weight(weights[0]), 1e-14, "merged W")
    merged = [layer.weight.detach().clone() for _, layer in fastlora.adapter_layers(model)]
    fastlora.merge(model)  # a second merge adds nothing, nor does to_linear of a merged layer
    for (_, layer), weight in zip(fastlora.adapter_layers(model), merged):
        assert torch.equal(layer.weight, weight) and torch.equal(layer.to_linear().weight, weight)
    with torch.no_grad():  # whatever changes while merged, unmerge restores W bit for bit
        for _, layer in fastlora.adapter_layers(model):
            for p in layer.adapter.parameters():
                p.add_(torch.randn_like(p))
            RULE_CHANGES.get(config.method, lambda adapter: None)(layer.adapter)
    fastlora.unmerge(model)
    for (_, layer), weight in zip(fastlora.adapter_layers(model), weights):
        assert torch.equal(layer.weight, weight) and not layer.merged and layer.weight_before_merge is None
    fastlora.unmerge(model)
    assert torch.equal(model[0].weight, weights[0])
    model = _model(config).eval()
    unloaded = fastlora.merge_and_unload(model)
    assert type(unloaded[0]) is nn.Linear and type(unloaded[2]) is nn.Linear
    assert_close(unloaded(x), before, 1e-12, "merge_and_unload output")


@parametrize_cases
def test_save_load_round_trip(config, tmp_path):
    model = _model(config)
    x = _x()
    fastlora.save_adapter(model, tmp_path / "ckpt")
    stored = fastlora.read_adapter_config(tmp_path / "ckpt")
    assert type(stored) is method_of(config).config and stored.to_dict() == config.to_dict()
    loaded = fastlora.load_adapter(_base(), tmp_path / "ckpt")
    assert torch.equal(loaded(x), model(x))
    for (_, ours), (_, theirs) in zip(fastlora.adapter_layers(loaded), fastlora.adapter_layers(model)):
        state = theirs.adapter.state_dict()
        assert ours.adapter.state_dict().keys() == state.keys()
        assert all(torch.equal(t, state[k]) for k, t in ours.adapter.state_dict().items())
    again = fastlora.load_adapter(fastlora.inject(_base(), config), tmp_path / "ckpt")  # into the same config
    assert torch.equal(again(x), model(x))
    fastlora.save_adapter(model, tmp_path / "ckpt")  # saving again replaces the files in place
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@parametrize_cases
def test_torch_backend_matches_the_reference_and_the_dense_update_in_float64(config):
    model = _model(config, backend="torch").eval()
    x = _x()
    out = model(x)
    assert_close(out, _reference(model, x), 1e-12, "vs reference_forward")
    with torch.no_grad():
        assert_close(out, _dense(model, x), 1e-12, "vs x (W + ΔW)^T + b")


@pytest.mark.parametrize("backend", ["torch", "triton", "cublas", "onepass"])
@parametrize_cases
def test_float32_backends_match_float64_reference_values_and_gradients(config, backend):
    if backend != "torch":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("the model runs on the CPU: Triton needs the interpreter there")
    model = _model(config, torch.float32, backend=backend)
    reference = _float64_copy(model)
    got = _step_grads(model, model, _x(torch.float32))
    expected = _step_grads(reference, lambda x: _reference(reference, x), _x())
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert_close(got[name], value, 1e-5, f"{backend} {name}", zero_ref_ok=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@parametrize_cases
def test_reference_forward_of_a_half_precision_model_matches_float64(config, dtype):
    model = _model(config, dtype).eval()
    x = _x(dtype)
    out = _reference(model, x)
    assert out.dtype == dtype
    with torch.no_grad():
        reference = _dense(_float64_copy(model), x.double())
    assert_close(out, reference, 1e-2)


@parametrize_cases
def test_compiled_training_step_matches_eager(config):
    torch._dynamo.reset()
    model = _model(config, torch.float32, layers=1, backend="torch")
    eager = _step_grads(model, model, _x(torch.float32))
    try:
        compiled = _step_grads(model, torch.compile(model, backend="aot_eager", fullgraph=True), _x(torch.float32))
    finally:
        torch._dynamo.reset()
    for name, value in eager.items():
        assert_close(compiled[name], value, 1e-5, name, zero_ref_ok=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@parametrize_cases
def test_training_under_autocast_matches_float64(config, dtype):
    model = _model(config, torch.float32, layers=1, backend="torch")
    reference = _float64_copy(model)
    x = _x(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    ref = reference(x.double())
    assert_close(out, ref, 2e-2)
    dy = torch.randn(out.shape)
    names, params = zip(*_trainable(model))
    grads = torch.autograd.grad(out.float(), params, dy)
    ref_grads = torch.autograd.grad(ref, [p for _, p in _trainable(reference)], dy.double())
    for name, grad, ref_grad, param in zip(names, grads, ref_grads, params):
        assert grad.dtype == param.dtype == torch.float32, name
        if ref_grad.norm() > 0:
            assert_close(grad, ref_grad, 3e-2, name)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = model(x).float().square().mean() + fastlora.regularization_loss(model)
        loss.backward()
        optimizer.step()
    hooks.remove()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@parametrize_cases
def test_checkpointed_step_with_dropout_matches_the_plain_step(config):
    model = _model(config, backend="torch", dropout=0.3)
    x = _x()
    torch.manual_seed(7)  # the dropout seeds drawn in the forward, drawn again by the recompute
    plain = _step_grads(model, model, x)
    torch.manual_seed(7)
    recomputed = _step_grads(model, lambda x: checkpoint(model, x, use_reentrant=False), x)
    for name, value in plain.items():
        assert_close(recomputed[name], value, 1e-12, name, zero_ref_ok=True)


def test_a_seventh_method_computes_its_formula_in_float64():
    model = _model(MiddleLoraConfig(r=3, scale=0.5), backend="torch")
    x = _x()
    y = x
    for module in model:
        if isinstance(module, AdapterLinear):
            a, m, b = (t.detach() for t in (module.adapter.lora_A, module.adapter.middle, module.adapter.lora_B))
            y = y @ module.weight.T + module.bias + 0.5 * ((y @ a.T) @ m.T) @ b.T
        else:
            y = module(y)
    assert_close(model(x), y, 1e-12)


def test_a_user_config_subclass_runs_and_exports_as_plain_lora(tmp_path):
    model = _model(UserLoraConfig(r=3))
    assert all(type(layer.adapter) is LoraAdapter and layer.adapter.scale == 4.0
               for _, layer in fastlora.adapter_layers(model))
    x = _x()
    fastlora.save_peft_adapter(model, tmp_path / "peft")
    loaded = fastlora.load_peft_adapter(_base(), tmp_path / "peft")
    assert type(loaded[0].config) is LoraConfig and loaded[0].config.alpha == 12.0
    assert torch.equal(loaded(x), model(x))


def test_registration_refuses_a_taken_name_or_peft_type_and_lookups_name_what_is_missing():
    from fastlora.peft_formats import LORA_FORMAT

    @dataclass(frozen=True)
    class Clash(AdapterConfig):
        method: ClassVar[str] = "lora"

    @dataclass(frozen=True)
    class Unregistered(AdapterConfig):
        method: ClassVar[str] = "unregistered"

    with pytest.raises(ValueError, match="method 'lora' is already registered by LoraConfig"):
        register_method(Clash, LoraAdapter)
    with pytest.raises(ValueError, match="peft_type 'LORA' is already registered by 'lora'"):
        register_method(MiddleLoraConfig, MiddleLoraAdapter, peft_format=LORA_FORMAT)
    with pytest.raises(TypeError, match="adapter must be an Adapter subclass"):
        register_method(Unregistered, nn.Linear)
    with pytest.raises(ValueError, match="no adapter registered for Unregistered"):
        fastlora.inject(_base(), Unregistered(r=2))
    with pytest.raises(ValueError, match=r"unknown adapter method 'unregistered'; known: \[.*'middle_lora'"):
        AdapterConfig.from_dict(Unregistered(r=2).to_dict())
    assert method_of(MiddleLoraConfig(r=2)).peft_format is None  # the refused registration changed nothing


@pytest.mark.parametrize("d_in,d_out", [(6, 4), (4, 6)])
def test_the_rank_may_reach_the_smaller_dimension_not_pass_it(d_in, d_out):
    AdapterLinear(d_in, d_out, config=LoraConfig(r=4))  # r = min(d_in, d_out): a full-rank update
    with pytest.raises(ValueError, match=rf"r=5 exceeds min\(d_in={d_in}, d_out={d_out}\)=4"):
        AdapterLinear(d_in, d_out, config=LoraConfig(r=5))


@pytest.mark.parametrize("gate", [None, 0.5, 0.0], ids=["no_gate", "gate_0.5", "gate_off"])
def test_the_dense_update_is_the_gate_times_b_a_without_a_scale(gate):
    """A method's op_arguments may leave scale and gate out (adapted_linear's defaults, 1): its dense update is
    then g B A (B A without a gate), and W + ΔW gives what the op computes."""
    class BareAdapter(Adapter):
        def __init__(self, config, in_features, out_features):
            super().__init__(config, in_features, out_features)
            g = torch.Generator().manual_seed(5)
            self.a = torch.randn(config.r, in_features, generator=g, dtype=torch.float64)
            self.b = torch.randn(out_features, config.r, generator=g, dtype=torch.float64)

        def op_arguments(self, weight):
            return {"lora_a": self.a, "lora_b": self.b, **({} if gate is None else {"gate": gate})}

    g = torch.Generator().manual_seed(6)
    weight = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    adapter = BareAdapter(LoraConfig(r=3), D_IN, D_OUT)
    delta = adapter.delta_weight(weight)
    assert torch.equal(delta, (1.0 if gate is None else gate) * (adapter.b @ adapter.a))
    y = fastlora.kernels.adapted_linear(x, weight, None, **adapter.op_arguments(weight), backend="torch")
    assert_close(y, x @ (weight + delta).T, 1e-12)


@pytest.fixture
def registry_restored():
    """The registry as it was before the test (registrations are process-wide)."""
    from fastlora import registry

    saved = dict(registry._METHODS)
    yield
    registry._METHODS.clear()
    registry._METHODS.update(saved)


def config_class(name: str, method) -> type:
    """A frozen AdapterConfig subclass ``name`` whose ``method`` is given (a value a method module would not write)."""
    return dataclass(frozen=True)(type(name, (AdapterConfig,), {"method": method, "__annotations__": {}}))


@pytest.mark.parametrize("config", [LoraConfig(r=2), dict], ids=["instance", "other_class"])
def test_registration_refuses_what_is_not_an_adapter_config_class(config, registry_restored):
    with pytest.raises(TypeError, match="config must be an AdapterConfig subclass"):
        register_method(config, LoraAdapter)


@pytest.mark.parametrize("name", ["", 5])
def test_registration_refuses_a_method_name_that_is_not_a_non_empty_str(name, registry_restored):
    Named = config_class("Named", name)
    with pytest.raises(ValueError, match=rf"Named.method must name the method \(a non-empty str\), got {name!r}"):
        register_method(Named, LoraAdapter)


def test_registration_compares_names_and_peft_types_by_value(registry_restored):
    """A name or peft_type built at run time (not an interned literal) clashes as the literal does; a new
    peft_type does not, whatever it sorts after; re-registering a config checks every other method."""
    from fastlora.peft_formats import LORA_FORMAT

    Built = config_class("Built", "".join(["lo", "ra"]))
    with pytest.raises(ValueError, match="method 'lora' is already registered by LoraConfig"):
        register_method(Built, LoraAdapter)
    built_type = dataclasses.replace(LORA_FORMAT, peft_type="".join(["LO", "RA"]))
    with pytest.raises(ValueError, match="peft_type 'LORA' is already registered by 'lora'"):
        register_method(MiddleLoraConfig, MiddleLoraAdapter, peft_format=built_type)
    fresh = dataclasses.replace(LORA_FORMAT, peft_type="ZZ_MIDDLE_LORA")  # sorts after every PEFT type
    assert register_method(MiddleLoraConfig, MiddleLoraAdapter, peft_format=fresh).peft_format is fresh
    assert fastlora.registry.peft_methods()["ZZ_MIDDLE_LORA"].config is MiddleLoraConfig
    Late = config_class("Late", "late")
    register_method(Late, LoraAdapter, peft_format=dataclasses.replace(LORA_FORMAT, peft_type="ZZ_LATE"))
    with pytest.raises(ValueError, match="peft_type 'ZZ_LATE' is already registered by 'late'"):  # past its own entry
        register_method(MiddleLoraConfig, MiddleLoraAdapter,
                        peft_format=dataclasses.replace(LORA_FORMAT, peft_type="ZZ_LATE"))

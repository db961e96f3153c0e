"""torch.compile: adapted models give the eager outputs, gradients and training trajectory.

Backend "aot_eager": Dynamo's trace and AOTAutograd's joint forward/backward graph through
AdaptedLinearFunction, i.e. everything fastlora's code has to get right. Inductor only
generates code for that graph, and on this 2-core CPU CI machine its C++ compilation takes
45-55 s cold for one tiny model, beyond the test budget: FASTLORA_TEST_INDUCTOR=1 runs the
inductor check too.

fullgraph=True holds in training for every method: Selective LoRA's gate is computed on the
device under torch.compile (not read on the host), and the fused op multiplies by it.
With dynamic=True (or a float argument that changed between calls) the host floats (scale, gate
value, dropout) are symbolic floats, which the op's input checks leave to eager mode: one graph too.
Models come from tests/distributed_worker.py (two adapted layers per method, the second
driven off during step 1 where a method can switch parts off).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import fastlora
from fastlora import LoraConfig
from fastlora.kernels import adapted_linear

import distributed_worker as models
from utils import rel

TOLERANCE = 1e-5  # float32
STEPS = 2  # step 2 runs with the parts switched off in step 1


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _training_run(model: nn.Module, call, x: torch.Tensor, target: torch.Tensor, steps: int = STEPS,
                  seed: int = 0) -> list[dict]:
    """Per SGD step (training hooks attached): the output and every trainable gradient, then
    the parameters after the last step."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=models.LEARNING_RATE)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    torch.manual_seed(seed)
    record = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = call(x)
        (F.mse_loss(out, target) + fastlora.regularization_loss(model)).backward()
        record.append({"out": out.detach(), **{n: p.grad.clone() for n, p in trainable}})
        optimizer.step()
    hooks.remove()
    record.append({n: p.detach().clone() for n, p in trainable})
    return record


def _assert_same_run(compiled: list[dict], eager: list[dict], where: str, tolerance: float = TOLERANCE) -> None:
    for step, (got, ref) in enumerate(zip(compiled, eager)):
        assert got.keys() == ref.keys()
        for name, value in ref.items():
            err = rel(got[name], value, zero_ref_ok=True)
            assert err < tolerance, f"{where}: {name} at step {step + 1}: rel err {err:.2e}"


@pytest.mark.parametrize("method", list(models.METHODS))
def test_compiled_training_matches_eager(method):
    if method not in models.registered_methods():
        pytest.skip(f"{method}: no adapter registered in fastlora.methods.ADAPTER_TYPES")
    x, target = models.full_batch(torch.float32)
    eager = models.build_model(method, torch.float32)
    reference = _training_run(eager, eager, x, target)
    model = models.build_model(method, torch.float32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _assert_same_run(_training_run(model, compiled, x, target), reference, method)


@pytest.mark.parametrize("method", list(models.METHODS))
def test_compiled_inference_matches_eager(method):
    """eval() under no_grad (NEAT's cached projection, float gates); graph breaks allowed."""
    if method not in models.registered_methods():
        pytest.skip(f"{method}: no adapter registered in fastlora.methods.ADAPTER_TYPES")
    x, _ = models.full_batch(torch.float32)
    model = models.build_model(method, torch.float32).eval()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for _ in range(2):  # the second call reuses NEAT's cache and the compiled code
            err = rel(compiled(x), model(x), zero_ref_ok=True)
            assert err < TOLERANCE, f"{method}: rel err {err:.2e}"


def _gradients(model: nn.Module, call, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """One forward and backward (the regulariser included): the output and every trainable gradient."""
    model.zero_grad(set_to_none=True)
    out = call(x)
    ((out * dy).sum() + fastlora.regularization_loss(model)).backward()
    return {"out": out.detach(), **{n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("method", list(models.METHODS))
def test_dynamic_compile_is_one_graph_matching_eager(method):
    """dynamic=True makes the adapter's scale a symbolic float, which the op's input checks must not
    read on the host (math.isfinite): one graph (fullgraph=True), no graph break, and eager mode's
    output and gradients (float64) for fresh inputs of two batch shapes."""
    if method not in models.registered_methods():
        pytest.skip(f"{method}: no adapter registered in fastlora.methods.ADAPTER_TYPES")
    eager = models.build_model(method)
    model = models.build_model(method)
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)
    counters.clear()
    generator = torch.Generator().manual_seed(99)
    for shape in ((3, 4), (5, 2)):
        x = torch.randn(*shape, models.D_IN, generator=generator, dtype=torch.float64)
        dy = torch.randn(*shape, models.D_OUT, generator=generator, dtype=torch.float64)
        reference = _gradients(eager, eager, x, dy)
        _assert_same_run([_gradients(model, compiled, x, dy)], [reference], f"{method} at batch {shape}",
                         tolerance=1e-12)
    assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("floats", [{"gate": 0.7}, {"gate_value": 1.0}, {"dropout": 0.25}],
                         ids=["float_gate", "gate_value", "dropout"])
def test_dynamic_compile_of_the_op_with_host_floats(floats):
    """adapted_linear's host floats (scale, a float gate, a tensor gate's gate_value, dropout) given as
    arguments of a dynamic=True compile are symbolic: traced without a graph break, eager's result;
    eager mode still refuses a non-finite value."""
    generator = torch.Generator().manual_seed(5)
    x, weight = (torch.randn(4, 3, 8, generator=generator, dtype=torch.float64),
                 torch.randn(6, 8, generator=generator, dtype=torch.float64))
    lora_a = torch.randn(2, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(6, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    gate = torch.tensor(1.0, dtype=torch.float64, requires_grad=True) if "gate_value" in floats else None
    leaves = [lora_a, lora_b] + ([gate] if gate is not None else [])

    def op(x, scale, **floats):
        seed = {"dropout_seed": 3} if "dropout" in floats else {}
        tensor_gate = {"gate": gate} if gate is not None else {}
        return adapted_linear(x, weight, None, lora_a, lora_b, scale=scale, **tensor_gate, **seed, **floats)

    def run(call):
        for leaf in leaves:
            leaf.grad = None
        out = call(x, 1.5, **floats)
        out.square().sum().backward()
        return {"out": out.detach(), **{f"leaf{i}": leaf.grad.clone() for i, leaf in enumerate(leaves)}}

    reference = run(op)
    counters.clear()
    _assert_same_run([run(torch.compile(op, backend="aot_eager", dynamic=True, fullgraph=True))], [reference],
                     str(floats), tolerance=1e-12)
    assert dict(counters["graph_break"]) == {}
    name = next(iter(floats))
    if name != "dropout":  # dropout's range check is a comparison, traced as it is
        with pytest.raises(ValueError, match=rf"{name} must be finite"):
            op(x, 1.5, **{name: math.nan})
    with pytest.raises(ValueError, match=r"scale must be finite"):
        op(x, math.inf, **floats)


def test_a_changed_scale_recompiles_without_a_graph_break():
    """Default dynamic=None: a float argument that changes between calls is made dynamic (a symbolic
    float) on the recompile, which must trace as with dynamic=True."""
    generator = torch.Generator().manual_seed(6)
    x, weight, lora_a, lora_b = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                                 for shape in ((4, 8), (6, 8), (2, 8), (6, 2)))
    compiled = torch.compile(lambda x, scale: adapted_linear(x, weight, None, lora_a, lora_b, scale=scale),
                             backend="aot_eager", fullgraph=True)
    counters.clear()
    for scale in (1.5, 2.5, 3.5):
        reference = adapted_linear(x, weight, None, lora_a, lora_b, scale=scale)
        assert rel(compiled(x, scale), reference) < 1e-12, scale
    assert dict(counters["graph_break"]) == {}


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(37, 29), nn.Tanh(), nn.Linear(29, 11)),
                            LoraConfig(r=4, alpha=6.0, dropout=0.3))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and not param.any():
                param.normal_(0.0, 0.5)
    return model


def test_compiled_dropout_draws_the_eager_masks():
    """The dropout seed is drawn at run time inside the graph (a tensor, no graph break), never
    baked into it: each step gets a fresh mask, the one eager mode draws from the same global seed."""
    x, target = models.full_batch(torch.float32)
    eager = _dropout_model()
    reference = _training_run(eager, eager, x, target, seed=7)
    model = _dropout_model()
    _assert_same_run(_training_run(model, torch.compile(model, backend="aot_eager"), x, target, seed=7),
                     reference, "lora with dropout")


@pytest.mark.skipif(os.environ.get("FASTLORA_TEST_INDUCTOR") != "1",
                    reason="inductor's C++ compile takes 45-55 s cold on a 2-core CPU; "
                           "set FASTLORA_TEST_INDUCTOR=1 to run it")
@pytest.mark.parametrize("method", ["lora", "curlora"])
def test_inductor_training_matches_eager(method):
    x, target = models.full_batch(torch.float32)
    eager = models.build_model(method, torch.float32)
    reference = _training_run(eager, eager, x, target, steps=1)
    model = models.build_model(method, torch.float32)
    compiled = torch.compile(model, fullgraph=True)
    _assert_same_run(_training_run(model, compiled, x, target, steps=1), reference, f"inductor {method}")


def test_codyra_pruning_ranks_during_its_schedule_does_not_recompile_per_step():
    """12 optimizer steps (more than Dynamo's recompile limit, 8) in which the schedule prunes ranks one
    after another: the training forward reads neither the step count nor the number of active ranks while
    the schedule runs (fullgraph=True would fail at the limit), and the run is the eager one."""
    def run(call_of):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        fastlora.inject(model, fastlora.RankSelectiveLoraConfig(r=6, total_steps=12, dense_fraction=0.0,
                                                                threshold_levels=12, kappa_max=0.02))
        with torch.no_grad():
            for _, layer in fastlora.adapter_layers(model):
                layer.adapter.importance.copy_(torch.linspace(0.01, 0.12, 6))
                layer.adapter.lora_B.normal_()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        hooks = fastlora.attach_training_hooks(model, optimizer)
        call, outputs, ranks = call_of(model), [], []
        generator = torch.Generator().manual_seed(1)
        for _ in range(12):
            x, target = torch.randn(8, 6, generator=generator), torch.randn(8, 6, generator=generator)
            optimizer.zero_grad()
            out = call(x)
            F.mse_loss(out, target).backward()
            optimizer.step()
            outputs.append(out.detach())
            ranks.append(int(model[0].adapter.active_index.numel()))
        hooks.remove()
        return outputs, ranks, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    eager = run(lambda model: model)
    counters.clear()
    compiled = run(lambda model: torch.compile(model, backend="aot_eager", fullgraph=True))
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled[1] == eager[1] and len(set(eager[1])) >= 4  # ranks pruned step after step
    assert all(rel(a, b) < TOLERANCE for a, b in zip(compiled[0], eager[0]))
    assert all(rel(compiled[2][n], eager[2][n], zero_ref_ok=True) < TOLERANCE for n in eager[2])

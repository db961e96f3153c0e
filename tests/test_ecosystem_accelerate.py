"""fastlora.accelerate on PEFT models: the fused op computes what PEFT computes, PEFT's machinery keeps working.

PEFT itself is the reference: the same PeftModel runs with and without acceleration (float64 for
exact comparisons), and what the accelerated model saves loads in plain PEFT.
"""
import copy
import warnings

import peft
import pytest
import torch
from transformers import BertModel

import fastlora
import fastlora.peft_accelerate as peft_accelerate

from utils import rel, tiny_bert

TOL = 1e-10


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return BertModel(tiny_bert()).double().eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))


def peft_model(base, config, seed=2):
    torch.manual_seed(seed)
    return peft.get_peft_model(copy.deepcopy(base), config)


def lora(**kwargs):
    fields = dict(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"], init_lora_weights=False)
    return peft.LoraConfig(**{**fields, **kwargs})


def peanut(**kwargs):
    return peft.PeanutConfig(**{**dict(r=4, depth=1, act_fn="relu", scaling=0.5, init_weights=False,
                                       target_modules=["query", "value"]), **kwargs})


def hidden(model, ids):
    return model(input_ids=ids).last_hidden_state


def count_fused_calls(monkeypatch):
    """Patch the op the accelerated layers call; returns the list of dropout probabilities they passed."""
    calls = []
    real = peft_accelerate.adapted_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_accelerate, "adapted_linear", counting)
    return calls


def loss_and_grads(model, ids):
    model.zero_grad()
    out = hidden(model, ids)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_matches(result, reference):
    """(output, gradients) of ``loss_and_grads`` equal the reference's, for the same (non-empty) parameters."""
    (out, grads), (want_out, want_grads) = result, reference
    assert rel(out, want_out) < TOL
    assert grads.keys() == want_grads.keys() and grads
    for name, grad in grads.items():
        assert rel(grad, want_grads[name]) < TOL, name


@pytest.mark.parametrize("config", [lora(), lora(use_rslora=True, target_modules=["key"]), peanut(),
                                    peanut(depth=0, act_fn="gelu")], ids=["lora", "rslora", "peanut", "peanut0"])
def test_outputs_and_gradients_equal_peft(base, ids, config, monkeypatch):
    model = peft_model(base, config).train()
    want = loss_and_grads(model, ids)
    calls = count_fused_calls(monkeypatch)
    fastlora.accelerate(model)
    assert len(fastlora.accelerated_layers(model)) == len(list(m for m in model.modules()
                                                                if hasattr(m, "get_base_layer")))
    result = loss_and_grads(model, ids)
    assert calls, "the fused op was not called"
    assert_matches(result, want)


def test_training_steps_equal_peft(base, ids):
    reference = peft_model(base, lora()).train()
    fused = fastlora.accelerate(copy.deepcopy(reference))
    assert fastlora.accelerated_layers(fused)
    for model in (reference, fused):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss_and_grads(model, ids)
            optimizer.step()
    for (name, p), (other, q) in zip(reference.named_parameters(), fused.named_parameters()):
        assert name == other
        assert torch.allclose(p, q, rtol=0, atol=1e-12), name
    moved = peft_model(base, lora()).state_dict()
    assert any(not torch.equal(t, moved[k]) for k, t in fused.state_dict().items())  # the steps trained


def test_dropout_runs_fused_and_trains(base, ids, monkeypatch):
    model = fastlora.accelerate(peft_model(base, lora(lora_dropout=0.2)).float().train())
    calls = count_fused_calls(monkeypatch)
    x = ids
    target = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (hidden(model, x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert calls and all(p == 0.2 for p in calls)
    assert losses[-1] < 0.9 * losses[0]
    model.eval()
    calls.clear()
    with torch.no_grad():
        out = hidden(model, x)
        assert set(calls) == {0.0}  # eval: no dropout, as PEFT
        fastlora.deaccelerate(model)
        assert rel(out, hidden(model, x)) < 1e-6


def test_save_pretrained_loads_in_plain_peft(base, ids, tmp_path):
    model = fastlora.accelerate(peft_model(base, lora()).train())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss_and_grads(model, ids)
    optimizer.step()
    model.eval()
    model.save_pretrained(str(tmp_path))
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert rel(hidden(plain, ids), hidden(model, ids)) < TOL
        assert rel(hidden(plain, ids), hidden(base, ids)) > 1e-3
        reloaded = fastlora.accelerate(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)))
        assert rel(hidden(reloaded, ids), hidden(plain, ids)) < TOL


def test_adapter_switching_disabling_and_merging(base, ids, tmp_path, monkeypatch):
    peft_model(base, lora(), seed=5).save_pretrained(str(tmp_path / "other"))
    model = peft_model(base, lora()).eval()
    model.load_adapter(str(tmp_path / "other"), adapter_name="other")
    fastlora.accelerate(model)
    calls = count_fused_calls(monkeypatch)
    with torch.no_grad():
        first = hidden(model, ids)
        model.set_adapter("other")
        second = hidden(model, ids)
        with model.disable_adapter():
            disabled = hidden(model, ids)
        model.merge_adapter()
        merged = hidden(model, ids)
        model.unmerge_adapter()
        assert calls
        fastlora.deaccelerate(model)
        assert not fastlora.accelerated_layers(model)
        assert rel(second, hidden(model, ids)) < TOL
        model.set_adapter("default")
        assert rel(first, hidden(model, ids)) < TOL
    assert rel(disabled, hidden(base, ids)) < TOL
    assert rel(merged, second) < 1e-8
    assert rel(first, second) > 1e-3


def test_unsupported_layers_stay_on_peft_path_and_are_reported(base, ids):
    model = peft_model(base, lora(target_modules=["word_embeddings", "query"])).eval()
    want = hidden(model, ids)
    with pytest.warns(UserWarning, match=r"1 PEFT layers stay on PEFT's path.*word_embeddings "
                                         r"\(lora.Embedding over Embedding\)"):
        fastlora.accelerate(model)
    assert [n.rsplit(".", 3)[-3:] for n in fastlora.accelerated_layers(model)] == [["attention", "self", "query"]] * 2
    assert rel(hidden(model, ids), want) < TOL

    dora = peft_model(base, lora(use_dora=True)).eval()
    want = hidden(dora, ids)
    fastlora.accelerate(dora)
    with pytest.warns(UserWarning, match="ran on PEFT's path: LoRA variant DoraLinearVariant"):
        out = hidden(dora, ids)
    assert torch.equal(out, want)


def test_several_active_adapters_fall_back(base, ids, tmp_path):
    peft_model(base, lora(), seed=5).save_pretrained(str(tmp_path))
    model = peft_model(base, lora()).eval()
    model.load_adapter(str(tmp_path), adapter_name="other")
    model.base_model.set_adapter(["default", "other"])
    want = hidden(model, ids)
    fastlora.accelerate(model)
    with pytest.warns(UserWarning, match="2 active adapters"):
        assert torch.equal(hidden(model, ids), want)


def test_accelerate_is_idempotent_and_deaccelerate_restores(base, ids):
    model = peft_model(base, lora())
    fastlora.accelerate(fastlora.accelerate(model))
    layers = fastlora.accelerated_layers(model)
    assert layers and all("forward" in model.get_submodule(n).__dict__ for n in layers)
    copied = copy.deepcopy(model)
    assert fastlora.accelerated_layers(copied) == layers
    assert copied.get_submodule(layers[0]).forward.args[1] is copied.get_submodule(layers[0])
    fastlora.deaccelerate(model)
    assert all("forward" not in model.get_submodule(n).__dict__ for n in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hidden(model, ids)


@pytest.mark.parametrize("config", [lora(), peanut()], ids=["lora", "peanut"])
def test_accelerate_takes_a_backend_for_every_layer(base, ids, config):
    model = peft_model(base, config).eval()
    with torch.no_grad():
        want = hidden(model, ids)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlora.accelerate(model, backend="cuda")
    fastlora.accelerate(model, backend="cublas")  # a named plan is forced: float64 on CPU cannot run it
    with torch.no_grad(), pytest.raises(RuntimeError, match="backend='cublas' cannot run this call"):
        hidden(model, ids)
    fastlora.accelerate(model, backend="torch")  # calling again sets the backend of every accelerated layer
    with torch.no_grad():
        assert rel(hidden(model, ids), want) < TOL
    fastlora.deaccelerate(model)
    assert not any(hasattr(module, "_fastlora_backend") for module in model.modules())


def _query(model):
    return model.base_model.model.encoder.layer[0].attention.self.query


def test_trainable_base_bias_runs_fused_with_its_gradient(base, ids, monkeypatch):
    """PEFT's bias="lora_only" makes the targeted layers' biases trainable: the fused op computes their gradients."""
    model = peft_model(base, lora(bias="lora_only")).train()
    assert _query(model).base_layer.bias.requires_grad
    want = loss_and_grads(model, ids)
    calls = count_fused_calls(monkeypatch)
    fastlora.accelerate(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to PEFT's path
        result = loss_and_grads(model, ids)
    assert len(calls) == len(fastlora.accelerated_layers(model)) == 8  # one fused call per adapted layer
    assert any(name.endswith("query.base_layer.bias") for name in result[1])
    assert_matches(result, want)


@pytest.mark.parametrize("base_bias", [True, False])
def test_lora_bias_runs_fused_with_its_gradient(base_bias, monkeypatch):
    """PEFT's lora_bias=True gives lora_B a bias, scaled with lora_B's output: y = base(x) + s * (B A x + b_B).
    The fused op takes b + s * b_B as its bias; b_B gets its gradient through that sum (and b, when trainable).
    Without a base bias (PEFT warns, and allows it) the fused bias is s * b_B alone."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=base_bias), torch.nn.Tanh(),
                                torch.nn.Linear(8, 5, bias=base_bias)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's warning about lora_bias over a layer without a bias
        model = peft_model(plain, peft.LoraConfig(r=3, lora_alpha=9, target_modules=["0", "2"], lora_bias=True,
                                                  bias="all" if base_bias else "none", init_lora_weights=False))
    biases = [m.bias for name, m in model.named_modules() if name.endswith("lora_B.default")]
    with torch.no_grad():
        for bias in biases:
            bias.uniform_(-1.0, 1.0)  # PEFT's init zeroes it; a trained one is not
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def output_and_grads():
        model.zero_grad()
        out = model(x)
        (out * torch.linspace(-1, 1, 5, dtype=out.dtype)).square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = output_and_grads()
    calls = count_fused_calls(monkeypatch)
    fastlora.accelerate(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back to PEFT's path
        result = output_and_grads()
    assert len(calls) == 2
    assert sum(name.endswith("lora_B.default.bias") for name in result[1]) == 2
    assert sum(name.endswith("base_layer.bias") for name in result[1]) == (2 if base_bias else 0)
    assert_matches(result, want)


def test_lora_bias_in_fp32_over_a_bf16_model_runs_fused_under_autocast(monkeypatch):
    """PEFT keeps adapters in fp32 over a bf16 model: b (bf16) + s * b_B (fp32) is cast to the compute dtype."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(torch.bfloat16)
    model = peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_bias=True,
                                              init_lora_weights=False))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lora_B.default"):
                assert module.bias.dtype == torch.float32
                module.bias.uniform_(-1.0, 1.0)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x).float()
        calls = count_fused_calls(monkeypatch)
        fastlora.accelerate(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model(x)
    assert len(calls) == 2 and out.dtype == torch.bfloat16
    assert rel(out.float(), want) < 1e-2  # two bf16 layers, PEFT rounding b_B's term in bf16 first


def test_trainable_base_weight_takes_peft_path(base, ids):
    model = peft_model(base, lora()).train()
    _query(model).base_layer.weight.requires_grad_(True)
    want = loss_and_grads(model, ids)
    fastlora.accelerate(model)
    with pytest.warns(UserWarning, match="ran on PEFT's path: base weight is trainable") as record:
        result = loss_and_grads(model, ids)
    assert {w.filename for w in record if "PEFT's path" in str(w.message)} == {__file__}  # past peft's frames
    assert any(name.endswith("query.base_layer.weight") for name in result[1])
    assert_matches(result, want)


def test_extra_forward_arguments_take_peft_path(base):
    """A keyword PEFT's forward reads (a mixed batch's ``adapter_names``) sends the call to PEFT's forward."""
    model = peft_model(base, lora()).eval()
    layer = _query(model)
    x = torch.randn(3, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    names = ["default", "__base__", "default"]  # the second sample without the adapter
    want = layer(x, adapter_names=names)
    assert not torch.equal(want[1], layer(x)[1])
    fastlora.accelerate(model)
    with pytest.warns(UserWarning, match=r"extra forward arguments \['adapter_names'\]"):
        assert torch.equal(layer(x, adapter_names=names), want)


def test_input_dtype_other_than_the_weights_runs_fused_only_under_autocast(base, monkeypatch):
    model = peft_model(base, lora()).to(torch.bfloat16).eval()
    layer = _query(model)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))  # float32 over bfloat16 weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
    with pytest.raises(RuntimeError) as peft_error:
        layer(x)  # outside autocast PEFT's own forward refuses the mix
    fastlora.accelerate(model)
    calls = count_fused_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert len(calls) == 1 and out.dtype == torch.bfloat16
    assert rel(out.double(), want.double()) < 2e-2
    with pytest.warns(UserWarning, match="input dtype torch.float32 differs from the base weight's torch.bfloat16 "
                                         "outside autocast"), pytest.raises(RuntimeError) as error:
        layer(x)
    assert len(calls) == 1 and str(error.value) == str(peft_error.value)


class _DoubledLinear(torch.nn.Linear):
    """An nn.Linear subclass with its own forward, which the fused op would not compute."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_lora_over_a_linear_subclass_stays_on_peft_path(ids):
    torch.manual_seed(6)
    model = torch.nn.Sequential(_DoubledLinear(8, 8), torch.nn.Linear(8, 8)).double()
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    x = torch.randn(3, 8, dtype=torch.float64)
    want = model(x)
    with pytest.warns(UserWarning, match=r"1 PEFT layers stay on PEFT's path.*0 \(lora.Linear over _DoubledLinear\)"):
        fastlora.accelerate(model)
    assert [name.rsplit(".", 1)[-1] for name in fastlora.accelerated_layers(model)] == ["1"]
    assert rel(model(x), want) < TOL


@pytest.mark.parametrize("kind", ["forward_pre_hook", "forward_hook"])
@pytest.mark.parametrize("where", ["base_layer", "lora_A"])
def test_hooks_on_the_layers_submodules_take_peft_path(base, kind, where):
    """A hook on the base layer or a factor's module (ZeRO-3 and FSDP gather weights there) must run: PEFT's path."""
    model = peft_model(base, lora()).eval()
    layer = _query(model)
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = layer(x)
    module = layer.base_layer if where == "base_layer" else layer.lora_A["default"]
    ran = []
    getattr(module, f"register_{kind}")(lambda *args: ran.append(kind))
    fastlora.accelerate(model)
    with pytest.warns(UserWarning, match=r"ran on PEFT's path: hooks on the layer's submodules"):
        out = layer(x)
    assert ran == [kind] and rel(out, want) < TOL


def test_accelerate_warns_at_its_callers_line(base):
    model = peft_model(base, lora(target_modules=["word_embeddings", "query"]))
    with pytest.warns(UserWarning, match="stay on PEFT's path") as record:
        fastlora.accelerate(model)
    assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize("accelerated", [False, True], ids=["peft", "accelerated"])
def test_inject_refuses_a_peft_model_naming_accelerate(base, accelerated):
    """all-linear over a PEFT model adapted PEFT's own lora_A / lora_B and base_layer and froze PEFT's adapter,
    which still ran: refused, the model unchanged."""
    model = peft_model(base, lora())
    if accelerated:
        fastlora.accelerate(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"the model holds PEFT adapter layers \(e.g. '.*query'\); inject would adapt "
                                         r"PEFT's own modules .* fastlora.accelerate\(peft_model\)"):
        fastlora.inject(model, fastlora.LoraConfig(r=2, target_modules="all-linear"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not list(fastlora.adapter_layers(model))


def test_a_lora_layer_over_another_tuner_layer_stays_on_peft_path(base, ids):
    """A mixed model nests LoRA over LoHa over the nn.Linear: the fused op would compute over the nn.Linear and
    drop LoHa's update (the accelerated output equalled PEFT's with LoHa off)."""
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(r=2, alpha=4, target_modules=["query"],
                                                                    init_weights=False), adapter_name="loha",
                                mixed=True)
    model.add_adapter("lora", lora(target_modules=["query"]))
    model.set_adapter(["loha", "lora"])
    model.eval()
    want = hidden(model, ids)
    with pytest.warns(UserWarning, match=r"stay on PEFT's path .* \(lora.Linear over loha.Linear\)"):
        fastlora.accelerate(model)
    assert not fastlora.accelerated_layers(model)
    assert torch.equal(hidden(model, ids), want)


def _query_layer(model):
    return next(m for n, m in model.named_modules() if n.endswith("attention.self.query"))


@pytest.mark.parametrize("case", ["backward hook", "global hook", "parametrized lora_B", "parametrized lora_B bias",
                                  "dropout 1"])
def test_calls_the_fused_path_would_change_run_on_peft_path(base, ids, case):
    """Backward hooks on the layer's submodules and torch's global module hooks fire as under PEFT; a parametrized
    factor (weight_norm, ...) and lora_dropout 1 run PEFT's own forward (a KeyError and a refusal before)."""
    config = lora(lora_dropout=1.0) if case == "dropout 1" else \
        lora(lora_bias=True) if case == "parametrized lora_B bias" else lora()
    runs = []
    for accelerated in (False, True):
        model = peft_model(base, config).train()
        fired = []
        lora_b = _query_layer(model).lora_B["default"]
        handle = None
        if case == "backward hook":
            lora_b.register_full_backward_hook(lambda *args: fired.append(1))
        elif case == "global hook":
            handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: fired.append(1))
        elif case.startswith("parametrized"):
            name = "bias" if case.endswith("bias") else "weight"
            torch.nn.utils.parametrize.register_parametrization(lora_b, name, torch.nn.Identity())
        if accelerated:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fastlora.accelerate(model)
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = hidden(model, ids)
                out.sum().backward()
        finally:
            if handle is not None:
                handle.remove()
        runs.append((out.detach(), len(fired), caught))
    (want, want_fired, _), (got, got_fired, caught) = runs
    assert rel(got, want) < TOL and got_fired == want_fired  # the other layers run fused
    assert any("ran on PEFT's path" in str(w.message) for w in caught)


def test_a_model_on_the_meta_device_gives_peft_s_meta_outputs():
    """Shape inference (init_empty_weights, FLOP counters): the accelerated layers answer as PEFT's do."""
    with torch.device("meta"):
        base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    fastlora.accelerate(model)
    x = torch.randn(3, 8, device="meta", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran on PEFT's path" warning: nothing is lost on meta
        out = model(x)
    assert out.is_meta and out.shape == (3, 5)
    out.sum().backward()
    assert x.grad.is_meta and x.grad.shape == (3, 8)

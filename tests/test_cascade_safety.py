"""LoRASC writes W in place; what may reach W, and when. Each test compares float64 values (a W shared with
another module: tests/test_shared_weights.py).

- A non-finite fast pair is never folded: W, the record and the pair stay; training goes on with a warning.
- A stage's noise enters W when the stage starts training (its first training forward): a run that ends on
  a stage boundary keeps no untrained noise, next_task stacks none, a stage that never trains gets none,
  and the same holds under torch.compile(fullgraph=True).
- Loading replays at most MAX_REPLAY_STAGES stages per layer; more is refused before anything changes.
- A stage end leaves every optimizer without state or gradient for the fresh pair.
"""
import copy
import hashlib
import json
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
import fastlora.methods.cascade as cascade
from fastlora import CascadeLoraConfig
from fastlora.checkpoint import CONFIG_FILE, WEIGHTS_FILE

F64 = torch.float64
MIX = 1_000_003
D_IN, D_HID, D_OUT, N = 12, 10, 6, 7
CONFIG = CascadeLoraConfig(r=2, alpha=3.0, cascade_interval=2, slow_momentum=0.25, noise_intensity=0.3, noise_seed=4)


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID, dtype=F64), nn.Tanh(), nn.Linear(D_HID, D_OUT, dtype=F64))


def _layers(model):
    return [layer for _, layer in fastlora.adapter_layers(model)]


def _noise(w, stage, layer_index, config=CONFIG):
    """NoisyTune's term of stage ``stage`` on the float64 W ``w`` (seeded as documented)."""
    seed = ((config.noise_seed * MIX + layer_index) * MIX + stage) % 2**63
    u = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    return (u - 0.5) * config.noise_intensity * float(w.std())


def _batches(steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, D_IN, generator=generator, dtype=F64), torch.randn(N, D_OUT, generator=generator,
                                                                               dtype=F64)) for _ in range(steps)]


def _train(model, steps, seed=1, lr=0.1):
    """``steps`` SGD steps with the training hooks (a stage ends every CONFIG.cascade_interval steps)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    for x, target in _batches(steps, seed):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    hooks.remove()
    return model


# ----------------------------------------------------------------------------- non-finite pairs


def test_a_non_finite_pair_is_never_folded():
    model = fastlora.inject(_base(), CONFIG)
    _train(model, 3)  # one stage folded, one step into the second
    layer = _layers(model)[0]
    adapter = layer.adapter
    weight, record = layer.weight.detach().clone(), {k: v.clone() for k, v in adapter.state_dict().items()}
    with torch.no_grad():
        adapter.lora_B[0, 1] = float("nan")
    pair = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())
    with pytest.raises(cascade.NonFiniteStageError, match=r"LoRASC layer 0 \(12 -> 10\), stage 1: the fast pair "
                                                          r"holds non-finite values"):
        adapter.cascade_step()
    assert torch.equal(layer.weight, weight) and torch.isfinite(layer.weight).all()
    state = adapter.state_dict()
    assert all(torch.equal(state[k], v) for k, v in record.items() if k != "lora_B")  # the record, A, counters
    assert torch.equal(torch.nan_to_num(adapter.lora_B, nan=7.0), torch.nan_to_num(pair[1], nan=7.0))


def test_a_blown_up_step_skips_the_stage_end_with_a_warning_and_training_goes_on():
    model = fastlora.inject(_base(), CONFIG)
    _train(model, 3)
    layers = _layers(model)
    weights = [layer.weight.detach().clone() for layer in layers]
    records = [{k: v.clone() for k, v in layer.adapter.state_dict().items() if k not in ("lora_A", "lora_B",
                                                                                        "optimizer_steps")}
               for layer in layers]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    x, target = _batches(1)[0]
    x[0, 0] = float("inf")  # a diverged batch: every gradient non-finite
    optimizer.zero_grad()
    F.mse_loss(model(x), target).backward()
    with pytest.warns(RuntimeWarning, match=r"LoRASC layer \d .* non-finite .* the stage goes on") as record:
        optimizer.step()  # step 4: a stage end, skipped
    assert {w.filename for w in record} == {__file__}  # the step's line, past torch's optimizer hooks
    hooks.remove()
    for layer, weight, record in zip(layers, weights, records):
        assert torch.equal(layer.weight, weight)
        state = layer.adapter.state_dict()
        assert all(torch.equal(state[k], v) for k, v in record.items())
        assert layer.adapter.extra_stats() == {"cascades": 1.0, "optimizer_steps": 4.0}


# ----------------------------------------------------------------------------- when the noise enters W


def _paper_weights(start, pairs, stages_started, config=CONFIG):
    """Float64 W of each layer from the W the run started with (``start``): noise k for each of the first
    ``stages_started`` stages, the recorded fold of each stage that ended."""
    scale = config.alpha / config.r * (1 - config.slow_momentum)
    out = []
    for index, (w, (folded_a, folded_b)) in enumerate(zip(start, pairs)):
        w = w.double().clone()
        for stage in range(stages_started):
            w = w + _noise(w, stage, index, config)
            if stage < folded_a.shape[0]:
                w = w + scale * folded_b[stage].double() @ folded_a[stage].double()
        out.append(w)
    return out


def test_a_run_that_ends_on_a_stage_boundary_keeps_no_untrained_noise(tmp_path):
    base = _base()
    pretrained = [base[0].weight.detach().clone(), base[2].weight.detach().clone()]
    model = fastlora.inject(base, CONFIG)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(_layers(model), pretrained))  # inject writes nothing
    _train(model, 4)  # two stages, ending on the boundary
    pairs = [(layer.adapter.folded_A, layer.adapter.folded_B) for layer in _layers(model)]
    expected = _paper_weights(pretrained, pairs, stages_started=2)  # stage 2 has not trained: no noise 2
    for layer, w in zip(_layers(model), expected):
        assert (layer.weight - w).abs().max() < 1e-12
        assert layer.adapter.pending_start and float(layer.adapter.noise_stds[-1]) == 0.0
        assert layer.adapter.noise_stds[:2].gt(0).all()
    x = _batches(1, seed=7)[0][0]
    with torch.no_grad():  # evaluating the finished run adds nothing
        model.eval()(x)
    model.train()
    assert all((layer.weight - w).abs().max() < 1e-12 for layer, w in zip(_layers(model), expected))
    # the checkpoint says so too: loaded into the pretrained model, W is the trained one bit for bit,
    # and both add stage 2's noise at their next training forward, identically
    fastlora.save_adapter(model, tmp_path / "ckpt")
    loaded = fastlora.load_adapter(_base(), tmp_path / "ckpt")
    assert all(torch.equal(a.weight, b.weight) and b.adapter.pending_start
               for a, b in zip(_layers(model), _layers(loaded)))
    _train(model, 1, seed=9)
    _train(loaded, 1, seed=9)
    expected = _paper_weights(pretrained, pairs, stages_started=3)
    for a, b, w in zip(_layers(model), _layers(loaded), expected):
        assert torch.equal(a.weight, b.weight) and (a.weight - w).abs().max() < 1e-12
        assert not a.adapter.pending_start and float(a.adapter.noise_stds[-1]) > 0


def test_next_task_stacks_no_noise_and_the_next_task_adds_its_own_once():
    base = _base()
    pretrained = [base[0].weight.detach().clone(), base[2].weight.detach().clone()]
    model = fastlora.inject(base, CONFIG)
    _train(model, 4)  # the task ends on a stage boundary
    pairs = [(layer.adapter.folded_A, layer.adapter.folded_B) for layer in _layers(model)]
    task_end = _paper_weights(pretrained, pairs, stages_started=2)
    fastlora.next_task(model)  # merges the fresh (zero) pair: W as the task left it
    layers = _layers(model)
    for layer, w in zip(layers, task_end):
        assert (layer.weight - w).abs().max() < 1e-12 and layer.adapter.pending_start
    _train(model, 1, seed=5)  # the next task's first step: its stage-0 noise (layer index 1 * 2 + k), once
    for k, (layer, w) in enumerate(zip(layers, task_end)):
        assert (layer.weight - (w + _noise(w, 0, 2 + k))).abs().max() < 1e-12
        assert not layer.adapter.pending_start


def test_a_stage_that_never_trains_gets_no_noise_and_records_std_0():
    model = fastlora.inject(_base(), CONFIG)
    layer = _layers(model)[0]
    weight = layer.weight.detach().clone()
    layer.adapter.cascade_step()  # stage 0 ends before any training forward (B = 0: the fold adds 0)
    layer.adapter.cascade_step()
    assert torch.equal(layer.weight, weight)
    assert layer.adapter.noise_stds.tolist() == [0.0, 0.0, 0.0] and layer.adapter.pending_start
    fastlora.set_adapters_enabled(model, False)
    model(torch.randn(3, D_IN, dtype=F64))  # a disabled adapter trains no stage
    fastlora.set_adapters_enabled(model, True)
    assert torch.equal(layer.weight, weight)
    model(torch.randn(3, D_IN, dtype=F64))
    assert (layer.weight.double() - (weight + _noise(weight, 2, 0))).abs().max() < 1e-12


def test_compiled_training_adds_each_stage_noise_in_graph_as_eager_does():
    """fullgraph=True: the noise is one custom op in the graph; W after 3 steps equals eager's bit for bit."""
    config = CascadeLoraConfig(r=2, alpha=3.0, cascade_interval=1, noise_intensity=0.3, noise_seed=4)
    eager = fastlora.inject(_base(), config)
    compiled_model = fastlora.inject(_base(), config)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
        for model, call in ((eager, eager), (compiled_model, compiled)):
            torch.manual_seed(11)  # the fresh pairs' draws
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            hooks = fastlora.attach_training_hooks(model, optimizer)
            for x, target in _batches(3):
                optimizer.zero_grad()
                F.mse_loss(call(x), target).backward()
                optimizer.step()
            hooks.remove()
    finally:
        torch._dynamo.reset()
    for a, b in zip(_layers(eager), _layers(compiled_model)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.adapter.noise_stds, b.adapter.noise_stds)
        assert a.adapter.noise_stds[:3].gt(0).all() and b.adapter.pending_start


# ----------------------------------------------------------------------------- bounded replay


def _long_record(tmp_path, stages):
    """A checkpoint of ``stages`` stages per layer: a trained one's record extended with zero pairs and seeds."""
    model = fastlora.inject(_base(), CONFIG)
    _train(model, 3)
    fastlora.save_adapter(model, tmp_path / "ckpt")
    weights, config = tmp_path / "ckpt" / WEIGHTS_FILE, tmp_path / "ckpt" / CONFIG_FILE
    state = load_file(weights)
    for name in ("0", "2"):
        key = f"{name}.adapter."
        a, b = state[key + "folded_A"], state[key + "folded_B"]
        extra = stages - a.shape[0]
        state[key + "folded_A"] = torch.cat([a, torch.zeros(extra, *a.shape[1:], dtype=a.dtype)])
        state[key + "folded_B"] = torch.cat([b, torch.zeros(extra, *b.shape[1:], dtype=b.dtype)])
        seeds, stds = state[key + "noise_seeds"], state[key + "noise_stds"]
        state[key + "noise_seeds"] = torch.cat([seeds, torch.arange(extra, dtype=seeds.dtype)])
        state[key + "noise_stds"] = torch.cat([stds, torch.full((extra,), 0.1, dtype=stds.dtype)])
        state[key + "cascades"] = torch.tensor(stages)
    save_file(state, weights)
    meta = json.loads(config.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(meta))
    return tmp_path / "ckpt"


def test_a_record_past_max_replay_stages_is_refused_before_any_change(tmp_path):
    directory = _long_record(tmp_path, cascade.MAX_REPLAY_STAGES + 1)
    model = _base()
    before = [p.detach().clone() for p in model.parameters()]
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"layer 0: LoRASC record: loading it replays {cascade.MAX_REPLAY_STAGES + 1} "
                                         rf"stages .* more than MAX_REPLAY_STAGES = {cascade.MAX_REPLAY_STAGES}"):
        fastlora.load_adapter(model, directory)
    assert time.perf_counter() - start < 5.0  # refused without replaying
    assert not _layers(model) and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_bound_counts_the_stages_a_load_replays(tmp_path, monkeypatch):
    monkeypatch.setattr(cascade, "MAX_REPLAY_STAGES", 2)
    model = fastlora.inject(_base(), CONFIG)
    _train(model, 4)  # two stages
    fastlora.save_adapter(model, tmp_path / "two")
    with pytest.warns(RuntimeWarning, match="more than MAX_REPLAY_STAGES = 2 stages"):
        _train(model, 4, seed=3)  # four stages
    fastlora.save_adapter(model, tmp_path / "four")
    with pytest.raises(ValueError, match="replays 4 stages"):
        fastlora.load_adapter(_base(), tmp_path / "four")
    partial = fastlora.load_adapter(_base(), tmp_path / "two")  # two replayed
    fastlora.load_adapter(partial, tmp_path / "four")  # W holds the first two: two more replayed
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(_layers(model), _layers(partial)))



def test_the_bound_warning_comes_with_the_first_stage_past_it_at_the_callers_line(monkeypatch):
    monkeypatch.setattr(cascade, "MAX_REPLAY_STAGES", 3)
    adapter = fastlora.inject(_base(), CONFIG).get_submodule("0").adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            adapter.cascade_step()
    with pytest.warns(RuntimeWarning, match="more than MAX_REPLAY_STAGES = 3 stages") as record:
        adapter.cascade_step()
    assert [w.filename for w in record] == [__file__]

# ----------------------------------------------------------------------------- several optimizers


@pytest.mark.parametrize("order", ["A first", "B first"])
def test_a_stage_end_leaves_every_optimizer_without_state_or_gradient_for_the_fresh_pair(order):
    model = fastlora.inject(_base(), CascadeLoraConfig(r=2, cascade_interval=2, noise_intensity=0.1))
    adapters = [layer.adapter for layer in _layers(model)]
    opt_a = torch.optim.Adam([a.lora_A for a in adapters], lr=0.01)
    opt_b = torch.optim.Adam([a.lora_B for a in adapters], lr=0.01)
    hooks = fastlora.attach_training_hooks(model, [opt_a, opt_b])
    steppers = (opt_a, opt_b) if order == "A first" else (opt_b, opt_a)
    for x, target in _batches(2):
        opt_a.zero_grad()
        opt_b.zero_grad()
        F.mse_loss(model(x), target).backward()
        for optimizer in steppers:
            optimizer.step()
    hooks.remove()
    for adapter in adapters:  # the stage ended after step 2: a fresh pair, whichever optimizer stepped last
        assert adapter.extra_stats()["cascades"] == 1.0
        assert torch.count_nonzero(adapter.lora_B) == 0
        for factor in (adapter.lora_A, adapter.lora_B):  # no gradient, or the zero one a later optimizer skips
            assert factor.grad is None or torch.count_nonzero(factor.grad) == 0
        assert adapter.lora_A not in opt_a.state and adapter.lora_B not in opt_b.state


def test_a_restartable_parameter_in_no_attached_optimizer_is_refused():
    model = fastlora.inject(_base(), CascadeLoraConfig(r=2, cascade_interval=2))
    adapters = [layer.adapter for layer in _layers(model)]
    opt_a = torch.optim.SGD([a.lora_A for a in adapters], lr=0.01)
    torch.optim.SGD([a.lora_B for a in adapters], lr=0.01)  # never attached: its state could not be dropped
    with pytest.raises(ValueError, match=r"layer 0: its cascade_lora parameter lora_B is trainable but in none of "
                                         r"the optimizers given"):
        fastlora.attach_training_hooks(model, opt_a)


def test_a_deepcopied_model_keeps_its_own_pending_stage():
    model = fastlora.inject(_base(), CONFIG)
    twin = copy.deepcopy(model)
    _train(model, 1)
    assert all(not layer.adapter.pending_start for layer in _layers(model))
    assert all(layer.adapter.pending_start for layer in _layers(twin))
    assert all(torch.equal(layer.weight, base.weight) for layer, base in zip(_layers(twin), (_base()[0], _base()[2])))

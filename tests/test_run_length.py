"""Step-scheduled methods fit the run they are in: CoDyRA's threshold schedule spans the run's length
(total_steps=None: Trainer's max_steps or attach_training_hooks(total_steps=N), refused when unknown),
LoRASC splits a run into stages_per_run stages, ends no stage on the run's final step and warns when a
run ended none; the resolved length is saved with the adapter."""
import hashlib
import json
import math
import re
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora import CascadeLoraConfig, FastLoraCallback, RankSelectiveLoraConfig
from fastlora.config import AdapterConfig

D = 6
W0 = [0.1, -0.3, 0.5, -0.7, 0.9, 1.5]  # |w| of the six ranks before the schedule


def _codyra(**kwargs):
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(D, D, dtype=torch.float64)),
                            RankSelectiveLoraConfig(r=len(W0), **kwargs))
    with torch.no_grad():
        model[0].adapter.importance.copy_(torch.tensor(W0, dtype=torch.float64))
    model[0].adapter.refresh_active_ranks()
    return model


def _proximal_only(model, steps, **attach):
    """``steps`` optimizer steps that leave w alone (lr 0): only the proximal step moves it."""
    optimizer = torch.optim.SGD([model[0].adapter.importance], lr=0.0)
    hooks = fastlora.attach_training_hooks(model, optimizer, **attach)
    for _ in range(steps):
        optimizer.step()
    hooks.remove()
    return model[0].adapter.importance.detach()


def _threshold_sum(total):
    """sum_t kappa(t) of a schedule over a ``total``-step run with the default dense fraction, levels and
    kappa_max: the peak kappa_max * 500 / total (the authors' 500-step budget)."""
    dense = min(round(0.5 * total), total - 1)
    peak = 0.005 * 500 / total
    return sum(peak * math.ceil(50 * (t - dense) / (total - dense)) / 50 for t in range(dense + 1, total + 1))


def test_codyra_schedule_spans_the_run_given_to_the_hooks():
    """48 steps: the whole staircase, its kappas scaled by 500 / 48, so the thresholds add up to 0.6625 (the
    authors' 500 steps: 0.6375; an absolute kappa_max over 48 steps: 0.064): the ranks below it are pruned,
    the rest shrunk by exactly that sum."""
    assert RankSelectiveLoraConfig().total_steps is None
    shrink = _threshold_sum(48)
    assert shrink == pytest.approx(0.6625, abs=1e-12) and _threshold_sum(500) == pytest.approx(0.6375, abs=1e-12)
    config = RankSelectiveLoraConfig()
    assert sum(config.kappa(t, 48) for t in range(1, 49)) == pytest.approx(shrink, abs=1e-12)
    w = _proximal_only(_codyra(), 48, total_steps=48)
    want = torch.tensor([math.copysign(max(abs(v) - shrink, 0.0), v) for v in W0], dtype=torch.float64)
    assert torch.allclose(w, want, rtol=0, atol=1e-12)
    assert int((w != 0).sum()) == 3  # 0.1, 0.3, 0.5 pruned; 0.7, 0.9, 1.5 kept
    stats = fastlora.adapter_stats(_codyra_after(48))
    assert stats["fastlora/rank_selective_lora/total_steps"] == 48.0


def _codyra_after(steps):
    model = _codyra()
    _proximal_only(model, steps, total_steps=steps)
    return model


def test_an_explicit_total_steps_keeps_its_schedule():
    w = _proximal_only(_codyra(total_steps=500), 48, total_steps=48)
    assert torch.equal(w, torch.tensor(W0, dtype=torch.float64))  # 48 steps of a 500-step schedule: dense


def test_codyra_without_a_known_length_is_refused():
    model = _codyra()
    optimizer = torch.optim.SGD([model[0].adapter.importance], lr=0.0)
    with pytest.raises(ValueError, match=r"rank_selective_lora layers schedule their rule over the run's length.*"
                                         r"total_steps=N"):
        fastlora.attach_training_hooks(model, optimizer)
    with pytest.raises(ValueError, match="needs the run's length"):
        model[0].adapter.after_optimizer_step(0.0)
    assert int(model[0].adapter.optimizer_steps) == 0  # refused before anything changed
    with pytest.raises(ValueError, match="total_steps must be an int > 0"):
        fastlora.attach_training_hooks(model, optimizer, total_steps=0)


def test_kappa_is_reported_as_0_once_the_schedule_is_done():
    model = _codyra(total_steps=4, dense_fraction=0.0, threshold_levels=1, kappa_max=0.05)
    optimizer = torch.optim.SGD([model[0].adapter.importance], lr=0.0)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    seen = []
    for _ in range(5):
        optimizer.step()
        seen.append(fastlora.adapter_stats(model)["fastlora/rank_selective_lora/kappa"])
    hooks.remove()
    assert seen == [0.05, 0.05, 0.05, 0.0, 0.0]


def test_the_resolved_length_is_saved_and_a_resumed_run_continues_its_schedule(tmp_path):
    whole = _codyra()
    _proximal_only(whole, 30, total_steps=30)
    half = _codyra()
    _proximal_only(half, 12, total_steps=30)
    assert int(half[0].adapter.run_steps) == 30
    fastlora.save_adapter(half, tmp_path / "ckpt")
    resumed = fastlora.load_adapter(nn.Sequential(nn.Linear(D, D, dtype=torch.float64)), tmp_path / "ckpt")
    assert resumed[0].adapter.total_steps == 30 and resumed[0].adapter._steps == 12
    w = _proximal_only(resumed, 18)  # no total_steps given: the checkpoint's run length
    assert torch.equal(w, whole[0].adapter.importance.detach())
    state = resumed[0].adapter.state_dict()
    assert int(state["run_steps"]) == 30


def _cascade(**kwargs):
    torch.manual_seed(0)
    return fastlora.inject(nn.Sequential(nn.Linear(D, D, dtype=torch.float64)),
                           CascadeLoraConfig(r=2, noise_intensity=0.0, **kwargs))


def _stage_ends(model, steps, **attach):
    """The optimizer steps (1-based) that ended a stage, and the warnings raised."""
    layer = model[0]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ends = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooks = fastlora.attach_training_hooks(model, optimizer, **attach)
        for step in range(1, steps + 1):
            optimizer.zero_grad()
            model.train()(x).square().mean().backward()
            before = layer.adapter._cascades
            optimizer.step()
            if layer.adapter._cascades != before:
                ends.append(step)
        hooks.remove()
    ours = [w for w in caught if "fastlora:" in str(w.message)]
    assert all(w.filename == __file__ for w in ours)  # the attach or step line above
    return ends, [str(w.message) for w in ours]


def test_stages_per_run_splits_the_run_and_leaves_the_last_stage_as_the_fast_pair():
    config = CascadeLoraConfig(r=2, stages_per_run=3)
    assert config.cascade_interval is None and AdapterConfig.from_dict(config.to_dict()) == config
    model = _cascade(stages_per_run=3)
    ends, messages = _stage_ends(model, 10, total_steps=10)
    assert ends == [4, 7] and messages == []  # ceil(10 / 3), ceil(20 / 3); not step 10
    assert float(model[0].adapter.lora_B.detach().abs().sum()) > 0  # the third stage: still the fast pair
    assert _stage_ends(_cascade(stages_per_run=4), 8, total_steps=8)[0] == [2, 4, 6]


def test_stages_per_run_without_a_known_length_is_refused():
    model = _cascade(stages_per_run=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=r"cascade_lora layers schedule their rule over the run's length"):
        fastlora.attach_training_hooks(model, optimizer)
    with pytest.raises(ValueError, match=r"stages_per_run=\.\.\.\) needs the run's length"):
        model[0].adapter.after_optimizer_step(0.1)


@pytest.mark.parametrize("kwargs, message", [({"stages_per_run": 0}, "stages_per_run must be an int > 0"),
                                             ({"stages_per_run": True}, "stages_per_run must be an int > 0"),
                                             ({"stages_per_run": 2, "cascade_interval": 5}, "not both"),
                                             ({"stages_per_run": 2, "cascade_interval": 100}, "not both"),
                                             ({"stages_per_run": 2, "cascade_interval": "epoch"},
                                              r"give stages_per_run \(2\) or cascade_interval \('epoch'\), not both")])
def test_stages_per_run_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CascadeLoraConfig(r=2, **kwargs)


def test_no_stage_ends_on_the_final_step_of_a_known_run():
    assert _stage_ends(_cascade(cascade_interval=5), 10, total_steps=10)[0] == [5]
    assert _stage_ends(_cascade(cascade_interval=5), 10)[0] == [5, 10]  # run length unknown: every 5th step


def test_a_run_that_ends_no_stage_warns():
    ends, messages = _stage_ends(_cascade(cascade_interval=100), 8, total_steps=8)  # 100 > 8 steps
    assert ends == [] and len(messages) == 1
    assert "end no stage in this run of 8 optimizer steps (cascade_interval=100, and no stage ends on the final" \
        in messages[0]
    assert "stages_per_run" in messages[0]
    assert _stage_ends(_cascade(cascade_interval=100), 8) == ([], [])  # length unknown: where the run ends is too
    ends, messages = _stage_ends(_cascade(), 8, total_steps=8, steps_per_epoch=8)  # a one-epoch run, the default
    assert ends == [] and len(messages) == 1
    assert "end no stage in this run of 8 optimizer steps (cascade_interval='epoch', 8 optimizer steps per epoch, " \
        "and no stage ends on the final step)" in messages[0]
    assert _stage_ends(_cascade(stages_per_run=1), 8, total_steps=8) == ([], [])  # one stage: the user's choice
    assert _stage_ends(_cascade(cascade_interval=3), 8, total_steps=8) == ([3, 6], [])
    ends, messages = _stage_ends(_cascade(cascade_interval=8), 8, total_steps=8)  # its one end: the final step
    assert ends == [] and len(messages) == 1 and "(cascade_interval=8," in messages[0]


def test_a_started_layer_keeps_its_run_length():
    model = _codyra()
    _proximal_only(model, 3, total_steps=30)
    with pytest.warns(RuntimeWarning, match="have taken 3 optimizer steps of a run of 30; they keep") as record:
        fastlora.training.set_run_length(model, 40)
    assert [w.filename for w in record] == [__file__]
    assert model[0].adapter.total_steps == 30


def test_the_trainer_callback_gives_the_run_length():
    class State:
        max_steps, global_step = 48, 0
    model = _codyra()
    callback = FastLoraCallback(save_adapters=False)
    optimizer = torch.optim.SGD([model[0].adapter.importance], lr=0.0)
    callback.on_train_begin(None, State(), None, model=model, optimizer=optimizer)
    for _ in range(48):
        optimizer.step()
    callback.on_train_end(type("Args", (), {"learning_rate": 0.0})(),
                          type("S", (), {"global_step": 48, "log_history": []})(), None, model=model)
    assert model[0].adapter.total_steps == 48
    assert int((model[0].adapter.importance != 0).sum()) == 3


def test_a_checkpoint_of_an_earlier_version_without_run_steps_loads(tmp_path):
    """Adapter checkpoints and state dicts written before the run length was saved lack ``run_steps``:
    they load (load_adapter and a strict load_state_dict alike), keeping the layer's own value."""
    from safetensors.torch import load_file, save_file

    model = _codyra(total_steps=500)
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    fastlora.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert [k for k in tensors if k.endswith("run_steps")] == ["0.adapter.run_steps"]
    save_file({k: v for k, v in tensors.items() if not k.endswith("run_steps")}, weights)
    config_file = tmp_path / "adapter_config.json"
    meta = json.loads(config_file.read_text())  # the config names the weights file it was saved with
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config_file.write_text(json.dumps(meta))
    fresh = fastlora.load_adapter(nn.Sequential(nn.Linear(D, D, dtype=torch.float64)), tmp_path)
    assert torch.equal(fresh[0].adapter.lora_B, model[0].adapter.lora_B)
    assert fresh[0].adapter.total_steps == 500
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("run_steps")}
    other = _codyra(total_steps=500)
    other.load_state_dict(state)
    assert torch.equal(other[0].adapter.lora_B, model[0].adapter.lora_B)


def _two_codyra_layers():
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(D, D, dtype=torch.float64), nn.Linear(D, D, dtype=torch.float64)),
                            RankSelectiveLoraConfig(r=2))
    return model


@pytest.mark.parametrize("new_length", [5, 40])  # shorter and longer than the run the layer started
def test_a_layer_started_by_one_step_keeps_its_length_and_a_fresh_one_takes_the_new(new_length):
    model = _two_codyra_layers()
    first, second = (torch.optim.SGD([model[i].adapter.importance], lr=0.0) for i in (0, 1))
    hooks = fastlora.attach_training_hooks(model, [first, second], total_steps=30)
    first.step()  # only layer 0 steps
    hooks.remove()
    assert (model[0].adapter._steps, model[1].adapter._steps) == (1, 0)
    with pytest.warns(RuntimeWarning, match="have taken 1 optimizer steps of a run of 30; they keep"):
        fastlora.training.set_run_length(model, new_length)
    assert (model[0].adapter.total_steps, model[1].adapter.total_steps) == (30, new_length)


@pytest.mark.parametrize("bad", [10.0, "10", True, 0, -3, 2**63, 10**30])
def test_set_run_length_takes_a_positive_int_only(bad):
    with pytest.raises(ValueError, match=r"total_steps must be an int > 0 \(the run's optimizer steps\) and below "
                                         rf"2\*\*63 \(an int64 buffer keeps it\), got {re.escape(repr(bad))}"):
        fastlora.training.set_run_length(_codyra(), bad)
    model = _codyra()
    fastlora.training.set_run_length(model, 1)  # a one-step run is a run
    assert model[0].adapter.total_steps == 1
    fastlora.training.set_run_length(model, 2**63 - 1)  # the longest an int64 buffer holds
    assert int(model[0].adapter.run_steps) == 2**63 - 1 == model[0].adapter.total_steps


@pytest.mark.parametrize("model, total", [(_two_codyra_layers, 10**30),
                                          (lambda: fastlora.inject(nn.Sequential(nn.Linear(D, D), nn.Linear(D, D)),
                                                                   CascadeLoraConfig(r=2, stages_per_run=2)), 2**63)])
def test_a_run_length_past_int64_is_refused_before_any_layer_changes(model, total):
    """Every layer's host copy and buffer stay unknown (0): none took the length before the buffer overflowed."""
    model = model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=rf"total_steps must be an int > 0 .* below 2\*\*63 .*got {total}"):
        fastlora.attach_training_hooks(model, optimizer, total_steps=total)
    assert [(layer.adapter._run_steps, int(layer.adapter.run_steps)) for _, layer in fastlora.adapter_layers(model)] \
        == [(0, 0), (0, 0)]
    assert fastlora.training.attached_hooks(model) is None

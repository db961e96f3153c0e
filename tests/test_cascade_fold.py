"""LoRASC folds its stages into W in place: the adapter keeps only the small stage record (no d_out x d_in
tensor), adapter-only checkpoints grow by r (d_in + d_out) numbers per stage, loading replays the record on
the pretrained W bit for bit (and never twice, whatever W already holds: a prefix of the stages, the current
stage's noise), refuses a W holding stages of other data, restore_pretrained gives the kept copy back; float64
replay of the record from the config's formulas."""
import copy
import dataclasses
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import fastlora
from fastlora import CascadeLoraConfig

from utils import rel

D_IN, D_HID, D_OUT, N = 40, 24, 16, 9
MIX = 1_000_003
CONFIG = CascadeLoraConfig(r=2, alpha=3.0, cascade_interval=2, slow_momentum=0.3, noise_intensity=0.2, noise_seed=5)


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def _train(model, steps, seed=1):
    """``steps`` SGD steps with hooks (a stage ends every second step)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    for _ in range(steps):
        x, target = torch.randn(N, D_IN), torch.randn(N, D_OUT)
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    hooks.remove()
    return model


def _trained(steps, config=CONFIG):
    return _train(fastlora.inject(_base(), config), steps)


def _layers(model):
    return [layer for _, layer in fastlora.adapter_layers(model)]


def _snapshot(model):
    """Every W and adapter tensor of the model, cloned."""
    return [(layer.weight.detach().clone(), {k: v.clone() for k, v in layer.adapter.state_dict().items()})
            for layer in _layers(model)]


def _same(model, snapshot):
    return all(torch.equal(layer.weight, w) and layer.adapter.state_dict().keys() == state.keys()
               and all(torch.equal(t, state[k]) for k, t in layer.adapter.state_dict().items())
               for layer, (w, state) in zip(_layers(model), snapshot))


def test_the_adapter_holds_no_dense_tensor():
    model = _trained(6)  # three stages
    for layer in _layers(model):
        adapter = layer.adapter
        d_out, d_in, r = layer.out_features, layer.in_features, CONFIG.r
        tensors = [*adapter.parameters(), *adapter.buffers(), *adapter.state_dict().values()]
        assert all(t.numel() < d_out * d_in for t in tensors)
        state = adapter.state_dict()
        assert state["folded_A"].shape == (3, r, d_in) and state["folded_B"].shape == (3, d_out, r)
        assert sum(t.numel() for t in state.values()) == (3 + 1) * r * (d_in + d_out) + 2 * (3 + 1) + 6  # 6 counters
        assert adapter.pretrained is None


def test_keep_pretrained_copy_is_host_memory_outside_the_state_dict():
    model = fastlora.inject(_base(), CascadeLoraConfig(r=2, keep_pretrained_copy=True))
    for layer, pretrained in zip(_layers(model), (_base()[0].weight, _base()[2].weight)):
        copy_ = layer.adapter.pretrained
        assert copy_.device.type == "cpu" and torch.equal(copy_, pretrained)
        assert all(t is not copy_ for t in (*layer.adapter.buffers(), *layer.adapter.state_dict().values()))


def test_checkpoint_size_grows_by_one_pair_per_stage(tmp_path):
    sizes = {}
    for steps in (2, 6):
        fastlora.save_adapter(_trained(steps), tmp_path / str(steps))
        sizes[steps] = os.path.getsize(tmp_path / str(steps) / "adapter_model.safetensors")
    pair_bytes = 4 * CONFIG.r * ((D_IN + D_HID) + (D_HID + D_OUT))  # float32 pairs of both layers
    grown = sizes[6] - sizes[2]  # two stages more: two pairs and two noise records (seed, std) per layer
    assert 2 * pair_bytes + 2 * 2 * 16 <= grown <= 2 * pair_bytes + 2 * 2 * 16 + 64  # + header digits
    assert sizes[6] <= (3 + 1) * pair_bytes + 2 * (3 + 1) * 16 + 2 * 2 * 8 + 2048  # the pairs, records, header


def _replay_float64(pretrained, state, config, layer_index, stages):
    """W from the pretrained W by the paper's formulas in float64: seeds from the config, std of the
    current W, fold (1 - m) s B_k A_k with the checkpoint's pairs."""
    w = pretrained.double().clone()
    scale = config.alpha / config.r * (1 - config.slow_momentum)
    for k in range(stages + 1):
        seed = ((config.noise_seed * MIX + layer_index) * MIX + k) % 2**63
        std = float(w.std())
        assert int(state["noise_seeds"][k]) == seed and float(state["noise_stds"][k]) == pytest.approx(std, rel=1e-5)
        u = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
        w = w + (u - 0.5) * config.noise_intensity * std
        if k < stages:
            w = w + scale * state["folded_B"][k].double() @ state["folded_A"][k].double()
    return w


def test_save_load_into_the_pretrained_model_is_bit_for_bit_and_matches_float64(tmp_path):
    model = _trained(7)  # three stages and one step into the fourth
    fastlora.save_adapter(model, tmp_path / "ckpt")
    loaded = fastlora.load_adapter(_base(), tmp_path / "ckpt")
    assert _same(loaded, _snapshot(model))
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    state = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    for index, (name, pretrained) in enumerate((("0", _base()[0].weight), ("2", _base()[2].weight))):
        layer_state = {k.split(".adapter.")[1]: v for k, v in state.items() if k.startswith(f"{name}.adapter.")}
        assert int(layer_state["cascades"]) == 3
        expected = _replay_float64(pretrained.detach(), layer_state, CONFIG, index, 3)
        assert rel(loaded.get_submodule(name).weight, expected) < 1e-6
    _train(loaded, 3, seed=9)  # both continue identically
    _train(model, 3, seed=9)
    assert _same(loaded, _snapshot(model))


def test_loading_never_applies_a_stage_twice(tmp_path):
    model = _trained(4)
    fastlora.save_adapter(model, tmp_path / "two")
    _train(model, 4, seed=2)
    fastlora.save_adapter(model, tmp_path / "four")
    final = _snapshot(model)
    fastlora.load_adapter(model, tmp_path / "four")  # W holds every stage of it: nothing replayed
    assert _same(model, final)
    partial = fastlora.load_adapter(_base(), tmp_path / "two")
    fastlora.load_adapter(partial, tmp_path / "four")  # W holds the first two: only the last two replayed
    assert _same(partial, final)


def test_a_load_replays_onto_a_w_holding_an_odd_count_of_stages_or_a_stages_noise(tmp_path):
    """W holding one stage (a prefix of odd length), or holding the current stage's noise already (its first
    training forward ran): the load replays only what W lacks."""
    fastlora.save_adapter(_trained(2), tmp_path / "one")
    fastlora.save_adapter(_trained(4), tmp_path / "two")
    three = _trained(6)
    final = _snapshot(three)
    fastlora.save_adapter(three, tmp_path / "three")
    odd = fastlora.load_adapter(_base(), tmp_path / "one")
    fastlora.load_adapter(odd, tmp_path / "three")
    assert _same(odd, final)
    noisy = fastlora.load_adapter(_base(), tmp_path / "two")
    assert all(layer.adapter.pending_start for layer in _layers(noisy))
    with torch.no_grad():
        noisy.train()(torch.randn(N, D_IN))  # stage 2's noise enters W
    assert not any(layer.adapter.pending_start for layer in _layers(noisy))
    fastlora.load_adapter(noisy, tmp_path / "three")
    assert _same(noisy, final)


def test_a_w_holding_stages_of_other_data_with_the_same_noise_is_refused(tmp_path):
    """Same config (same noise seeds) trained on other data: W's stage is not the checkpoint's first."""
    fastlora.save_adapter(_trained(4), tmp_path / "two")
    other = _train(fastlora.inject(_base(), CONFIG), 2, seed=7)
    own = other.get_submodule("0").adapter
    assert torch.equal(own.noise_seeds, load_file(tmp_path / "two" / "adapter_model.safetensors")[
        "0.adapter.noise_seeds"][:2])
    before = _snapshot(other)
    with pytest.raises(ValueError, match=r"layer 0: W holds 1 LoRASC stages .* keep_pretrained_copy=True"):
        fastlora.load_adapter(other, tmp_path / "two")
    assert _same(other, before)


def test_a_whole_model_state_dict_brings_its_own_w():
    """model.load_state_dict (a Trainer resuming) loads W with its stages: nothing is replayed on top."""
    model = _trained(5)
    fresh = fastlora.inject(_base(), CONFIG)
    fresh.load_state_dict(model.state_dict())
    assert _same(fresh, _snapshot(model))


def test_a_w_of_another_history_is_refused_unless_the_pretrained_copy_is_kept(tmp_path):
    fastlora.save_adapter(_trained(4), tmp_path / "ckpt")
    expected = _snapshot(fastlora.load_adapter(_base(), tmp_path / "ckpt"))
    model = _trained(6)  # one stage past the checkpoint's
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer 0: W holds 3 LoRASC stages .* keep_pretrained_copy=True"):
        fastlora.load_adapter(model, tmp_path / "ckpt")
    assert _same(model, before)  # refused before any layer changed
    kept = _trained(6, dataclasses.replace(CONFIG, keep_pretrained_copy=True))
    fastlora.load_adapter(kept, tmp_path / "ckpt")  # restored from the copy, the checkpoint's stages replayed
    assert _same(kept, expected)


def test_restore_pretrained_gives_the_kept_copy_back_bit_for_bit():
    model = _trained(5, dataclasses.replace(CONFIG, keep_pretrained_copy=True))
    layer = model[0]
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        layer.adapter.restore_pretrained()
    layer.unmerge()
    for layer, pretrained in zip(_layers(model), (_base()[0].weight, _base()[2].weight)):
        pair = layer.adapter.lora_B.detach().clone()
        layer.adapter.restore_pretrained()
        assert torch.equal(layer.weight, pretrained)
        assert torch.equal(layer.adapter.lora_B, pair) and layer.adapter.extra_stats()["cascades"] == 0
        assert layer.adapter.folded_A.shape[0] == 0 and layer.adapter.noise_stds.tolist() == [0.0]
    with pytest.raises(ValueError, match="keep_pretrained_copy=True"):
        _trained(1).get_submodule("0").adapter.restore_pretrained()


def test_malformed_records_are_refused():
    adapter = _trained(4)[0].adapter
    state = dict(adapter.state_dict())
    nan_std, inf_std, inf_a, nan_b = (state[key].clone() for key in ("noise_stds", "noise_stds", "folded_A",
                                                                        "folded_B"))
    nan_std[1], inf_std[1], inf_a[0, 0, 0], nan_b[1, 0, 0] = float("nan"), float("inf"), float("inf"), float("nan")
    for key, bad in (("noise_seeds", state["noise_seeds"][:-1]), ("folded_A", state["folded_A"][:1]),
                     ("noise_stds", -state["noise_stds"]), ("noise_stds", state["noise_stds"][:-1]),
                     ("cascades", torch.tensor(5)), ("noise_stds", nan_std), ("noise_stds", inf_std),
                     ("folded_A", inf_a), ("folded_B", nan_b)):
        with pytest.raises(ValueError, match="LoRASC record"):
            adapter.check_state({**state, key: bad})


def _other_base():
    """A model of ``_base``'s shapes with other weights (another pretrained model)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def _std_mismatch(recorded, actual, stage=0):
    """The refusal's message as a regex: the layer (at its stage ``stage``), the recorded and the actual std."""
    return re.escape(f"LoRASC layer 0 (40 -> 24), stage {stage}: LoRASC record: stage 0's noise was drawn with "
                     f"std(W) = {recorded:.9g}, but the W it would be added to has std {actual:.9g}: the checkpoint "
                     f"was trained on another base model")


def test_a_checkpoint_trained_on_another_base_model_is_refused_before_anything_changes(tmp_path):
    """Stage 0's noise of the checkpoint was drawn with std(W) of its base: replaying it onto a W of another
    std (a fresh model of another base, or the kept pretrained copy of one) is refused, the layer named."""
    fastlora.save_adapter(_trained(3), tmp_path / "ckpt")
    recorded = float(load_file(tmp_path / "ckpt" / "adapter_model.safetensors")["0.adapter.noise_stds"][0])
    assert recorded == float(_base()[0].weight.detach().std())
    other = _other_base()
    actual = float(other[0].weight.detach().std())
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="layer 0: " + _std_mismatch(recorded, actual)):
        fastlora.load_adapter(other, tmp_path / "ckpt")
    assert not _layers(other) and all(torch.equal(p, b) for p, b in zip(other.parameters(), before))
    fresh = fastlora.inject(_other_base(), CONFIG)
    snapshot = _snapshot(fresh)
    state = {k.split(".adapter.")[1]: v for k, v in load_file(tmp_path / "ckpt" / "adapter_model.safetensors").items()
             if k.startswith("0.adapter.")}
    with pytest.raises(ValueError, match=_std_mismatch(recorded, actual)):
        fresh[0].adapter.load_state_dict(state)  # the state-dict path checks it too
    assert _same(fresh, snapshot)
    kept = _train(fastlora.inject(_other_base(), dataclasses.replace(CONFIG, keep_pretrained_copy=True)), 2)
    snapshot = _snapshot(kept)
    with pytest.raises(ValueError, match="layer 0: " + _std_mismatch(recorded, actual, stage=1)):
        fastlora.load_adapter(kept, tmp_path / "ckpt")  # restored from its copy: the other base's W
    assert _same(kept, snapshot)


@pytest.mark.parametrize("trained, loaded", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                              (torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_a_checkpoint_loads_into_the_same_pretrained_model_in_another_dtype(tmp_path, trained, loaded):
    """The pretrained W in another precision has a std off by its rounding (2.8e-5 relative in bf16), which the
    1e-6 check refused as another base model; the record's pairs take the loading model's pair dtype."""
    base = _base().to(trained)
    base.register_forward_pre_hook(lambda module, inputs: (inputs[0].to(trained),))  # fp32 batches
    base.register_forward_hook(lambda module, inputs, output: output.float())
    fastlora.save_adapter(_train(fastlora.inject(base, CONFIG), 3), tmp_path / "ckpt")
    model = fastlora.load_adapter(_base().to(loaded), tmp_path / "ckpt")
    adapter = model[0].adapter
    assert adapter.cascades == 1 and adapter.folded_A.dtype == adapter.lora_A.dtype == model[0].adapter.folded_B.dtype
    reference = fastlora.load_adapter(_base().to(trained), tmp_path / "ckpt")
    assert rel(model[0].weight.double(), reference[0].weight.double()) < 3 * torch.finfo(torch.bfloat16).eps
    with pytest.raises(ValueError, match="the checkpoint was trained on another base model"):
        fastlora.load_adapter(_other_base().to(loaded), tmp_path / "ckpt")


def test_a_recorded_std_whose_noise_would_overflow_w_is_refused():
    """noise_stds of 1e300 are finite float64 numbers, but lambda * 1e300 is no float32: the noise would
    write inf into W. A float64 W holds that noise, but 1e300 is not its std."""
    adapter = _trained(4)[0].adapter  # stages 0 and 1 folded, stage 2's noise pending
    state = dict(adapter.state_dict())
    fresh = fastlora.inject(_base(), CONFIG)[0]
    for stage in (0, 1, 2):
        stds = state["noise_stds"].clone()
        stds[stage] = 1e300
        with pytest.raises(ValueError, match=r"LoRASC layer 0 \(40 -> 24\), stage 0: LoRASC record: noise_stds up "
                                             r"to 1e\+300 at noise_intensity 0.2 would overflow W's torch.float32 "
                                             r"\(largest value 3.40282e\+38\) with inf"):
            fresh.adapter.check_state({**state, "noise_stds": stds})
    wide = fastlora.inject(_base().double(), CONFIG)[0]
    stds = state["noise_stds"].clone()
    stds[0] = 1e300
    with pytest.raises(ValueError, match=_std_mismatch(1e300, float(wide.weight.std()))):
        wide.adapter.check_state({**state, "noise_stds": stds})
    assert torch.isfinite(wide.weight).all() and torch.isfinite(fresh.weight).all()


def test_stages_reach_the_layer_after_next_task_and_in_a_deepcopy():
    model = _trained(2)
    fastlora.next_task(model)
    for layer in _layers(model):
        with torch.no_grad():
            layer.adapter.lora_B.normal_()
        weight = layer.weight.detach().clone()
        twin = copy.deepcopy(layer)
        twin.adapter.cascade_step()  # the copy's W moves, not the original's
        assert torch.equal(layer.weight, weight) and not torch.equal(twin.weight, weight)
        layer.adapter.cascade_step()
        assert torch.equal(layer.weight, twin.weight)


def test_a_failed_inject_leaves_every_weight_as_it_was():
    """inject writes no W (LoRASC's stage-0 noise waits for the first training forward): a later layer's
    failure (its rank does not fit) leaves the earlier layers' W untouched, and a retry works."""
    model = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="layer '1'"):
        fastlora.inject(model, CascadeLoraConfig(r=4, noise_intensity=0.5))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    fastlora.inject(model, CascadeLoraConfig(r=2, noise_intensity=0.5))
    assert all(torch.equal(p, b) for p, b in zip((model[0].weight, model[0].bias, model[1].weight, model[1].bias),
                                                 before))
    model(torch.randn(3, 10))  # the first training forward adds the noise
    assert not torch.equal(model[0].weight, before[0])

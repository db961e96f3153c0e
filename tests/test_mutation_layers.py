"""Layer, method and distributed edges the mutation sample showed unguarded: weights that overlap in one
storage, the layer's repr, LoRA's initialisation bound, NEAT on inference tensors, LoRASC's seeds for large
noise seeds, build_adapter's default layer index, a full value of the wrong shape for a sharded parameter, Selective
LoRA's gate tensor, its score as an inference tensor and its count of gate switches, NEAT's projection cache under
autocast."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastlora
from fastlora import AdapterLinear, CascadeLoraConfig, CurLoraConfig, LoraConfig, NeatConfig, SelectiveLoraConfig
from fastlora.methods import build_adapter

from utils import rel


def _views_of_one_storage(first_row, second_row):
    """Two Linear(3 -> 4) whose weights are rows [first_row, first_row + 4) and [second_row, ...) of one tensor."""
    torch.manual_seed(0)
    storage = torch.randn(12, 3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(3, 4))
    model[0].weight = nn.Parameter(storage[first_row:first_row + 4])
    model[1].weight = nn.Parameter(storage[second_row:second_row + 4])
    return fastlora.inject(model, LoraConfig(r=2, target_modules=["0", "1"]))


def test_merge_refuses_weights_that_overlap_by_one_row_and_accepts_adjacent_ones():
    with pytest.raises(ValueError, match=r"cannot merge layer '0': its weight shares memory with \['1.weight'\]"):
        fastlora.merge(_views_of_one_storage(1, 4))
    adjacent = _views_of_one_storage(0, 4)
    fastlora.merge(adjacent)
    assert all(layer.merged for _, layer in fastlora.adapter_layers(adjacent))


def test_repr_names_method_rank_merge_state_and_transposed_weights():
    linear = AdapterLinear(5, 4, config=LoraConfig(r=2))
    assert linear.extra_repr() == "in_features=5, out_features=4, bias=True, method=lora, r=2, merged=False"
    conv = fastlora.inject(nn.Sequential(Conv1D(4, 5)), LoraConfig(r=2, target_modules=["0"]))[0]
    assert conv.extra_repr() == "in_features=5, out_features=4, bias=True, method=lora, r=2, merged=False, " \
        "fan_in_fan_out=True"


def test_lora_a_is_kaiming_uniform_with_bound_one_over_sqrt_d_in():
    torch.manual_seed(3)
    d_in = 64
    a = AdapterLinear(d_in, 48, config=LoraConfig(r=32)).adapter.lora_A.detach()
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt 5): sqrt(6 / ((1 + 5) d_in))
    assert 0.99 * bound < a.abs().max() <= bound and abs(float(a.mean())) < 0.05 * bound


def test_neat_built_under_inference_mode_runs_in_eval_and_follows_its_weights():
    with torch.inference_mode():
        torch.manual_seed(4)
        layer = AdapterLinear(7, 6, config=NeatConfig(r=3, scale=0.5), dtype=torch.float64).eval()
        layer.adapter.neat_B.copy_(torch.randn(6, 3, dtype=torch.float64))
    x = torch.randn(5, 7, dtype=torch.float64)

    def expected():
        a_n, b_n, w = layer.adapter.neat_A, layer.adapter.neat_B, layer.weight
        return F.linear(x, w, layer.bias) + 0.5 * (x @ torch.relu(w.T @ a_n.T)) @ b_n.T

    with torch.no_grad():
        assert rel(layer(x), expected()) < 1e-12
        with torch.inference_mode():
            layer.adapter.neat_A.mul_(2.0)  # an inference tensor has no version: nothing may be cached
        assert rel(layer(x), expected()) < 1e-12


def test_cascade_noise_seed_reduces_modulo_2_63_for_large_seeds():
    mix = 1_000_003  # the documented mixing constant
    seed = 2**31 - 1
    layer = AdapterLinear(6, 5, config=CascadeLoraConfig(r=2, noise_seed=seed))
    for stage in (0, 3):
        assert layer.adapter.noise_seed_of(stage) == ((seed * mix + 0) * mix + stage) % 2**63


def test_build_adapter_defaults_to_the_first_layers_sampling():
    torch.manual_seed(5)
    weight = torch.randn(9, 11)
    config = CurLoraConfig(r=3)
    default, first = build_adapter(config, 11, 9, weight), build_adapter(config, 11, 9, weight, layer_index=0)
    assert torch.equal(default.row_index, first.row_index) and torch.equal(default.col_index, first.col_index)
    assert not torch.equal(build_adapter(config, 11, 9, weight, layer_index=1).col_index, first.col_index)


def test_a_full_value_must_have_the_sharded_parameters_global_shape(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fastlora.distributed import local_part

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        like = distribute_tensor(torch.zeros(4, 3), init_device_mesh("cpu", (1,)), [Shard(0)])
        full = torch.randn(4, 3)
        assert torch.equal(local_part(full, like), full)
        for shape in [(5, 3), (3, 3), (4, 2)]:
            with pytest.raises(ValueError, match=rf"full value of shape \({shape[0]}, {shape[1]}\) does not match"):
                local_part(torch.zeros(shape), like)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("score", [0.3, 0.05])
def test_selective_gate_is_exactly_the_hard_gate_with_a_unit_straight_through_gradient(score):
    adapter = AdapterLinear(6, 5, config=SelectiveLoraConfig(r=2)).train().adapter
    with torch.no_grad():
        adapter.score.fill_(score)
    adapter.refresh_gate()
    gate = adapter.gate()
    assert gate.item() == (1.0 if score >= 0.1 else 0.0)  # TAPS's tau = 0.1
    (gradient,) = torch.autograd.grad(gate, adapter.score)
    assert gradient.item() == 1.0


def test_selective_built_under_inference_mode_follows_its_score():
    """An inference tensor has no version counter: the gate is read from the score at every call."""
    with torch.inference_mode():
        torch.manual_seed(6)
        layer = AdapterLinear(7, 6, config=SelectiveLoraConfig(r=3, threshold=0.1, score_init=0.5),
                              dtype=torch.float64).eval()
        layer.adapter.lora_B.copy_(torch.randn(6, 3, dtype=torch.float64))
    x = torch.randn(5, 7, dtype=torch.float64)
    base = F.linear(x, layer.weight, layer.bias)
    with torch.inference_mode():
        assert rel(layer(x), base) > 1e-3
        layer.adapter.score.fill_(0.0)  # below the threshold: the block is off
        assert torch.equal(layer(x), base)


def test_selective_gate_changes_count_switches_both_ways():
    layer = AdapterLinear(5, 4, config=SelectiveLoraConfig(r=2, threshold=0.1, score_init=0.5))
    x = torch.randn(3, 5)
    for score in (0.5, 0.0, 0.0, 0.3, 0.2, -1.0):  # on, off, off, on, on, off: three switches
        with torch.no_grad():
            layer.adapter.score.fill_(score)
        layer(x)
    assert layer.adapter.extra_stats()["gate_changes"] == 3.0


def test_neat_projection_cache_is_keyed_by_the_autocast_dtype_and_train_defaults_to_training():
    """A projection cached under one autocast dtype (its encoder and decoder run in it) is not reused under
    another, nor outside autocast."""
    torch.manual_seed(9)
    layer = AdapterLinear(16, 12, config=NeatConfig(r=4, depth=1, scale=0.5)).eval()
    with torch.no_grad():
        layer.adapter.neat_B.normal_()
    x = torch.randn(5, 16)
    fresh = {}
    with torch.no_grad():
        for dtype in (None, torch.bfloat16, torch.float16):
            layer.adapter.clear_cache()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                fresh[dtype] = layer(x)
        for dtype in (torch.bfloat16, torch.float16, None, torch.float16):  # each after another's cache
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                assert torch.equal(layer(x), fresh[dtype]), dtype
    layer.adapter.eval()
    assert layer.adapter.train().training

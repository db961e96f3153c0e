"""AdapterLinear's adapter bookkeeping and state dict at their edges: adapters named by equal strings that are
other objects, removal whatever the names' order, an adapter-only load, a
Conv1D layer refusing a weight of the wrong rank with load_state_dict's own message, from_linear's default layer
index, forward_rows in each state, and a layer on the meta device."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from fastlora import (
    AdapterLinear,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.methods import build_adapter

from utils import rel


def _nonzero_b(adapter):
    with torch.no_grad():
        adapter.lora_B.normal_()  # B starts at zero: a nonzero update makes merging visible
    return adapter


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = AdapterLinear(6, 5, config=LoraConfig(r=2))
    _nonzero_b(layer.adapter)
    return layer


def _named(layer, name, seed):
    torch.manual_seed(seed)
    adapter = _nonzero_b(build_adapter(LoraConfig(r=2), 6, 5, layer.weight.detach()))
    layer.add_named_adapter(name, adapter)
    return adapter


def test_adapters_are_found_by_equal_names_that_are_other_string_objects():
    layer = _layer()
    other = _named(layer, "other", seed=1)
    active_name, other_name = "".join(["def", "ault"]), "".join(["oth", "er"])  # built at run time: not interned
    assert active_name is not layer.adapter_name
    assert layer.named_adapter(active_name) is layer.adapter
    assert layer.named_adapter(other_name) is other
    layer.activate(active_name)  # already active: nothing changes
    assert layer.adapter_name == "default" and layer.adapter_names() == ["default", "other"]


@pytest.mark.parametrize("name", ["alpha", "zeta"])  # sorting before and after the active "default"
def test_an_inactive_adapter_is_removed_whatever_its_name_sorts_against_the_active_one(name):
    layer = _layer()
    _named(layer, name, seed=1)
    layer.remove_adapter(name)
    assert layer.adapter_names() == ["default"]
    with pytest.raises(ValueError, match="'default' is the active adapter"):
        layer.remove_adapter("".join(["def", "ault"]))


def test_an_adapter_only_state_dict_loads_without_strict_and_reports_w_and_b_missing():
    layer, source = _layer(), _layer(seed=1)
    weight = layer.weight.clone()
    adapter_only = {k: v for k, v in source.state_dict().items() if k not in ("weight", "bias")}
    missing, unexpected = layer.load_state_dict(adapter_only, strict=False)
    assert sorted(missing) == ["bias", "weight"] and not unexpected
    assert torch.equal(layer.adapter.lora_A, source.adapter.lora_A) and torch.equal(layer.weight, weight)


def test_a_conv1d_layer_refuses_a_weight_of_the_wrong_rank_with_load_state_dicts_message():
    torch.manual_seed(2)
    layer = AdapterLinear.from_linear(Conv1D(5, 6), LoraConfig(r=2))
    state = layer.state_dict()
    assert state["weight"].shape == (6, 5)  # Conv1D's (d_in, d_out) layout
    layer.load_state_dict(state)
    bad = {**state, "weight": state["weight"].reshape(6, 5, 1)}
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape "
                                           r"torch.Size\(\[6, 5, 1\]\)"):
        layer.load_state_dict(bad)
    assert bad["weight"].shape == (6, 5, 1)  # the caller's tensor is put back


def test_from_linear_defaults_to_the_first_layers_sampling():
    """CURLoRA samples its rows and columns per layer index: a wrapped Linear samples as layer 0 by default."""
    torch.manual_seed(5)
    linear = torch.nn.Linear(11, 9)
    config = CurLoraConfig(r=3)
    default, first = (AdapterLinear.from_linear(linear, config), AdapterLinear.from_linear(linear, config, 0))
    second = AdapterLinear.from_linear(linear, config, layer_index=1)
    assert torch.equal(default.adapter.row_index, first.adapter.row_index)
    assert torch.equal(default.adapter.col_index, first.adapter.col_index)
    assert not torch.equal(second.adapter.col_index, first.adapter.col_index)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_rows_are_rows_of_forward_adapted_merged_and_disabled(bias):
    """forward_rows (one block of a packed projection, e.g. a cross-attention's q) computes those output
    features of ``forward`` in every state of the layer, with dropout in training only."""
    torch.manual_seed(8)
    layer = AdapterLinear(6, 9, bias=bias, config=LoraConfig(r=2, dropout=0.3), dtype=torch.float64).eval()
    _nonzero_b(layer.adapter)
    x = torch.randn(4, 6, dtype=torch.float64)
    adapted = layer(x)
    for state in ("adapted", "merged", "disabled"):
        if state == "merged":
            layer.merge()
        if state == "disabled":
            layer.unmerge()
            layer.adapter_enabled = False
        full = layer(x)
        assert (rel(full, adapted) < 1e-12) == (state != "disabled")
        for start, stop in [(0, 3), (3, 9)]:
            assert rel(layer.forward_rows(x, start, stop), full[:, start:stop]) < 1e-12, state
    layer.adapter_enabled = True
    evaluated = layer.forward_rows(x, 0, 9)
    assert rel(layer.train().forward_rows(x, 0, 9), evaluated) > 1e-3  # dropout on x's low-rank path


def test_a_layer_on_the_meta_device_gives_meta_outputs_and_refuses_inputs_with_values():
    with torch.device("meta"):
        layer = AdapterLinear(6, 5, config=LoraConfig(r=2))
    out = layer(torch.empty(3, 6, device="meta"))
    assert out.is_meta and out.shape == (3, 5)
    rows = layer.forward_rows(torch.empty(3, 6, device="meta"), 1, 4)
    assert rows.is_meta and rows.shape == (3, 3)
    with pytest.raises(ValueError, match=r"this AdapterLinear \(6 -> 5\) is on the meta device \(no values\) and "
                                         r"the input on cpu"):
        layer(torch.randn(3, 6))


def test_a_lorasc_layer_built_on_the_meta_device_trains_after_to_empty():
    """LoRASC's stage record (folded pairs, seeds, stds: host tensors, not buffers) stays in host memory
    when the layer is built under torch.device("meta"): a training forward after to_empty starts a stage."""
    from fastlora import CascadeLoraConfig

    with torch.device("meta"):
        layer = AdapterLinear(16, 12, config=CascadeLoraConfig(r=4))
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 12)
    with torch.no_grad():
        layer.weight.copy_(plain.weight)
        layer.bias.copy_(plain.bias)
    layer.adapter.reset_parameters()
    record = {name: value for name, value in vars(layer.adapter).items() if isinstance(value, torch.Tensor)}
    assert record and all(value.device.type == "cpu" for value in record.values()), record
    x = torch.randn(3, 16)
    layer.train()(x).sum().backward()  # the stage's noise goes into W
    assert 0 < rel(layer.weight, plain.weight) < 0.5


@pytest.mark.parametrize("config", [
    LoraConfig(r=4), SelectiveLoraConfig(r=4, score_init=0.25), RankSelectiveLoraConfig(r=4, total_steps=10),
    RankSelectiveLoraConfig(r=4, total_steps=10, importance_init=0.5), NeatConfig(r=4, depth=1),
    CascadeLoraConfig(r=4)], ids=lambda config: type(config).__name__)
def test_reset_parameters_after_to_empty_gives_every_trainable_tensor_its_initial_value(config):
    """A layer built on the meta device holds no values after to_empty; adapter.reset_parameters() draws every
    trainable tensor as a layer built from a loaded Linear does (Selective's score, CoDyRA's importance too), given
    the same seed (NEAT's r x r layers draw twice when built: compared with a reset built layer)."""
    torch.manual_seed(1)
    plain = torch.nn.Linear(16, 12)
    with torch.device("meta"):
        empty = AdapterLinear(16, 12, config=config)
    empty.to_empty(device="cpu")
    with torch.no_grad():
        empty.weight.copy_(plain.weight)
        empty.bias.copy_(plain.bias)
    torch.manual_seed(2)
    built = AdapterLinear.from_linear(plain, config)
    if isinstance(config, NeatConfig):
        torch.manual_seed(2)
        built.adapter.reset_parameters()
    torch.manual_seed(2)
    empty.adapter.reset_parameters()
    expected = dict(built.adapter.named_parameters())
    assert expected.keys() == dict(empty.adapter.named_parameters()).keys()
    for name, value in empty.adapter.named_parameters():
        assert torch.equal(value, expected[name]), name
    if isinstance(config, SelectiveLoraConfig):
        assert empty.adapter.score.tolist() == [0.25] and empty.adapter.active
    if isinstance(config, RankSelectiveLoraConfig):
        assert empty.adapter.importance.abs().min() > 0 and empty.adapter.active_index.tolist() == [0, 1, 2, 3]
    counters = {name: int(b) for name, b in empty.adapter.state_dict().items() if b.dim() == 0
                and not b.is_floating_point()}
    assert counters and set(counters.values()) == {0}, counters  # uninitialised memory before (cascades ~1e14)
    x = torch.randn(3, 16)
    torch.testing.assert_close(empty.eval()(x), plain(x))  # B (NEAT's B_n) zeros: the base output


def test_a_curlora_layer_is_refused_on_the_meta_device_naming_why():
    with torch.device("meta"), pytest.raises(ValueError, match="CURLoRA draws its row and column indices from W's "
                                                               "values .* meta device"):
        AdapterLinear(16, 12, config=CurLoraConfig(r=4))


def test_a_lorasc_layer_keeping_a_pretrained_copy_is_refused_on_the_meta_device_naming_why():
    with torch.device("meta"), pytest.raises(ValueError, match=r"keep_pretrained_copy=True\) copies W's values .* "
                                                               r"meta device"):
        AdapterLinear(16, 12, config=CascadeLoraConfig(r=4, keep_pretrained_copy=True))
    with torch.device("meta"):
        assert AdapterLinear(16, 12, config=CascadeLoraConfig(r=4)).adapter.pretrained is None


@pytest.mark.parametrize("config", [LoraConfig(r=2), SelectiveLoraConfig(r=2), RankSelectiveLoraConfig(r=2),
                                    NeatConfig(r=2, depth=1), CascadeLoraConfig(r=2)],
                         ids=lambda config: type(config).__name__)
def test_every_method_gives_meta_outputs_for_meta_inputs(config):
    """As nn.Linear: the output's shape and dtype, in training mode too (Selective LoRA read its gate and NEAT
    ran its projection on the meta tensors, and raised inside torch)."""
    with torch.device("meta"):
        layer = AdapterLinear(6, 5, config=config)
    for x in (torch.empty(3, 6, device="meta"), torch.empty(2, 3, 6, device="meta", requires_grad=True)):
        out = layer.train()(x)
        assert out.is_meta and out.shape == (*x.shape[:-1], 5) and out.dtype == torch.float32
    assert layer.forward_rows(torch.empty(3, 6, device="meta"), 1, 4).shape == (3, 3)

"""Configs refuse wrong types, unbounded sizes and unsafe regexes up front, and cannot change afterwards."""
import dataclasses
import re
import time

import pytest
import torch
from torch import nn

import fastlora
from fastlora import (
    AdapterConfig,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.config import MAX_NEAT_DEPTH
from fastlora.safe_regex import MAX_REGEX_REPETITIONS


@pytest.mark.parametrize("config_type, kwargs, match", [
    (LoraConfig, {"use_rslora": "no"}, "use_rslora must be True or False, got 'no'"),
    (LoraConfig, {"use_rslora": 1}, "use_rslora must be True or False, got 1"),
    (LoraConfig, {"alpha": True}, "alpha must be a finite number > 0, got True"),
    (LoraConfig, {"dropout": True}, r"dropout must be a number in \[0, 1\), got True"),
    (LoraConfig, {"dropout": "0.1"}, r"dropout must be a number in \[0, 1\), got '0.1'"),
    (LoraConfig, {"backend": ["torch"]},
     r"backend must be one of \('auto', 'triton', .*\), got \['torch'\]"),
    (SelectiveLoraConfig, {"threshold": False}, "threshold must be a finite number, got False"),
    (SelectiveLoraConfig, {"sparsity_weight": True}, "sparsity_weight must be a finite number >= 0, got True"),
    (RankSelectiveLoraConfig, {"importance_init": True}, "importance_init must be a finite nonzero number"),
    (CurLoraConfig, {"alpha": True}, "alpha must be finite .*got True"),
    (CurLoraConfig, {"alpha": "1"}, "alpha must be finite .*got '1'"),
    (CurLoraConfig, {"eps": True}, "eps must be a finite number >= 0, got True"),
    (CurLoraConfig, {"seed": 2**64}, r"seed must be an int >= 0 and < 2\*\*63"),
    (NeatConfig, {"scale": True}, "scale must be finite .*got True"),
    (NeatConfig, {"activation": ["relu"]}, r"activation must be one of .*got \['relu'\]"),
    (NeatConfig, {"depth": MAX_NEAT_DEPTH + 1}, f"depth must be an int >= 0 and <= {MAX_NEAT_DEPTH}, got"),
    (NeatConfig, {"depth": 10**9}, f"depth must be an int >= 0 and <= {MAX_NEAT_DEPTH}, got 1000000000"),
    (CascadeLoraConfig, {"slow_momentum": False}, r"slow_momentum must lie in \[0, 1\)"),
    (CascadeLoraConfig, {"noise_intensity": True}, "noise_intensity"),
    (CascadeLoraConfig, {"noise_seed": 2**40}, r"noise_seed must be an int >= 0 and < 2\*\*31"),
])
def test_wrong_types_and_unbounded_sizes_are_refused(config_type, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config_type(**kwargs)


def test_bounds_themselves_are_accepted():
    assert NeatConfig(depth=MAX_NEAT_DEPTH).depth == MAX_NEAT_DEPTH
    assert CurLoraConfig(seed=2**63 - 1).seed == 2**63 - 1
    assert LoraConfig(r=4, alpha=8.0, use_rslora=True).scale == 4.0
    assert LoraConfig(r=4, alpha=8.0, use_rslora=False).scale == 2.0


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules=["q", "v"]), SelectiveLoraConfig(), RankSelectiveLoraConfig(),
    CurLoraConfig(), NeatConfig(depth=1), CascadeLoraConfig(),
])
def test_configs_are_immutable_and_replace_revalidates(config):
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 1000
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dropout = 0.5
    assert config.r != 1000 and config.dropout == 0.0
    copy = dataclasses.replace(config, r=2)
    assert copy.r == 2 and config.r != 2 and type(copy) is type(config)
    with pytest.raises(ValueError, match="r must be a positive int"):
        dataclasses.replace(config, r=0)
    assert AdapterConfig.from_dict(config.to_dict()) == config
    assert hash(AdapterConfig.from_dict(config.to_dict())) == hash(config)


def test_target_list_is_copied_into_a_tuple():
    names = ["up", "down"]
    config = LoraConfig(r=2, target_modules=names)
    names.append("act")  # the caller's list changing later does not reach the validated config
    assert config.target_modules == ("up", "down")
    assert config.to_dict()["target_modules"] == ["up", "down"]  # JSON-shaped
    assert LoraConfig(r=2, target_modules={"v", "q"}).target_modules == ("q", "v")
    with pytest.raises(AttributeError):
        config.target_modules.append("act")


@pytest.mark.parametrize("targets, error, match", [
    (["q", 3], TypeError, r"target_modules entries must be non-empty strings, got \[3\]"),
    ([b"q"], TypeError, r"non-empty strings, got \[b'q'\]"),
    (["q", ""], TypeError, r"non-empty strings, got \[''\]"),
    ([None], TypeError, r"non-empty strings, got \[None\]"),
    ([], ValueError, "target_modules is empty"),
    (3, TypeError, "target_modules must be a list of names, a regex string or None, got int"),
    ({"q": 1}, TypeError, "got dict"),
])
def test_target_modules_of_wrong_types_are_refused(targets, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(target_modules=targets)


def test_invalid_regex_is_refused_at_construction_not_at_inject():
    with pytest.raises(ValueError, match=r"target_modules regex '\(q\|v' is invalid: missing \)"):
        LoraConfig(target_modules="(q|v")
    with pytest.raises(ValueError, match=r"target_modules regex 'a\*\*' is invalid: multiple repeat"):
        CurLoraConfig(target_modules="a**")
    with pytest.raises(ValueError, match="is invalid"):
        AdapterConfig.from_dict({"method": "neat", "target_modules": "[q"})


@pytest.mark.parametrize("pattern", [
    "(a+)+$", "(a*)*b", "(a|aa)*c", "(a|a)+", "(.*a){8}!", "((ab)+c)+", "(?:a+)+", "(?P<x>a+)+",
    r"(\w+\.)+x", "(a{1,5})+", "(a+)+?", "(a+){2,}",
])
def test_nested_repetition_is_refused(pattern):
    with pytest.raises(ValueError, match="repeats a group that itself holds a repetition or an alternation"):
        LoraConfig(target_modules=pattern)


def test_too_many_repetitions_are_refused():
    allowed = ".*" * MAX_REGEX_REPETITIONS + "x"
    assert LoraConfig(target_modules=allowed).target_modules == allowed
    with pytest.raises(ValueError, match=f"holds {MAX_REGEX_REPETITIONS + 1} repetitions; at most "
                                         f"{MAX_REGEX_REPETITIONS}"):
        LoraConfig(target_modules=".*" * (MAX_REGEX_REPETITIONS + 1) + "x")


@pytest.mark.parametrize("pattern", [
    r".*\.(q_proj|v_proj)", r"^(?!.*vision).*\.layers\.\d+\.(q|v)_proj$", r"(?:ab){1}x", "(a+)?b",
    r"\(a+\)+", "[(+|]*x", "a{}", "(ab)+c", "(?#x*)(b)+", r"model\.layers\.[0-9]{1,3}\.mlp\..*", "all-linear",
])
def test_safe_regexes_are_accepted_and_match_as_before(pattern):
    assert LoraConfig(target_modules=pattern).target_modules == pattern


def test_the_most_repetitive_accepted_pattern_fails_fast_on_a_long_name():
    name = "model.encoder.layers.11.self_attention.output.dense." + "a" * 50
    pattern = LoraConfig(target_modules=".*" * MAX_REGEX_REPETITIONS + "!").target_modules
    start = time.perf_counter()
    assert re.fullmatch(pattern, name) is None
    assert time.perf_counter() - start < 1.0


def test_regex_target_still_injects():
    model = nn.Sequential()
    model.add_module("up", nn.Linear(8, 6))
    model.add_module("down", nn.Linear(6, 4))
    fastlora.inject(model, LoraConfig(r=2, target_modules=r"(up|down)"))
    assert all(isinstance(m, fastlora.AdapterLinear) for m in (model.up, model.down))
    out = model(torch.randn(3, 8))
    assert out.shape == (3, 4)

"""Config validation edges the mutation samples showed unguarded: character classes in the regex safety rule,
strictly positive fields, CoDyRA's integer counts, LoRASC's seed range, the methods' documented defaults, the
selection fields' normalisation, the pattern maps' checks."""
import pytest

from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)


@pytest.mark.parametrize("pattern", ["layer[])]+", "[ab]+(c)", "x[+*]y", "[^]a]+"])
def test_character_classes_are_skipped_whole_by_the_regex_rule(pattern):
    assert LoraConfig(target_modules=pattern).target_modules == pattern  # ")", "]", "+" inside a class are literals


@pytest.mark.parametrize("pattern", ["([)]+)+", "([ab]+c)+"])
def test_a_repeated_group_holding_a_repeated_class_is_refused(pattern):
    with pytest.raises(ValueError, match="repeats a group that itself holds a repetition"):
        LoraConfig(target_modules=pattern)


def test_alpha_must_be_strictly_positive():
    with pytest.raises(ValueError, match=r"LoraConfig.alpha must be a finite number > 0, got 0"):
        LoraConfig(alpha=0)
    assert LoraConfig(alpha=1e-6).alpha == 1e-6


@pytest.mark.parametrize("field", ["total_steps", "threshold_levels"])
@pytest.mark.parametrize("value", [0, -3, True, 2.0])
def test_codyra_counts_must_be_positive_ints(field, value):
    with pytest.raises(ValueError, match=f"RankSelectiveLoraConfig.{field} must be an int > 0"):
        RankSelectiveLoraConfig(**{field: value})


def test_cascade_noise_seed_spans_31_bits():
    assert CascadeLoraConfig(noise_seed=2**31 - 1).noise_seed == 2**31 - 1
    for seed in (2**31, -1):
        with pytest.raises(ValueError, match=r"noise_seed must be an int >= 0 and < 2\*\*31"):
            CascadeLoraConfig(noise_seed=seed)


def test_the_documented_defaults():
    """PEFT's lora_alpha 8; TAPS's threshold, score_init, penalty weight and its normalisation over the layers;
    CURLoRA's eps from the authors' code and seed 0; NEAT's scale 1; LoRASC's noise seed 0."""
    assert (LoraConfig().alpha, LoraConfig().use_rslora) == (8.0, False)
    selective = SelectiveLoraConfig()
    assert (selective.threshold, selective.score_init, selective.sparsity_weight) == (0.1, 0.15, 1.0)
    assert (selective.normalize_penalty, selective.sparsity_warmup_steps) == (True, 0)
    assert (CurLoraConfig().alpha, CurLoraConfig().eps, CurLoraConfig().seed) == (1.0, 1e-3, 0)
    assert (NeatConfig().depth, NeatConfig().activation, NeatConfig().scale) == (0, "relu", 1.0)
    assert CascadeLoraConfig().noise_seed == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"r": -1}, r"LoraConfig.r must be a positive int, got -1"),
    ({"backend": "bogus"}, r"LoraConfig.backend must be one of .*, got 'bogus'"),
    ({"backend": 5}, r"LoraConfig.backend must be one of .*, got 5"),
    ({"rank_pattern": ""}, r"LoraConfig.rank_pattern must map module names or regexes to values, got ''"),
    ({"rank_pattern": [("q", 2, 3)]}, r"rank_pattern must map module names or regexes to values"),
    ({"rank_pattern": {"q": 0}}, r"LoraConfig.rank_pattern\['q'\] must be a positive int, got 0"),
    ({"alpha_pattern": {"q": -1.5}}, r"LoraConfig.alpha_pattern\['q'\] must be a positive number, got -1.5"),
])
def test_lora_fields_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_selection_fields_are_normalised():
    assert LoraConfig(target_modules="All-Linear").target_modules == "all-linear"  # PEFT's shorthand, any case
    assert LoraConfig(exclude_modules="All-Linear").exclude_modules == "All-Linear"  # a regex there, kept
    assert LoraConfig(exclude_modules=[]).exclude_modules is None
    assert LoraConfig(exclude_modules=["q"]).exclude_modules == ("q",)
    config = LoraConfig(rank_pattern=[("q", 1)], alpha_pattern={"q": 0.5})  # a pair list as a map; rank 1
    assert (config.rank_pattern, config.alpha_pattern) == ((("q", 1),), (("q", 0.5),))


@pytest.mark.parametrize("cls, kwargs, message", [
    (SelectiveLoraConfig, {"sparsity_warmup_steps": -1}, r"sparsity_warmup_steps must be an int >= 0, got -1"),
    (CascadeLoraConfig, {"stages_per_run": -1}, r"stages_per_run must be an int > 0 or None, got -1"),
    (CascadeLoraConfig, {"stages_per_run": 2, "cascade_interval": 150},
     r"give stages_per_run \(2\) or cascade_interval \(150\), not both"),
    (CascadeLoraConfig, {"noise_seed": 1.5}, r"noise_seed must be an int >= 0 and < 2\*\*31, got 1.5"),
    (CascadeLoraConfig, {"noise_seed": True}, r"noise_seed must be an int >= 0 and < 2\*\*31, got True"),
])
def test_method_counts_and_seeds_refused(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)

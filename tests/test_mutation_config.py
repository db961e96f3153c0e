"""Config validation edges the mutation sample showed unguarded: character classes in the regex safety rule,
strictly positive fields, CoDyRA's integer counts, LoRASC's seed range."""
import pytest

from fastlora import CascadeLoraConfig, LoraConfig, RankSelectiveLoraConfig


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

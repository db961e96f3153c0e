"""check_regex against its documented rule: a repetition (``*``, ``+``, ``{m,n}`` with n > 1) of a group
that holds a repetition or an alternation is refused, anywhere in the pattern; characters inside a class,
escaped or in a comment are literals; at most 4 repetitions in all."""
import pytest

from fastlora import LoraConfig
from fastlora.safe_regex import check_regex

NESTED = [
    "((a+))+",            # the repetition two groups down
    "(x(a|b)*)",          # an inner alternation repeated, inside a group that is not
    "(?:a|b)+",           # a non-capturing group
    "(?#note)(a+)+",      # after a comment group
    "(a+ b)+",            # a space inside the repeated group
    "(a+#b)+",            # a '#' inside it
    "v_proj|(a+)+",       # after a top-level alternation
    "(a{2})+",            # {2} repeats too
    "(ab{2,})*",
]
ACCEPTED = [
    "q_proj|v_proj",      # a top-level alternation (PEFT's usual regex)
    ".*\\.(q_proj|v_proj)",
    "([*+])+",            # repetition characters inside a class are literals
    "([a|b])+",           # so is '|'
    "([\\]*])+",          # an escaped ']' does not end the class
    "(a~b)+", "(a}b)+",   # characters that are neither
    "(ab?)+",             # '?' repeats at most once
    "(\\+\\|)+",          # escaped repetition and alternation
    "layers\\.(0|1|2)\\.mlp",
    ".*((b))+",           # a top-level repetition does not make a later group risky
    "(a+){0}",            # {0} does not repeat
    "layer_([\\d])+",     # an escape inside a class
    "block_" * 60 + "x",  # a long pattern (300+ characters)
]


@pytest.mark.parametrize("pattern", NESTED)
def test_a_repeated_group_holding_a_repetition_or_an_alternation_is_refused(pattern):
    with pytest.raises(ValueError, match="repeats a group that itself holds a repetition or an alternation"):
        check_regex(pattern)


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_patterns_without_nested_repetition_are_accepted(pattern):
    check_regex(pattern)
    assert LoraConfig(target_modules=pattern).target_modules == pattern


def test_at_most_four_repetitions():
    check_regex(".*" * 4 + "x")
    with pytest.raises(ValueError, match="holds 5 repetitions; at most 4 are allowed"):
        check_regex(".*" * 5 + "x")

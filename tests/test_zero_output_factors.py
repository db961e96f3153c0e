"""A factor of the adapter's whole output that is 0 (CURLoRA's alpha, NEAT's scale) makes every adapter
gradient exactly 0, so training would change nothing: it is refused where the config is written, as LoRA's
alpha=0 is, naming the field and the value. Any other finite value, negative included, is accepted."""
import re

import pytest

from fastlora import AdapterConfig, CurLoraConfig, LoraConfig, NeatConfig


@pytest.mark.parametrize("config, field", [(CurLoraConfig, "alpha"), (NeatConfig, "scale")])
@pytest.mark.parametrize("value", [0, 0.0, -0.0])
def test_a_zero_output_factor_is_refused_naming_the_field_and_value(config, field, value):
    message = re.escape(f"{config.__name__}.{field} must be finite and nonzero (an int or float; 0 makes every "
                        f"adapter gradient 0, so training would change nothing), got {value!r}")
    with pytest.raises(ValueError, match=message):
        config(r=2, **{field: value})
    with pytest.raises(ValueError, match=message):
        AdapterConfig.from_dict({"method": config.method, "r": 2, field: value})  # a saved config too


def test_lora_refuses_alpha_0_too():
    with pytest.raises(ValueError, match=r"LoraConfig\.alpha must be a finite number > 0, got 0"):
        LoraConfig(alpha=0)


@pytest.mark.parametrize("config, field", [(CurLoraConfig, "alpha"), (NeatConfig, "scale")])
@pytest.mark.parametrize("value", [-1.5, 1e-8, 3])
def test_other_finite_factors_are_accepted(config, field, value):
    assert getattr(config(r=2, **{field: value}), field) == value

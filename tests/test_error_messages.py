"""Errors that name their cause: an AdapterLinear on the meta device, the demo's Triton plan on a machine
that cannot run it (refused before the model loads)."""
import pytest
import torch
import torch.nn.functional as F

import fastlora.demo
from fastlora import AdapterLinear, CascadeLoraConfig, LoraConfig
from fastlora.cli import main


@pytest.mark.parametrize("config", [LoraConfig(r=2, alpha=4.0), CascadeLoraConfig(r=2)], ids=["lora", "lorasc"])
def test_a_meta_layer_gives_meta_outputs_as_nn_linear_and_refuses_real_inputs_by_name(config):
    with torch.device("meta"):
        layer = AdapterLinear(8, 6, config=config)
    out = layer.train()(torch.empty(3, 5, 8, device="meta"))
    assert out.is_meta and out.shape == (3, 5, 6) and out.dtype == torch.float32
    assert out.shape == F.linear(torch.empty(3, 5, 8, device="meta"), layer.weight, layer.bias).shape
    with pytest.raises(ValueError, match=r"AdapterLinear \(8 -> 6\) is on the meta device \(no values\) and the "
                                         r"input on cpu: materialise the layer first"):
        layer(torch.randn(3, 8))


def test_demo_with_the_triton_plan_on_a_machine_without_cuda_is_refused_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    loaded = []
    monkeypatch.setattr(fastlora.demo, "load_minilm", lambda: loaded.append(1) or (_ for _ in ()).throw(
        AssertionError("the model was loaded")))
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--backend", "triton"])
    assert exited.value.code == 2 and not loaded
    err = capsys.readouterr().err
    assert "--backend triton needs a CUDA GPU, and this machine has none" in err and "TRITON_INTERPRET=1" in err
    assert len(err.splitlines()) <= 3  # usage line and the error: no traceback

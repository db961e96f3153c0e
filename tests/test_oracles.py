"""Checks whose expected values come from the papers' procedures or from another library, never
from the object under test: CURLoRA's sampler, the PEFT export's config as PEFT reads it, the
compiled Selective LoRA gate on its threshold, and half-precision gradients against float64."""
import json

import pytest
import torch
from torch import nn

import fastlora
from fastlora import AdapterLinear, CurLoraConfig, LoraConfig, NeatConfig, SelectiveLoraConfig

from utils import authors_cur_indices, rel

F64 = torch.float64


@pytest.mark.parametrize("seed", [0, 5, 123])
def test_curlora_samples_as_the_authors_code(seed):
    torch.manual_seed(seed)
    # uneven column and row norms, so the inverted probabilities (and eps) matter
    linear = nn.Linear(40, 30).double()
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.05, 3.0, 40)[None, :] * torch.linspace(0.2, 2.0, 30)[:, None])
    assert CurLoraConfig().eps == 1e-3  # the authors' value
    layer = AdapterLinear.from_linear(linear, CurLoraConfig(r=6, seed=seed))
    rows, cols = authors_cur_indices(linear.weight.detach(), 6, seed)
    assert torch.equal(layer.adapter.row_index, rows)
    assert torch.equal(layer.adapter.col_index, cols)


def test_peft_reads_the_exported_lora_config_as_written(tmp_path):
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8))
    config = LoraConfig(r=3, alpha=7.0, dropout=0.15, use_rslora=True, target_modules=["0", "2"])
    fastlora.inject(model, config)
    fastlora.save_peft_adapter(model, tmp_path / "out")
    read = peft.PeftConfig.from_pretrained(str(tmp_path / "out"))
    assert read.peft_type == peft.PeftType.LORA
    assert (read.r, read.lora_alpha, read.lora_dropout, read.use_rslora) == (3, 7.0, 0.15, True)
    assert set(read.target_modules) == {"0", "2"}
    assert read.bias == "none" and not read.fan_in_fan_out
    raw = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert raw["lora_dropout"] == 0.15


def test_compiled_selective_gate_on_its_threshold_is_on():
    """score == threshold: the gate 1[score >= tau] is on in eager and compiled code alike."""
    torch.manual_seed(0)
    layer = AdapterLinear(9, 7, config=SelectiveLoraConfig(r=2, threshold=0.25, score_init=0.25, backend="torch"))
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    assert float(layer.adapter.score.detach()) == 0.25  # exactly on the threshold (0.25 is exact in fp32)
    x = torch.randn(4, 9)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    a, b = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
    expected = base + layer.config.scale * (x @ a.t()) @ b.t()
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(eager, expected)
    torch.testing.assert_close(compiled, expected)
    assert (compiled - base).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", [LoraConfig(r=4, alpha=8.0, backend="torch"),
                                    CurLoraConfig(r=4, backend="torch"),
                                    NeatConfig(r=4, scale=0.8, backend="torch")], ids=["lora", "curlora", "neat"])
def test_half_precision_layer_gradients_match_float64(config, dtype):
    """Values of every gradient (not only dtypes) of a half-precision layer, against the same layer in float64."""
    torch.manual_seed(1)
    layer = AdapterLinear(48, 40, config=config, dtype=dtype)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.normal_(0, 0.3)
    exact = AdapterLinear(48, 40, config=config, dtype=F64)
    exact.load_state_dict({k: v.to(F64) if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    x = torch.randn(16, 48, dtype=F64)
    dy = torch.randn(16, 40, dtype=F64)
    x_half = x.to(dtype).requires_grad_()
    x_exact = x_half.detach().to(F64).requires_grad_()
    layer(x_half).backward(dy.to(dtype))
    exact(x_exact).backward(dy)
    assert rel(x_half.grad, x_exact.grad) < 2e-2
    for (name, p), (_, q) in zip(layer.adapter.named_parameters(), exact.adapter.named_parameters()):
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert rel(p.grad, q.grad) < 2e-2, name

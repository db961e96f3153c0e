"""Bad arguments at the user-facing calls are refused by name before anything changes: adapter names given to
load_adapter, a PEFT checkpoint's malformed fields and tensors, non-finite adapters at save time, AdapterLinear's
constructor arguments, the op's scalars and tensor kinds; and selections that would silently do nothing warn
(rank_pattern keys that match no layer, accelerate over a model without PEFT layers)."""
import json
import shutil
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
from fastlora import AdapterLinear, LoraConfig
from fastlora.kernels import adapted_linear


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Block(), Block())


@pytest.mark.parametrize("name", [5, "", "a.b"])
def test_load_adapter_refuses_an_adapter_name_a_layer_cannot_hold(tmp_path, name):
    """Into a model without adapters the name was taken as given; a later set_adapter then failed inside torch's
    ModuleDict halfway through the layers."""
    fastlora.save_adapter(fastlora.inject(_model(), LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    model = _model()
    with pytest.raises(ValueError, match=rf"adapter name must be a non-empty string without '\.', got {name!r}"):
        fastlora.load_adapter(model, tmp_path, adapter_name=name)
    assert next(fastlora.adapter_layers(model), None) is None


@pytest.fixture
def peft_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                          init_lora_weights=False))
    model.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def _variant(path, name, fields=None, tensors=None, config_text=None, weights_bytes=None):
    changed = path.parent / name
    shutil.copytree(path, changed)
    if fields is not None:
        meta = json.loads((changed / "adapter_config.json").read_text())
        (changed / "adapter_config.json").write_text(json.dumps({**meta, **fields}))
    if tensors is not None:
        state = load_file(changed / "adapter_model.safetensors")
        tensors(state)
        save_file(state, changed / "adapter_model.safetensors")
    if config_text is not None:
        (changed / "adapter_config.json").write_text(config_text)
    if weights_bytes is not None:
        (changed / "adapter_model.safetensors").write_bytes(weights_bytes(changed / "adapter_model.safetensors"))
    return changed


KEY = "base_model.model.0.q_proj.lora_A.weight"


@pytest.mark.parametrize("change, message", [
    (dict(fields={"use_rslora": "false"}), r"PEFT LORA config has use_rslora='false', expected true or false"),
    (dict(fields={"lora_alpha": None}), r"PEFT LORA config has lora_alpha=None, expected a number"),
    (dict(fields={"lora_dropout": "0.1"}), r"PEFT LORA config has lora_dropout='0.1', expected a number"),
    (dict(fields={"peft_version": 5}), r"peft_version 5 is not a version string"),
    (dict(config_text="{oops"), r"adapter_config.json: not valid JSON"),
    (dict(config_text="[1]"), r"adapter_config.json holds a list, not a JSON object"),
    (dict(tensors=lambda s: s[KEY].fill_(float("nan"))), rf"tensor '{KEY}' has 16 non-finite values"),
    (dict(tensors=lambda s: s.update({KEY: (s[KEY] * 10).long()})), rf"tensor '{KEY}' has dtype torch.int64"),
    (dict(weights_bytes=lambda p: p.read_bytes()[:100]), r"adapter_model.safetensors: not a readable safetensors"),
], ids=["rslora-string", "alpha-null", "dropout-string", "version-int", "json", "json-list", "nan", "int", "cut"])
def test_load_peft_adapter_refuses_malformed_checkpoints_by_name(peft_checkpoint, change, message):
    """Before: a string use_rslora read as True and integer or NaN factors loaded (outputs off PEFT's by up to
    0.66, or NaN); nulls, a non-string version and bad files raised raw TypeErrors/AttributeErrors."""
    model = _model()
    with pytest.raises(ValueError, match=message):
        fastlora.load_peft_adapter(model, _variant(peft_checkpoint, "bad", **change))
    assert next(fastlora.adapter_layers(model), None) is None


@pytest.mark.parametrize("save", [fastlora.save_adapter, fastlora.save_peft_adapter])
def test_saving_a_non_finite_adapter_is_refused_and_writes_nothing(tmp_path, save):
    """The loaders refuse NaN/inf tensors, so a save of a diverged adapter wrote a checkpoint that could not be
    loaded back."""
    model = fastlora.inject(_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        model[1].q_proj.adapter.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"nothing written: a checkpoint with NaN or inf values would be refused.*"
                                         r"tensor '.*1\.q_proj.*lora_B.*' has 16 non-finite values"):
        save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_rank_and_alpha_pattern_keys_that_select_no_layer_warn_naming_them():
    config = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_prj": 4, "v_proj": 3},
                        alpha_pattern={"v_prj": 8})
    with pytest.warns(UserWarning) as caught:
        model = fastlora.inject(_model(), config)
    messages = [str(w.message) for w in caught]
    assert any("rank_pattern keys ['q_prj'] select none of the adapted layers" in m for m in messages), messages
    assert any("alpha_pattern keys ['v_prj'] select none" in m for m in messages), messages
    assert (model[0].q_proj.adapter.lora_A.shape[0], model[0].v_proj.adapter.lora_A.shape[0]) == (2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlora.inject(_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 3}))


@pytest.mark.parametrize("build", [_model, lambda: fastlora.inject(_model(), LoraConfig(r=2))],
                         ids=["plain", "injected"])
def test_accelerate_over_a_model_without_peft_layers_warns(build):
    with pytest.warns(UserWarning, match="fastlora.accelerate: the model holds no PEFT tuner layers, so nothing was "
                                         "accelerated"):
        fastlora.accelerate(build())


@pytest.mark.parametrize("arguments, message", [
    (dict(in_features=-1, out_features=4), "AdapterLinear in_features must be an int >= 0, got -1"),
    (dict(in_features=4, out_features="4"), "AdapterLinear out_features must be an int >= 0, got '4'"),
    (dict(in_features=4, out_features=4, dtype=torch.int64), "dtype must be a real floating-point dtype, got "
                                                              "torch.int64"),
    (dict(in_features=4, out_features=4, dtype=torch.complex64), "real floating-point dtype, got torch.complex64"),
    (dict(in_features=4, out_features=4, layer_index="1"), r"layer_index must be an int in \[0, 2\*\*62\), got '1'"),
])
def test_adapter_linear_refuses_bad_constructor_arguments_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        AdapterLinear(**arguments, config=LoraConfig(r=2))


def test_inject_refuses_a_complex_linear_naming_its_dtype():
    with pytest.raises(ValueError, match="real floating-point weight, got torch.complex64"):
        fastlora.inject(nn.Sequential(nn.Linear(4, 4, dtype=torch.complex64)), LoraConfig(r=2))


def _op_tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for shape in ((4, 8), (6, 8), (6,), (2, 8), (6, 2))]


@pytest.mark.parametrize("change, error, message", [
    (dict(scale="2"), TypeError, "scale must be a float, got str '2'"),
    (dict(scale=None), TypeError, "scale must be a float, got NoneType None"),
    (dict(scale=torch.ones(2)), ValueError, r"scale must be a scalar, got a tensor of shape \(2,\)"),
    (dict(dropout="0.1"), TypeError, r"dropout must be a float in \[0, 1\), got str '0.1'"),
    (dict(gate=torch.tensor(1.0, device="meta")), RuntimeError, "gate is on meta but x is on cpu"),
    (dict(rank_weights=[1.0, 1.0]), TypeError, "rank_weights must be a dense tensor, got list"),
    (dict(lora_b="sparse"), TypeError, "lora_b must be a dense tensor, got a torch.sparse_coo tensor"),
], ids=["scale-str", "scale-none", "scale-vector", "dropout-str", "gate-device", "list", "sparse"])
def test_the_op_refuses_bad_scalars_and_tensor_kinds_by_name(change, error, message):
    x, w, b, a, bb = _op_tensors()
    if change.get("lora_b") == "sparse":
        change = {"lora_b": bb.to_sparse()}
    arguments = {"lora_a": a, "lora_b": bb, **change}
    for backend in ("torch", "cublas"):
        with pytest.raises(error, match=message):
            adapted_linear(x, w, b, backend=backend, **arguments)


def test_a_state_dict_saved_with_another_adapter_active_is_refused_naming_it():
    """The active adapter's tensors are keyed "adapter.*" whatever its name: loaded into a model whose other
    adapter is active, the saved "b" went into "default" (strict=False: silently, its outputs became b's)."""
    def build():
        model = fastlora.inject(_model(), LoraConfig(r=2, target_modules=["q_proj"]))
        fastlora.add_adapter(model, "b", LoraConfig(r=2, target_modules=["q_proj"]))
        return model

    saved = build()
    fastlora.set_adapter(saved, "b")
    state = saved.state_dict()
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"layer 0.q_proj: the state dict was saved while another adapter was "
                                             r"active \(adapter 'default' is inactive there\); set that adapter "
                                             r"active first \(fastlora.set_adapter\(model, 'b'\)\)"):
            build().load_state_dict(state, strict=strict)
    model = build()
    fastlora.set_adapter(model, "b")
    model.load_state_dict(state)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), saved(x))

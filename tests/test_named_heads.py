"""Each named adapter has its own values of the modules trained in full (PEFT's modules_to_save, a
classifier head), as PEFT keeps one copy per adapter: switching adapters switches heads, checkpoints of
inactive adapters carry their own head, and deleting, unloading or merging drops the inactive copies."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastlora

from utils import tied_lm

TARGETS = ["encoder.0", "encoder.2"]


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16))
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))  # a head with submodules

    def forward(self, x):
        return self.classifier(self.encoder(x))


def _config(**kw):
    return fastlora.LoraConfig(r=4, alpha=8, target_modules=TARGETS, **kw)


@pytest.fixture
def base():
    torch.manual_seed(0)
    return Classifier()


def _randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen))


def _task_model(base, seed, directory):
    """A copy of ``base`` adapted and given a head of its own, saved to ``directory``."""
    model = fastlora.inject(copy.deepcopy(base), _config(modules_to_save=["classifier"]))
    _randomise(model, seed)
    fastlora.save_adapter(model, directory)
    return model


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(9))


def test_two_task_checkpoints_loaded_as_named_adapters_each_compute_their_model(base, tmp_path):
    tasks = {name: _task_model(base, seed, tmp_path / name) for name, seed in (("a", 1), ("b", 2))}
    model = copy.deepcopy(base)
    fastlora.load_adapter(model, tmp_path / "a", adapter_name="a")
    fastlora.load_adapter(model, tmp_path / "b", adapter_name="b")
    assert fastlora.active_adapter(model) == "a"
    for name in ("a", "b", "a"):
        fastlora.set_adapter(model, name)
        torch.testing.assert_close(model(X), tasks[name](X), rtol=0, atol=0)
    assert sorted(k for k in model.state_dict() if "inactive_heads" in k) == [
        "classifier.0.inactive_heads.b.bias", "classifier.0.inactive_heads.b.weight",
        "classifier.2.inactive_heads.b.bias", "classifier.2.inactive_heads.b.weight"]


def test_an_inactive_adapters_checkpoint_carries_its_own_head(base, tmp_path):
    task = _task_model(base, 3, tmp_path / "task")
    model = fastlora.inject(copy.deepcopy(base), _config(modules_to_save=["classifier"]))
    _randomise(model, 4)
    fastlora.load_adapter(model, tmp_path / "task", adapter_name="other")
    head = model.classifier[0].weight.detach().clone()
    fastlora.save_adapter(model, tmp_path / "again", adapter_name="other")
    assert torch.equal(model.classifier[0].weight, head)  # the active adapter's head is untouched
    saved = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert torch.equal(saved["classifier.0.weight"], task.classifier[0].weight)
    fresh = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(fresh(X), task(X), rtol=0, atol=0)


def test_each_adapter_trains_its_own_head(base):
    model = fastlora.inject(copy.deepcopy(base), _config(modules_to_save=["classifier"]))
    _randomise(model, 5)
    fastlora.add_adapter(model, "b", _config())
    default_head = model.classifier[2].weight.detach().clone()
    fastlora.set_adapter(model, "b")
    assert torch.equal(model.classifier[2].weight, default_head)  # b starts from the active adapter's head
    assert model.classifier[2].weight.requires_grad
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(X).square().sum().backward()
    optimizer.step()
    trained_b = model.classifier[2].weight.detach().clone()
    assert not torch.equal(trained_b, default_head)
    fastlora.set_adapter(model, "default")
    assert torch.equal(model.classifier[2].weight, default_head)
    fastlora.set_adapter(model, "b")
    assert torch.equal(model.classifier[2].weight, trained_b)


@pytest.mark.parametrize("ending", ["delete", "unload", "merge_and_unload"])
def test_deleting_unloading_or_merging_drops_the_inactive_heads(base, ending):
    model = fastlora.inject(copy.deepcopy(base), _config(modules_to_save=["classifier"]))
    _randomise(model, 6)
    fastlora.add_adapter(model, "b", _config())
    active = model.classifier[0].weight.detach().clone()
    if ending == "delete":
        fastlora.delete_adapter(model, "b")
    else:
        getattr(fastlora, ending)(model)
    assert not any("inactive_heads" in name for name, _ in model.named_modules())
    assert torch.equal(model.classifier[0].weight, active)


def test_a_whole_model_state_dict_restores_every_adapters_head(base):
    model = fastlora.inject(copy.deepcopy(base), _config(modules_to_save=["classifier"]))
    fastlora.add_adapter(model, "b", _config())
    fastlora.set_adapter(model, "b")
    _randomise(model, 7)
    fastlora.set_adapter(model, "default")
    twin = fastlora.inject(copy.deepcopy(base), _config(modules_to_save=["classifier"]))
    fastlora.add_adapter(twin, "b", _config())
    twin.load_state_dict(model.state_dict())
    for name in ("default", "b"):
        fastlora.set_adapter(model, name)
        fastlora.set_adapter(twin, name)
        torch.testing.assert_close(twin(X), model(X), rtol=0, atol=0)


def test_tied_modules_saved_in_full_switch_as_one_parameter():
    """An lm_head tied to the embeddings, both saved in full: one set of values per adapter, switched once."""
    model = tied_lm()
    fastlora.inject(model, fastlora.LoraConfig(r=2, target_modules=["body"], modules_to_save=["embed", "lm_head"]))
    fastlora.add_adapter(model, "b", fastlora.LoraConfig(r=2, target_modules=["body"]))
    default = model.embed.weight.detach().clone()
    fastlora.set_adapter(model, "b")
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    trained_b = model.embed.weight.detach().clone()
    fastlora.set_adapter(model, "default")
    assert model.lm_head.weight is model.embed.weight and torch.equal(model.embed.weight, default)
    fastlora.set_adapter(model, "b")
    assert torch.equal(model.lm_head.weight, trained_b)


def test_a_switch_under_inference_mode_leaves_head_values_a_later_load_can_write(base, tmp_path):
    """Serving loops switch adapters under torch.inference_mode: the inactive head values made there were
    inference tensors, and a later load into that adapter failed inside torch after writing its factors."""
    tasks = {name: _task_model(base, seed, tmp_path / name) for name, seed in (("a", 1), ("b", 2))}
    model = fastlora.load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    fastlora.load_adapter(model, tmp_path / "b", adapter_name="b")
    with torch.inference_mode():
        fastlora.set_adapter(model, "b")
    fastlora.load_adapter(model, tmp_path / "a", adapter_name="a")
    fastlora.set_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(X), tasks["a"](X))


class RootScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.q_proj(x) * self.temperature


def test_a_refused_load_into_an_inactive_or_new_adapter_leaves_the_model_as_it_was(tmp_path):
    """A trainable parameter of the root module cannot be an inactive adapter's value: the refusal came after
    the inactive adapter's factors were overwritten, or after the new adapter was added."""
    torch.manual_seed(0)
    source = fastlora.inject(RootScaled(), fastlora.LoraConfig(r=2, target_modules=["q_proj"]))
    source.temperature.requires_grad_(True)  # saved beside the adapters
    _randomise(source, 3)
    fastlora.save_adapter(source, tmp_path)
    model = fastlora.inject(RootScaled(), fastlora.LoraConfig(r=2, target_modules=["q_proj"]))
    fastlora.add_adapter(model, "b", fastlora.LoraConfig(r=2, target_modules=["q_proj"]))
    before = copy.deepcopy(model.state_dict())
    for name in ("b", "c"):
        with pytest.raises(ValueError, match="checkpoint parameter 'temperature' belongs to the model's root module"):
            fastlora.load_adapter(model, tmp_path, adapter_name=name)
    assert fastlora.adapter_names(model) == ["default", "b"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


class NormedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16))
        self.classifier = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))

    def forward(self, x):
        return self.classifier(self.encoder(x))


def _trained_forwards(model, seed):
    """Training-mode forwards: the head's BatchNorm running statistics move."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(6, 12, generator=gen))
    return model.eval()


def test_a_head_with_buffers_keeps_them_per_adapter_and_through_checkpoints(tmp_path):
    """PEFT's modules_to_save copy the whole module: a BatchNorm's running statistics were neither saved (the
    reloaded eval outputs were off by 0.1) nor kept per adapter (training "b" moved "default"'s)."""
    torch.manual_seed(0)
    base = NormedHead()
    model = fastlora.inject(copy.deepcopy(base), _config(modules_to_save=["classifier"]))
    _randomise(model, 1)
    _trained_forwards(model, 2)
    expected = model(X)
    fastlora.save_adapter(model, tmp_path)
    assert "classifier.1.running_mean" in load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(fastlora.load_adapter(copy.deepcopy(base), tmp_path).eval()(X), expected)
    fastlora.add_adapter(model, "b", _config())
    fastlora.set_adapter(model, "b")
    _trained_forwards(model, 3)
    fastlora.set_adapter(model, "default")
    assert torch.equal(model.eval()(X), expected)


def test_a_peft_checkpoint_with_a_batchnorm_head_loads_its_integer_buffer(tmp_path):
    """PEFT saves a BatchNorm head's num_batches_tracked (int64) with its modules_to_save: the import refused any
    integer tensor, so fastlora's own export of such a head did not load back either."""
    import peft

    torch.manual_seed(0)
    base = NormedHead()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS,
                                                                        modules_to_save=["classifier"],
                                                                        init_lora_weights=False))
    _trained_forwards(reference, 2)
    reference.save_pretrained(tmp_path / "peft")
    model = fastlora.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert torch.equal(model(X), reference.eval()(X))
    fastlora.save_peft_adapter(model, tmp_path / "again")
    assert torch.equal(fastlora.load_peft_adapter(copy.deepcopy(base), tmp_path / "again").eval()(X), model(X))

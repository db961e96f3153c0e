"""Checkpoint writes touch only the adapter files and are all-or-nothing; loads check everything first."""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastlora
from fastlora import AdapterLinear, CurLoraConfig, LoraConfig, NeatConfig, SelectiveLoraConfig, atomic_files, checkpoint

from utils import adapter_values, same_values

D_IN, D_HID, D_OUT = 12, 10, 7


def _base(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HID, dtype=torch.float64), nn.Tanh(),
                         nn.Linear(D_HID, D_OUT, dtype=torch.float64))


def _adapted(config, seed=1):
    model = fastlora.inject(_base(), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            for p in layer.adapter.parameters():
                p.copy_(torch.randn_like(p))
    return model


def _snapshot(directory):
    """relative path -> (bytes or None for a directory, mode) of everything under ``directory``."""
    out = {".": (None, stat.S_IMODE(os.stat(directory).st_mode))}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            data = None if os.path.isdir(path) else open(path, "rb").read()
            out[os.path.relpath(path, directory)] = (data, stat.S_IMODE(os.stat(path).st_mode))
    return out


def _populate_others(directory):
    """A Trainer-like directory: a base model file, a sub-checkpoint, odd modes."""
    os.makedirs(directory / "checkpoint-500")
    (directory / "model.safetensors").write_bytes(os.urandom(64))
    (directory / "checkpoint-500" / "optimizer.pt").write_bytes(os.urandom(32))
    os.chmod(directory / "model.safetensors", 0o640)
    os.chmod(directory, 0o751)


def test_save_into_an_existing_directory_touches_only_the_adapter_files(tmp_path):
    target = tmp_path / "run"
    _populate_others(target)
    before = _snapshot(target)
    model = _adapted(LoraConfig(r=3, alpha=2.0))
    fastlora.save_adapter(model, target)
    after = _snapshot(target)
    assert set(after) - set(before) == {checkpoint.CONFIG_FILE, checkpoint.WEIGHTS_FILE}
    assert all(after[k] == v for k, v in before.items())  # bytes and modes, the directory's mode included
    loaded = fastlora.load_adapter(_base(), target)
    assert same_values(adapter_values(loaded), adapter_values(model))
    # saving again replaces the adapter files (keeping a chmod of them), nothing else
    os.chmod(target / checkpoint.CONFIG_FILE, 0o600)
    fastlora.save_peft_adapter(_adapted(LoraConfig(r=3, alpha=2.0), seed=5), target)
    again = _snapshot(target)
    assert set(again) == set(after) and all(again[k] == v for k, v in before.items())
    assert again[checkpoint.CONFIG_FILE][1] == 0o600
    assert again[checkpoint.WEIGHTS_FILE] != after[checkpoint.WEIGHTS_FILE]


def test_save_targets_missing_symlinked_home_dot_and_long_names(tmp_path, monkeypatch):
    model = _adapted(LoraConfig(r=3))
    expected = adapter_values(model)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    long_name = "x" * 250
    cases = [(tmp_path / "a" / "b" / "c", tmp_path / "a" / "b" / "c"), (tmp_path / "link", real),
             ("~/adapters", home / "adapters"), (".", cwd), (tmp_path / long_name, tmp_path / long_name)]
    for directory, where in cases:
        fastlora.save_adapter(model, directory)
        assert sorted(os.listdir(where)) == [checkpoint.CONFIG_FILE, checkpoint.WEIGHTS_FILE], directory
        assert same_values(adapter_values(fastlora.load_adapter(_base(), directory)), expected)
    assert (tmp_path / "link").is_symlink()
    with pytest.raises(NotADirectoryError, match="not a directory"):
        fastlora.save_adapter(model, tmp_path / "a" / "b" / "c" / checkpoint.CONFIG_FILE)


class Fault(Exception):
    pass


def _inject_faults(monkeypatch, fail_at, crash):
    """Count every write, fsync, link and rename; raise at call number ``fail_at`` (and, when
    ``crash``, at every call after it and at every unlink: the process is dead, nothing cleans up)."""
    calls = []

    def wrap(function):
        def step(*args, **kwargs):
            calls.append(function.__name__)
            if len(calls) - 1 == fail_at or (crash and fail_at is not None and len(calls) - 1 > fail_at):
                raise Fault(f"{function.__name__} #{len(calls) - 1}")
            return function(*args, **kwargs)
        return step

    for module, name in [(atomic_files, "save_file"), (os, "write"), (os, "fsync"), (os, "replace"), (os, "link")]:
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    if crash:
        def dead(*args, **kwargs):
            if len(calls) > fail_at:
                raise Fault("unlink after the crash")
            return unlink(*args, **kwargs)
        unlink = os.unlink
        monkeypatch.setattr(os, "unlink", dead)
    return calls


SAVES = {"fastlora": (fastlora.save_adapter, fastlora.load_adapter),
         "peft": (fastlora.save_peft_adapter, fastlora.load_peft_adapter)}


# PEFT's format has no digest to tell a mixed pair, so a crash is tested on fastlora's format only
@pytest.mark.parametrize("fmt, crash", [("fastlora", False), ("fastlora", True), ("peft", False)])
def test_a_fault_at_any_write_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, fmt, crash):
    save, load = SAVES[fmt]
    old_model, new_model = _adapted(LoraConfig(r=3, alpha=2.0), seed=1), _adapted(LoraConfig(r=3, alpha=5.0), seed=2)
    template = tmp_path / "template"
    _populate_others(template)
    save(old_model, template)
    old = _snapshot(template)
    shutil.copytree(template, tmp_path / "count", symlinks=True)
    with monkeypatch.context() as patch:
        steps = _inject_faults(patch, None, False)
        save(new_model, tmp_path / "count")
    new = _snapshot(tmp_path / "count")
    assert len(steps) >= 8 and {"save_file", "write", "fsync", "replace", "link"} <= set(steps)
    outcomes = set()
    for k in range(len(steps)):
        target = tmp_path / f"fault{k}"
        shutil.copytree(template, target, symlinks=True)
        os.chmod(target, old["."][1])
        with monkeypatch.context() as patch:
            _inject_faults(patch, k, crash)
            with pytest.raises(Fault):
                save(new_model, target)
        now = _snapshot(target)
        leftovers = {p for p in set(now) - set(old) if p.startswith(".adapter_") and p.endswith(".tmp")}
        assert not leftovers or crash, (k, steps[k], leftovers)
        now = {p: v for p, v in now.items() if p not in leftovers}
        others = {p for p in old if p not in (checkpoint.CONFIG_FILE, checkpoint.WEIGHTS_FILE)}
        assert set(now) == set(old) and all(now[p] == old[p] for p in others), (k, steps[k])
        if now == old:
            outcomes.add("old")
            expected = adapter_values(old_model)
        elif now == new:
            outcomes.add("new")
            expected = adapter_values(new_model)
        else:
            assert crash, (k, steps[k])  # only a dead process leaves a mixed pair: the loader refuses it
            outcomes.add("mixed")
            with pytest.raises(ValueError, match="different saves"):
                load(_base(), target)
            continue
        assert same_values(adapter_values(load(_base(), target)), expected), (k, steps[k])
    # an exception always puts the old files back; a crash can also leave a (refused) mixed pair
    assert outcomes == {"old"} if not crash else outcomes >= {"old", "mixed"}


def _rewrite(directory, edit_state=None, edit_meta=None):
    """Edit a saved checkpoint's tensors and/or metadata, keeping the digest consistent."""
    weights, config = directory / checkpoint.WEIGHTS_FILE, directory / checkpoint.CONFIG_FILE
    if edit_state is not None:
        state = load_file(weights)
        edit_state(state)
        save_file(state, weights)
    meta = json.loads(config.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    if edit_meta is not None:
        edit_meta(meta)
    config.write_text(json.dumps(meta))


def test_a_mixed_pair_from_two_saves_is_refused(tmp_path):
    fastlora.save_adapter(_adapted(LoraConfig(r=3, alpha=2.0)), tmp_path / "a")
    fastlora.save_adapter(_adapted(LoraConfig(r=3, alpha=5.0), seed=3), tmp_path / "b")
    shutil.copy(tmp_path / "b" / checkpoint.WEIGHTS_FILE, tmp_path / "a" / checkpoint.WEIGHTS_FILE)
    model = _base()
    with pytest.raises(ValueError, match="different saves"):
        fastlora.load_adapter(model, tmp_path / "a")
    assert not list(fastlora.adapter_layers(model))


def test_per_layer_configs_are_saved_and_must_match_the_model(tmp_path):
    def drop_in(alpha_up, alpha_down, dropout=0.0):
        torch.manual_seed(0)
        return nn.Sequential(
            AdapterLinear(D_IN, D_HID, config=LoraConfig(r=2, alpha=alpha_up), dtype=torch.float64), nn.Tanh(),
            AdapterLinear(D_HID, D_OUT, config=LoraConfig(r=3, alpha=alpha_down, dropout=dropout),
                          dtype=torch.float64))

    model = drop_in(2.0, 7.0)
    with torch.no_grad():
        for p in (p for _, layer in fastlora.adapter_layers(model) for p in layer.adapter.parameters()):
            p.copy_(torch.randn_like(p))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    layers = json.loads((tmp_path / "ckpt" / checkpoint.CONFIG_FILE).read_text())["layers"]
    assert (layers["0"]["r"], layers["0"]["alpha"], layers["2"]["r"], layers["2"]["alpha"]) == (2, 2.0, 3, 7.0)
    x = torch.randn(5, D_IN, dtype=torch.float64)
    fresh = fastlora.load_adapter(drop_in(2.0, 7.0), tmp_path / "ckpt")
    assert torch.equal(fresh(x), model(x))
    for other, match in [(drop_in(2.0, 1.0), r"layer 2: .*alpha=7.0 \(model: 1.0\)"),
                         (drop_in(2.0, 7.0, dropout=0.1), r"layer 2: .*dropout=0.0 \(model: 0.1\)")]:
        values = adapter_values(other)
        with pytest.raises(ValueError, match=match):
            fastlora.load_adapter(other, tmp_path / "ckpt")
        assert same_values(adapter_values(other), values)
    plain = _base()
    plain[0].load_state_dict({"weight": model[0].weight, "bias": model[0].bias})
    plain[2].load_state_dict({"weight": model[2].weight, "bias": model[2].bias})
    injected = fastlora.load_adapter(plain, tmp_path / "ckpt")  # each layer injected with its own r and alpha
    assert [(layer.config.r, layer.config.alpha) for _, layer in fastlora.adapter_layers(injected)] == [(2, 2.0),
                                                                                                      (3, 7.0)]
    assert torch.equal(injected(x), model(x))
    fastlora.save_adapter(drop_in(2.0, 7.0, dropout=0.1), tmp_path / "dropout")
    plain = _base()
    with pytest.raises(ValueError, match=r"checkpoint layers '0' and '2' differ in dropout \(0.0 vs 0.1\); .*only r "
                                         r"and alpha may differ per layer"):
        fastlora.load_adapter(plain, tmp_path / "dropout")
    assert not list(fastlora.adapter_layers(plain)) and all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("config, field, match", [
    (LoraConfig(r=3, alpha=2.0), {"alpha": 3.0}, r"alpha=2.0 \(model: 3.0\)"),
    (LoraConfig(r=3, alpha=2.0), {"use_rslora": True}, r"use_rslora=False \(model: True\)"),
    (NeatConfig(r=3, activation="relu"), {"activation": "tanh"}, r"activation='relu' \(model: 'tanh'\)"),
    (SelectiveLoraConfig(r=3, threshold=0.1, score_init=0.3), {"threshold": 0.2}, r"threshold=0.1 \(model: 0.2\)"),
])
def test_load_refuses_a_config_that_changes_the_computation(tmp_path, config, field, match):
    fastlora.save_adapter(_adapted(config), tmp_path / "ckpt")
    other = _adapted(dataclasses.replace(config, **field), seed=4)
    values = adapter_values(other)
    with pytest.raises(ValueError, match=match):
        fastlora.load_adapter(other, tmp_path / "ckpt")
    assert same_values(adapter_values(other), values)


def _curlora_checkpoint(tmp_path):
    model = _adapted(CurLoraConfig(r=3, alpha=1.5))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    return model


@pytest.mark.parametrize("edit, match", [
    (lambda s: s["0.adapter.U"].__setitem__((1, 2), float("nan")), "'0.adapter.U' has 1 non-finite"),
    (lambda s: s["2.adapter.U"].__setitem__((0, 0), float("inf")), "'2.adapter.U' has 1 non-finite"),
    (lambda s: s.__setitem__("0.adapter.U", s["0.adapter.U"].long()), "0.adapter.U: checkpoint dtype torch.int64"),
    (lambda s: s.__setitem__("0.adapter.row_index", s["0.adapter.row_index"].double()),
     "0.adapter.row_index: checkpoint dtype torch.float64 is not an integer"),
    (lambda s: s["0.adapter.row_index"].__setitem__(1, D_HID), r"0.adapter.row_index: .*outside \[0, 10\)"),
    (lambda s: s["2.adapter.col_index"].__setitem__(0, D_HID), r"2.adapter.col_index: .*outside \[0, 10\)"),
    (lambda s: s["0.adapter.col_index"].__setitem__(2, -1), r"0.adapter.col_index: .*\[-1, "),
    (lambda s: s.__setitem__("0.adapter.extra", torch.ones(2)), "unexpected"),
])
def test_load_checks_dtypes_finiteness_and_index_ranges(tmp_path, edit, match):
    _curlora_checkpoint(tmp_path)
    _rewrite(tmp_path / "ckpt", edit_state=edit)
    plain = _base()
    with pytest.raises(ValueError, match=match):
        fastlora.load_adapter(plain, tmp_path / "ckpt")
    assert not list(fastlora.adapter_layers(plain)) and all(p.requires_grad for p in plain.parameters())
    injected = fastlora.inject(_base(), CurLoraConfig(r=3, alpha=1.5))
    values = adapter_values(injected)
    with pytest.raises(ValueError, match=match):
        fastlora.load_adapter(injected, tmp_path / "ckpt")
    assert same_values(adapter_values(injected), values)


def test_a_failed_load_into_a_plain_model_leaves_it_plain(tmp_path):
    fastlora.save_adapter(_adapted(LoraConfig(r=3)), tmp_path / "ckpt")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(D_IN, D_HID + 1, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(D_HID + 1, D_OUT, dtype=torch.float64))
    modules = list(plain)
    with pytest.raises(ValueError, match="checkpoint shape"):
        fastlora.load_adapter(plain, tmp_path / "ckpt")
    assert list(plain) == modules and all(p.requires_grad for p in plain.parameters())


def test_a_drop_in_checkpoint_loads_into_the_plain_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(AdapterLinear(D_IN, D_HID, config=LoraConfig(r=3), dtype=torch.float64), nn.Tanh(),
                          nn.Linear(D_HID, D_OUT, dtype=torch.float64))
    with torch.no_grad():
        model[0].adapter.lora_B.copy_(torch.randn_like(model[0].adapter.lora_B))
    assert model[0].config.target_modules is None
    fastlora.save_adapter(model, tmp_path / "ckpt")
    plain = nn.Sequential(nn.Linear(D_IN, D_HID, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(D_HID, D_OUT, dtype=torch.float64))
    plain[0].weight.data.copy_(model[0].weight)
    plain[0].bias.data.copy_(model[0].bias)
    plain[2].load_state_dict(model[2].state_dict())
    loaded = fastlora.load_adapter(plain, tmp_path / "ckpt")
    assert isinstance(loaded[0], AdapterLinear) and type(loaded[2]) is nn.Linear
    x = torch.randn(4, D_IN, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))


def test_an_old_zero_dim_selective_score_loads(tmp_path):
    model = _adapted(SelectiveLoraConfig(r=3))
    with torch.no_grad():
        model[0].adapter.score.fill_(0.75)
    fastlora.save_adapter(model, tmp_path / "ckpt")
    _rewrite(tmp_path / "ckpt", edit_state=lambda s: s.__setitem__("0.adapter.score", s["0.adapter.score"].reshape(())))
    loaded = fastlora.load_adapter(_base(), tmp_path / "ckpt")
    assert loaded[0].adapter.score.shape == (1,) and loaded[0].adapter.score.item() == 0.75


def test_a_format_1_checkpoint_still_loads(tmp_path):
    model = _adapted(LoraConfig(r=3, alpha=2.0))
    fastlora.save_adapter(model, tmp_path / "ckpt")

    def as_version_1(meta):
        meta.update(format_version=1, layers=list(meta["layers"]))
        del meta["weights_sha256"]

    _rewrite(tmp_path / "ckpt", edit_meta=as_version_1)
    assert same_values(adapter_values(fastlora.load_adapter(_base(), tmp_path / "ckpt")), adapter_values(model))


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"format_version": 2}), "field 'config' must be a JSON object, got NoneType"),
    (json.dumps({"format_version": 2, "config": {"method": "nope"}}), "field 'config': unknown adapter method"),
    (json.dumps({"format_version": 2, "config": {"method": "lora", "r": "x"}}), "field 'config': .*r"),
    (json.dumps({"format_version": 2, "config": {"method": "lora", "rank": 2}}), "field 'config': unknown fields"),
    (json.dumps({"format_version": 2, "config": {"method": "lora"}, "layers": ["0"]}), "field 'layers' must be"),
    (json.dumps({"format_version": 2, "config": {"method": "lora"}, "layers": {"0": {"method": "lora", "r": 0}}}),
     "field 'layers.0'"),
    (json.dumps({"format_version": 2, "config": {"method": "lora"}, "layers": {"0": {"method": "lora"}}}),
     "field 'weights_sha256'"),
    (json.dumps({"format_version": 1, "config": {"method": "lora"}, "layers": "0"}), "field 'layers' must be"),
    (json.dumps({"format_version": 7}), "unsupported format_version 7"),
])
def test_a_malformed_config_file_names_the_file_and_field(tmp_path, text, match):
    fastlora.save_adapter(_adapted(LoraConfig(r=3)), tmp_path / "ckpt")
    (tmp_path / "ckpt" / checkpoint.CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        fastlora.load_adapter(_base(), tmp_path / "ckpt")
    assert checkpoint.CONFIG_FILE in str(error.value)


def test_a_malformed_weights_file_names_the_file(tmp_path):
    fastlora.save_adapter(_adapted(LoraConfig(r=3)), tmp_path / "ckpt")
    (tmp_path / "ckpt" / checkpoint.WEIGHTS_FILE).write_bytes(b"\x08garbage")
    _rewrite(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=f"{checkpoint.WEIGHTS_FILE}: not a readable safetensors file"):
        fastlora.load_adapter(_base(), tmp_path / "ckpt")


def _chain(n, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(4, 4, dtype=torch.float64) for _ in range(n)))


def test_an_adapted_model_refuses_a_checkpoint_of_other_layers_naming_the_first_five(tmp_path):
    fastlora.save_adapter(fastlora.inject(_chain(7), LoraConfig(r=2)), tmp_path / "every")
    fastlora.save_adapter(fastlora.inject(_chain(7), LoraConfig(r=2, target_modules=["0"])), tmp_path / "first")
    fit = "checkpoint does not fit the model: checkpoint layers missing from the model's adapter layers "
    for model_targets, saved, missing, unexpected in [(["0"], "every", "['1', '2', '3', '4', '5']", "[]"),
                                                      (None, "first", "[]", "['1', '2', '3', '4', '5']")]:
        model = fastlora.inject(_chain(7), LoraConfig(r=2, target_modules=model_targets))
        values = adapter_values(model)
        with pytest.raises(ValueError, match=re.escape(f"{fit}{missing}, model adapter layers missing from the "
                                                       f"checkpoint {unexpected}")):
            fastlora.load_adapter(model, tmp_path / saved)
        assert same_values(adapter_values(model), values)


def test_a_merged_model_refuses_to_load_adapters(tmp_path):
    model = _adapted(LoraConfig(r=2, target_modules=["0", "2"]))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    fastlora.merge(model)
    with pytest.raises(ValueError, match="^layer 0 is merged; unmerge before loading adapters$"):
        fastlora.load_adapter(model, tmp_path / "ckpt")


def test_a_saved_parameter_of_another_shape_is_refused(tmp_path):
    fastlora.save_adapter(_adapted(LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"])), tmp_path / "ckpt")
    _rewrite(tmp_path / "ckpt", edit_state=lambda state: state.update({"2.weight": state["2.weight"][:-1]}))
    model = _base()
    with pytest.raises(ValueError, match=re.escape("checkpoint parameter '2.weight': torch.float64 (6, 10) does not "
                                                   "fit the model's torch.float64 (7, 10)")):
        fastlora.load_adapter(model, tmp_path / "ckpt")
    assert not list(fastlora.adapter_layers(model))


def test_differing_fields_count_a_key_one_side_lacks_as_none():
    ours, theirs = {"a": 1, "b": 2, "c": 3, "e": 0}, {"a": 1, "c": 4, "d": None, "e": 5}
    assert checkpoint.differing_fields(ours, theirs, ignored=("e",)) == ["b", "c"]


def test_a_checkpoint_loads_into_a_plain_model_keeping_its_targets_or_naming_its_layers(tmp_path):
    """Targets that select exactly the checkpoint's layers stay the config's; targets that select more (a
    checkpoint written with other tools) are replaced by the layers' names, so only those are adapted."""
    nested = lambda: nn.Sequential(_base())  # noqa: E731  (Linear layers "0.0" and "0.2")
    model = fastlora.inject(nested(), LoraConfig(r=2, target_modules=["2"]))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    loaded = fastlora.load_adapter(nested(), tmp_path / "ckpt")
    assert [(name, layer.config.target_modules) for name, layer in fastlora.adapter_layers(loaded)] == [("0.2", ("2",))]

    def widen(meta):
        for config in (meta["config"], *meta["layers"].values()):
            config["target_modules"] = ["0", "2"]  # "0" also selects "0.0", which the checkpoint lacks
    _rewrite(tmp_path / "ckpt", edit_meta=widen)
    loaded = fastlora.load_adapter(nested(), tmp_path / "ckpt")
    assert [(name, layer.config.target_modules) for name, layer in fastlora.adapter_layers(loaded)] == [
        ("0.2", ("0.2",))]
    assert same_values(adapter_values(loaded), adapter_values(model))


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
        self.fc = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_a_checkpoint_of_a_linear_loads_beside_a_plain_attention_and_an_in_projection_alone_is_refused(tmp_path):
    fastlora.save_adapter(fastlora.inject(_AttentionBlock(), LoraConfig(r=2, target_modules=["fc"])), tmp_path / "fc")
    loaded = fastlora.load_adapter(_AttentionBlock(), tmp_path / "fc")
    assert [name for name, _ in fastlora.adapter_layers(loaded)] == ["fc"]
    assert type(loaded.attn) is nn.MultiheadAttention

    fastlora.save_adapter(fastlora.inject(_AttentionBlock(), LoraConfig(r=2, target_modules=["attn"])),
                          tmp_path / "in")

    def drop_out_proj_tensors(state):
        for key in [k for k in state if k.startswith("attn.out_proj.")]:
            del state[key]
    _rewrite(tmp_path / "in", edit_state=drop_out_proj_tensors, edit_meta=lambda meta: meta["layers"].pop(
        "attn.out_proj"))
    model = _AttentionBlock()
    with pytest.raises(ValueError, match="checkpoint adapts the in-projection of 'attn' without its out_proj"):
        fastlora.load_adapter(model, tmp_path / "in")
    assert type(model.attn) is nn.MultiheadAttention


def test_a_checkpoint_with_tensors_the_model_lacks_names_the_first_five(tmp_path):
    model = _adapted(LoraConfig(r=2, target_modules=["0", "2"]))
    fastlora.save_adapter(model, tmp_path / "ckpt")
    extra = [f"0.adapter.extra_{i}" for i in range(7)]
    _rewrite(tmp_path / "ckpt", edit_state=lambda state: state.update({k: torch.zeros(1) for k in extra}))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint does not fit the model: missing [], unexpected "
                                                   f"{extra[:5]}")):
        fastlora.load_adapter(model, tmp_path / "ckpt")

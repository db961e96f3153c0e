"""What a save that crashed hard between its two renames leaves behind: the refusal names the hidden temp
file holding the old weights (renaming it back gives the old adapter) and the one holding the new config;
the next successful save removes them. Files written by a save get the umask's mode."""
import os
import stat

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoraConfig, checkpoint

from utils import adapter_values, randomize_adapters, same_values


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 7, dtype=torch.float64), nn.Tanh(), nn.Linear(7, 5, dtype=torch.float64))


def _adapted(seed):
    return randomize_adapters(fastlora.inject(_base(), LoraConfig(r=2, alpha=3.0)), seed)


def _hidden(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith(".adapter_") and p.endswith(".tmp"))


class Killed(BaseException):
    """The process dies: nothing after it runs (no except clause catches a BaseException of ours)."""


def _crash_between_the_renames(monkeypatch, model, directory):
    """save_adapter dies (no cleanup: every later rename and unlink fails) right after the weights' rename."""
    renames = []
    replace, unlink = os.replace, os.unlink

    def dying_replace(*args, **kwargs):
        renames.append(args)
        if len(renames) > 1:
            raise Killed("killed")
        return replace(*args, **kwargs)

    def dead_unlink(*args, **kwargs):
        if len(renames) > 1:
            raise Killed("dead")
        return unlink(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", dying_replace)
        patch.setattr(os, "unlink", dead_unlink)
        with pytest.raises(Killed):
            fastlora.save_adapter(model, directory)


def test_the_refusal_names_the_leftovers_and_the_next_save_removes_them(tmp_path, monkeypatch):
    old, new = _adapted(1), _adapted(2)
    directory = tmp_path / "ckpt"
    fastlora.save_adapter(old, directory)
    _crash_between_the_renames(monkeypatch, new, directory)
    hidden = _hidden(directory)
    weights_tmp = [n for n in hidden if n.startswith("." + checkpoint.WEIGHTS_FILE)]
    config_tmp = [n for n in hidden if n.startswith("." + checkpoint.CONFIG_FILE)]
    assert len(weights_tmp) == 1 and len(config_tmp) == 2, hidden  # the old weights; the old and new configs
    old_config = (directory / checkpoint.CONFIG_FILE).read_bytes()
    copy, = [n for n in config_tmp if (directory / n).read_bytes() == old_config]
    new_config, = [n for n in config_tmp if n != copy]
    with pytest.raises(ValueError) as refused:
        fastlora.load_adapter(_base(), directory)
    message = str(refused.value)
    assert "different saves" in message
    assert f"{weights_tmp[0]} holds the weights adapter_config.json was saved with (rename it to " \
           f"adapter_model.safetensors to load the previous adapter)" in message
    assert f"{new_config} holds the config of the weights in place (rename it to adapter_config.json to load " \
           f"the new adapter)" in message
    assert f"{copy}: a copy of adapter_config.json" in message
    # temp files of other saves are told apart from these
    (directory / ".adapter_model.safetensors.0123456789ab.tmp").write_bytes(b"other weights")
    (directory / ".adapter_config.json.0123456789ab.tmp").write_text('{"weights_sha256": "0"}')
    with pytest.raises(ValueError) as refused:
        fastlora.load_adapter(_base(), directory)
    assert ".adapter_model.safetensors.0123456789ab.tmp: other weights" in str(refused.value)
    assert ".adapter_config.json.0123456789ab.tmp: another config" in str(refused.value)
    for name in (".adapter_model.safetensors.0123456789ab.tmp", ".adapter_config.json.0123456789ab.tmp"):
        (directory / name).unlink()
    # following the message gives the old adapter back, bit for bit
    recovered = tmp_path / "recovered"
    recovered.mkdir()
    os.link(directory / weights_tmp[0], recovered / checkpoint.WEIGHTS_FILE)
    os.link(directory / checkpoint.CONFIG_FILE, recovered / checkpoint.CONFIG_FILE)
    assert same_values(adapter_values(fastlora.load_adapter(_base(), recovered)), adapter_values(old))
    completed = tmp_path / "completed"  # or the new one, with the config the crash kept from its place
    completed.mkdir()
    os.link(directory / checkpoint.WEIGHTS_FILE, completed / checkpoint.WEIGHTS_FILE)
    os.link(directory / new_config, completed / checkpoint.CONFIG_FILE)
    assert same_values(adapter_values(fastlora.load_adapter(_base(), completed)), adapter_values(new))
    # the next successful save removes what the crash left, and only that
    (directory / ".adapter_model.safetensors.notours.tmp").write_bytes(b"x")
    fastlora.save_adapter(new, directory)
    assert _hidden(directory) == [".adapter_model.safetensors.notours.tmp"]
    assert same_values(adapter_values(fastlora.load_adapter(_base(), directory)), adapter_values(new))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_mode_and_a_replaced_file_keeps_its_own(tmp_path, umask):
    previous = os.umask(umask)
    try:
        for save in (fastlora.save_adapter, fastlora.save_peft_adapter):
            directory = tmp_path / f"{save.__name__}-{umask:o}"
            save(_adapted(1), directory)
            for name in (checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE):
                assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o666 & ~umask, (save.__name__, name)
            os.chmod(directory / checkpoint.WEIGHTS_FILE, 0o640)
            save(_adapted(2), directory)
            assert stat.S_IMODE(os.stat(directory / checkpoint.WEIGHTS_FILE).st_mode) == 0o640
            assert stat.S_IMODE(os.stat(directory / checkpoint.CONFIG_FILE).st_mode) == 0o666 & ~umask
    finally:
        os.umask(previous)

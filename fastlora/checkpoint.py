"""save_adapter / load_adapter: adapter tensors (safetensors) + config (JSON), written atomically.

Layout of a checkpoint directory::

    adapter_config.json        {"fastlora_version", "config": {...}, "layers": [...]}
    adapter_model.safetensors  "<layer name>.adapter.<tensor name>" -> tensor

The directory is written beside the target under a temporary name and renamed into
place, so a reader never sees a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .inject import adapter_layers, inject

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and persistent buffers), keyed by qualified name."""
    state = {}
    for name, layer in adapter_layers(model):
        for key, tensor in layer.adapter.state_dict().items():
            state[f"{name}.adapter.{key}"] = tensor.detach().contiguous().cpu()
    return state


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write the model's adapters to ``directory`` (replaced atomically if it exists)."""
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no fastlora adapters to save")
    meta = {"format_version": FORMAT_VERSION, "config": layers[0][1].config.to_dict(),
            "layers": [name for name, _ in layers]}

    def write(staging: Path) -> None:
        save_file(adapter_state_dict(model), str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    return write_directory_atomically(directory, write)


def write_directory_atomically(directory: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Call ``write(staging)`` on a fresh directory beside ``directory``, then rename it into
    place (replacing an existing directory), so a reader never sees a half-written one."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def read_adapter_config(directory: Union[str, os.PathLike]) -> AdapterConfig:
    """The AdapterConfig stored in a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return AdapterConfig.from_dict(meta["config"])


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Load adapters saved by ``save_adapter`` into ``model``.

    A model without adapters is injected first with the stored config. Missing or
    unexpected tensors, shape mismatches, another method or merged layers raise.
    """
    config = read_adapter_config(directory)
    layers = list(adapter_layers(model))
    if not layers:
        inject(model, config)
        layers = list(adapter_layers(model))
    for name, layer in layers:
        if layer.config.method != config.method:
            raise ValueError(f"layer {name} has a {layer.config.method!r} adapter, checkpoint is {config.method!r}")
        if layer.merged:
            raise ValueError(f"layer {name} is merged; unmerge before loading adapters")
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    expected = {f"{name}.adapter.{key}": t for name, layer in layers
                for key, t in layer.adapter.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape "
                             f"{tuple(expected[key].shape)}")
    for name, layer in layers:
        prefix = f"{name}.adapter."
        layer.adapter.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return model

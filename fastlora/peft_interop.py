"""PEFT interop: load PEFT LoRA / PEANuT checkpoints as fastlora adapters, export them back.

PEFT's ``save_pretrained`` layout (adapter name stripped from the keys)::

    adapter_config.json         {"peft_type": "LORA" | "PEANUT", "r": ..., ...}
    adapter_model.safetensors   "base_model.model.<module path>.<tensor>" -> tensor

Tensors of a Linear (d_out, d_in), and the fastlora adapter tensors they become:
    LORA    lora_A.weight (r, d_in) -> lora_A, lora_B.weight (d_out, r) -> lora_B;
            update (lora_alpha / r) B A (lora_alpha / sqrt(r) with use_rslora).
    PEANUT  peanut_A.weight (r, d_out) -> neat_A, peanut_B.weight (d_out, r) -> neat_B,
            peanut_{encoders,decoders}.{i}.weight (r, r) -> {encoders,decoders}.{i}.weight;
            act_fn -> activation, scaling -> scale (NeatConfig).

modules_to_save (a SEQ_CLS classifier head): "base_model.model.<module path>.<parameter>" -> the
model's parameter of that name, trainable (fastlora's save_adapter keeps such parameters too).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from safetensors.torch import load_file
from torch import Tensor, nn

from .checkpoint import (CONFIG_FILE, WEIGHTS_FILE, check_saved_parameters, restore_saved_parameters,
                         trainable_non_adapter_parameters, write_files_atomically, write_json, write_safetensors)
from .config import AdapterConfig, LoraConfig, NeatConfig
from .inject import _matches, adapter_layers, inject

KEY_PREFIX = "base_model.model."

# PEFT LoRA fields that change the computation in ways fastlora cannot represent, each with
# the one value accepted (None / False also accept any empty value).
_LORA_UNSUPPORTED = {
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
    "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "alora_invocation_tokens": None, "use_qalora": False,
    "megatron_config": None, "velora_config": None, "monteclora_config": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None,
}


@dataclasses.dataclass(frozen=True)
class _PeftFormat:
    """How one peft_type maps onto fastlora.

    config: PEFT config dict -> fastlora config (raises on what it cannot represent).
    tensor_shapes: (fastlora config, d_in, d_out) -> {PEFT tensor name of a layer: shape}.
    adapter_state: {PEFT tensor name: tensor} of a layer -> the fastlora adapter's state dict.
    peft_config: fastlora config -> the method's fields of PEFT's adapter_config.json.
    peft_tensors: the fastlora adapter's state dict -> {PEFT tensor name: tensor} of a layer.
    """

    config: Callable[[dict[str, Any]], AdapterConfig]
    tensor_shapes: Callable[[AdapterConfig, int, int], dict[str, tuple[int, ...]]]
    adapter_state: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    peft_config: Callable[[AdapterConfig], dict[str, Any]]
    peft_tensors: Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _check_unsupported(peft: dict[str, Any], unsupported: dict[str, Any]) -> None:
    peft_type = peft["peft_type"]
    for field, accepted in unsupported.items():
        value = peft.get(field, accepted)
        ok = not value if accepted in (None, False) else value == accepted
        if not ok:
            raise ValueError(f"PEFT {peft_type} config has {field}={value!r}, which fastlora cannot represent "
                             f"(only {accepted!r} is supported)")


def _peft_targets(peft: dict[str, Any]):
    """PEFT's target_modules (saved from a set, so in arbitrary order) as a sorted list, or its regex."""
    targets = peft.get("target_modules")
    return sorted(targets) if isinstance(targets, (list, tuple, set)) else targets


def _lora_config(peft: dict[str, Any]) -> LoraConfig:
    _check_unsupported(peft, _LORA_UNSUPPORTED)
    r, alpha = peft.get("r", 8), peft.get("lora_alpha", 8)
    for field, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        differing = {k: v for k, v in (peft.get(field) or {}).items() if v != default}
        if differing:
            raise ValueError(f"PEFT LORA config has {field}={differing!r} differing from {default!r}; "
                             f"fastlora uses one rank and alpha for every layer")
    return LoraConfig(r=r, alpha=float(alpha), use_rslora=bool(peft.get("use_rslora", False)),
                      dropout=float(peft.get("lora_dropout", 0.0)), target_modules=_peft_targets(peft))


# transformers ACT2FN names (PEANuT's act_fn) -> fastlora activations computing the same function.
_PEANUT_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu", "tanh": "tanh",
                       "sigmoid": "sigmoid", "linear": "identity"}


def _neat_config(peft: dict[str, Any]) -> NeatConfig:
    act_fn = peft.get("act_fn", "relu")
    if act_fn not in _PEANUT_ACTIVATIONS:
        raise ValueError(f"PEFT PEANUT config has act_fn={act_fn!r}; fastlora supports {sorted(_PEANUT_ACTIVATIONS)}")
    return NeatConfig(r=peft.get("r", 32), depth=peft.get("depth", 0), activation=_PEANUT_ACTIVATIONS[act_fn],
                      scale=float(peft.get("scaling", 1.0)), target_modules=_peft_targets(peft))


def _peanut_shapes(config: NeatConfig, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    shapes = {"peanut_A.weight": (config.r, d_out), "peanut_B.weight": (d_out, config.r)}
    for side in ("encoders", "decoders"):
        shapes.update({f"peanut_{side}.{i}.weight": (config.r, config.r) for i in range(config.depth)})
    return shapes


_PEANUT_FACTORS = {"peanut_A.weight": "neat_A", "peanut_B.weight": "neat_B"}


def _neat_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {_PEANUT_FACTORS.get(name, name.removeprefix("peanut_")): t for name, t in tensors.items()}


def _peanut_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``_neat_state``: neat_A -> peanut_A.weight, encoders.0.weight -> peanut_encoders.0.weight."""
    names = {ours: theirs for theirs, ours in _PEANUT_FACTORS.items()}
    return {names.get(key, "peanut_" + key): t for key, t in state.items()}


def _peanut_config(config: NeatConfig) -> dict[str, Any]:
    act_fn = next(name for name, ours in _PEANUT_ACTIVATIONS.items() if ours == config.activation)
    return {"r": config.r, "depth": config.depth, "act_fn": act_fn, "scaling": config.scale, "init_weights": True}


def _lora_peft_config(config: LoraConfig) -> dict[str, Any]:
    return {"r": config.r, "lora_alpha": config.alpha, "use_rslora": config.use_rslora,
            "lora_dropout": config.dropout, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
            "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


_FORMATS: dict[str, _PeftFormat] = {
    "LORA": _PeftFormat(
        config=_lora_config,
        tensor_shapes=lambda c, d_in, d_out: {"lora_A.weight": (c.r, d_in), "lora_B.weight": (d_out, c.r)},
        adapter_state=lambda t: {"lora_A": t["lora_A.weight"], "lora_B": t["lora_B.weight"]},
        peft_config=_lora_peft_config,
        peft_tensors=lambda s: {"lora_A.weight": s["lora_A"], "lora_B.weight": s["lora_B"]},
    ),
    "PEANUT": _PeftFormat(config=_neat_config, tensor_shapes=_peanut_shapes, adapter_state=_neat_state,
                          peft_config=_peanut_config, peft_tensors=_peanut_tensors),
}
#: fastlora config types PEFT can hold -> their peft_type (subclasses such as Selective LoRA excluded)
_EXPORTS: dict[type, str] = {LoraConfig: "LORA", NeatConfig: "PEANUT"}


def _read_peft_checkpoint(directory: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    root = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"no {name} in {directory} (expected a PEFT save_pretrained directory)")
    return json.loads((root / CONFIG_FILE).read_text()), load_file(str(root / WEIGHTS_FILE))


def _saved_module_tensors(peft: dict[str, Any], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Take the tensors of PEFT's modules_to_save out of ``state``: parameter name -> tensor."""
    modules = peft.get("modules_to_save") or []
    saved = {}
    for key in list(state):
        parts = key[len(KEY_PREFIX):].split(".")[:-1]
        paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the module and those holding it
        if key.startswith(KEY_PREFIX) and any(p == m or p.endswith("." + m) for p in paths for m in modules):
            saved[key[len(KEY_PREFIX):]] = state.pop(key)
    return saved


def _layer_tensors(state: dict[str, Tensor], names: list[str]) -> dict[str, dict[str, Tensor]]:
    """Group "base_model.model.<path>.<name>" keys by module path; unknown keys raise."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        name = next((n for n in names if key.endswith("." + n)), None)
        if not key.startswith(KEY_PREFIX) or name is None:
            raise ValueError(f"PEFT checkpoint tensor {key!r} is not one of {names} under {KEY_PREFIX!r}; "
                             f"fastlora cannot represent it")
        layers.setdefault(key[len(KEY_PREFIX):-len(name) - 1], {})[name] = tensor
    return layers


def _check_layers(model: nn.Module, config: AdapterConfig, fmt: _PeftFormat,
                  layers: dict[str, dict[str, Tensor]]) -> None:
    """Every checkpoint layer is an nn.Linear of the model holding the tensors of the expected shapes."""
    for path, tensors in layers.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"PEFT checkpoint adapts module {path!r}, which the model lacks") from None
        if type(module) is not nn.Linear:
            raise ValueError(f"PEFT checkpoint adapts {path!r}, a {type(module).__name__}; "
                             f"fastlora adapts nn.Linear only")
        d_out, d_in = module.weight.shape
        if config.r > min(d_in, d_out):
            raise ValueError(f"PEFT rank r={config.r} exceeds min(d_in={d_in}, d_out={d_out}) of {path!r}")
        shapes = fmt.tensor_shapes(config, d_in, d_out)
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise ValueError(f"PEFT checkpoint lacks {missing} for module {path!r}")
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"PEFT tensor {path}.{name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {shape}")


def _fastlora_targets(model: nn.Module, targets, paths: set[str]):
    """PEFT's target_modules when fastlora's matching selects exactly the checkpoint's layers
    (same rule as PEFT for a list or a regex), else the list of those layers' paths
    (exclude_modules, layers_to_transform, "all-linear" without the output layer)."""
    if isinstance(targets, (list, tuple, str)) and targets != "all-linear":
        linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
        if {n for n in linears if _matches(n, targets)} == paths:
            return targets
    return sorted(paths)


def load_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Load a PEFT checkpoint directory (peft_type "LORA" or "PEANUT") into ``model``, a model
    without adapters, as fastlora adapters (LoraConfig / NeatConfig) that compute the same
    outputs; returns ``model``. Tensors of modules_to_save (a classifier head) are copied into the
    model's parameters of those names, which become trainable.

    Everything is checked before the model is changed. Raises ValueError naming the field
    or tensor for what fastlora cannot represent: another peft_type, DoRA, per-layer
    rank_pattern/alpha_pattern values, bias != "none", fan_in_fan_out,
    other LoRA variants, non-Linear targets, PEANuT activations fastlora lacks.
    """
    if next(adapter_layers(model), None) is not None:
        raise ValueError("model already has fastlora adapters; load a PEFT checkpoint into a plain model")
    peft, state = _read_peft_checkpoint(directory)
    peft_type = peft.get("peft_type")
    if peft_type not in _FORMATS:
        raise ValueError(f"unsupported peft_type {peft_type!r}; fastlora loads {sorted(_FORMATS)}")
    fmt = _FORMATS[peft_type]
    config = fmt.config(peft)
    saved = _saved_module_tensors(peft, state)
    layers = _layer_tensors(state, list(fmt.tensor_shapes(config, 0, 0)))  # names do not depend on dims
    if not layers:
        raise ValueError(f"PEFT checkpoint in {directory} holds no adapter tensors")
    _check_layers(model, config, fmt, layers)
    targets = check_saved_parameters(model, saved)
    inject(model, dataclasses.replace(config, target_modules=_fastlora_targets(model, config.target_modules,
                                                                                set(layers))))
    for path, layer in adapter_layers(model):
        layer.adapter.load_state_dict(fmt.adapter_state(layers[path]))
    restore_saved_parameters(targets, saved)
    return model


def save_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike],
                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the model's fastlora LoRA (peft_type "LORA") or NEAT (peft_type "PEANUT") adapters
    in PEFT's format, so that ``peft.PeftModel.from_pretrained(base, directory)``
    computes the same outputs.

    target_modules is written as the list of adapted module paths (exact under PEFT's
    matching); trainable parameters outside the adapters (a classifier head) as modules_to_save.
    The two files are replaced as ``save_adapter`` replaces its own (created when missing,
    nothing else in the directory touched, old files restored on an exception); PEFT's
    format records no digest, so a hard crash between the two renames can leave new weights
    beside the old config. Raises ValueError for other methods, merged layers or differing configs.
    """
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no fastlora adapters to export")
    config = layers[0][1].config
    for name, layer in layers:
        if type(layer.config) not in _EXPORTS:
            raise ValueError(f"layer {name} has a {layer.config.method!r} adapter; PEFT export supports "
                             f"plain LoRA (LoraConfig) and NEAT (NeatConfig, PEFT's PEANuT) only")
        if layer.config != config:
            raise ValueError(f"layer {name} has config {layer.config}, unlike {layers[0][0]}'s {config}")
        if layer.merged:
            raise ValueError(f"layer {name} is merged; unmerge before exporting")
    peft_type = _EXPORTS[type(config)]
    fmt = _FORMATS[peft_type]
    extra = trainable_non_adapter_parameters(model)
    modules_to_save = sorted({name.rpartition(".")[0] for name in extra}) or None
    meta = {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True, "target_modules": [name for name, _ in layers],
            "modules_to_save": modules_to_save, **fmt.peft_config(config)}
    tensors = {f"{KEY_PREFIX}{name}.{key}": tensor.detach().contiguous().cpu()
               for name, layer in layers for key, tensor in fmt.peft_tensors(layer.adapter.state_dict()).items()}
    tensors.update({f"{KEY_PREFIX}{name}": p.detach().contiguous().cpu() for name, p in extra.items()})

    return write_files_atomically(directory, [
        (WEIGHTS_FILE, lambda path: write_safetensors(path, tensors, metadata={"format": "pt"})),
        (CONFIG_FILE, lambda path: write_json(path, meta)),
    ])

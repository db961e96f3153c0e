"""PEFT interop: load PEFT LoRA / PEANuT checkpoints as fastlora adapters, export them back.

PEFT's ``save_pretrained`` layout (adapter name stripped from the keys)::

    adapter_config.json         {"peft_type": "LORA" | "PEANUT", "r": ..., ...}
    adapter_model.safetensors   "base_model.model.<module path>.<tensor>" -> tensor

Tensors of a Linear (d_out, d_in), and the fastlora adapter tensors they become:
    LORA    lora_A.weight (r, d_in) -> lora_A, lora_B.weight (d_out, r) -> lora_B;
            update (lora_alpha / r) B A (lora_alpha / sqrt(r) with use_rslora), r and lora_alpha
            per layer where rank_pattern / alpha_pattern give them. The same shapes
            over GPT-2's Conv1D (weight stored (d_in, d_out)), which PEFT marks fan_in_fan_out=True.
    PEANUT  peanut_A.weight (r, d_out) -> neat_A, peanut_B.weight (d_out, r) -> neat_B,
            peanut_{encoders,decoders}.{i}.weight (r, r) -> {encoders,decoders}.{i}.weight;
            act_fn -> activation, scaling -> scale (NeatConfig).

nn.MultiheadAttention (PEFT's LORA only; its layer adapts the packed in-projection and out_proj together):
    "<attention>.{lora_A,lora_B}.weight" (r, E), (3 E, r) -> the "<attention>.in_proj" adapter;
    "<attention>.base_layer.out_proj.{...}" -> the "<attention>.out_proj" adapter, lora_B times the number
    of times the checkpoint's PEFT adds its out_proj update (``peft_out_proj_updates`` of its "peft_version":
    twice before PEFT 0.22, once from 0.22); an export divides it back for the installed PEFT (or the newest
    known) and records that version, so that outputs match PEFT's both ways. Both projections take the
    attention's r and alpha.

modules_to_save (a SEQ_CLS classifier head): "base_model.model.<module path>.<parameter>" -> the
model's parameter of that name, trainable (fastlora's save_adapter keeps such parameters too).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .atomic_files import write_files_atomically, write_json, write_safetensors
from .attention import AdapterMultiheadAttention, is_attention
from .checkpoint import (
    CONFIG_FILE,
    UNSAVABLE,
    WEIGHTS_FILE,
    adapters_sharded,
    check_finite,
    check_saved_parameters,
    differing_fields,
    restore_saved_parameters,
    saved_non_adapter_tensors,
)
from .config import AdapterConfig
from .inject import inject
from .layer import AdapterLinear, is_adaptable, linear_shape
from .model_tree import adapter_layers, unwrapped
from .parallel_guards import refuse_new_adapters
from .peft_formats import NEWEST_KNOWN_PEFT, PeftFormat, peft_out_proj_updates, peft_release
from .registry import method_of, peft_methods
from .targets import exact_name_pattern, layer_config, matches_targets

KEY_PREFIX = "base_model.model."
OUT_PROJ = ".base_layer.out_proj"  # PEFT's path of an adapted attention's out_proj, under the attention

#: the weights file of ``save_pretrained(safe_serialization=False)``, read when there is no safetensors file
PICKLED_WEIGHTS_FILE = "adapter_model.bin"


def _read_peft_checkpoint(directory: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json, the tensors) of a PEFT checkpoint directory: adapter_model.safetensors, or the
    pickled adapter_model.bin (read with ``torch.load(weights_only=True)``: tensors only, no code run)."""
    root = Path(directory)
    if not (root / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory} (expected a PEFT save_pretrained directory)")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{root / CONFIG_FILE}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{root / CONFIG_FILE} holds a {type(config).__name__}, not a JSON object of PEFT's fields")
    if (root / WEIGHTS_FILE).is_file():
        try:
            state = load_file(str(root / WEIGHTS_FILE))
        except Exception as error:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{root / WEIGHTS_FILE}: not a readable safetensors file ({error})") from None
        return config, check_finite(root / WEIGHTS_FILE, state)
    if (root / PICKLED_WEIGHTS_FILE).is_file():
        state = torch.load(root / PICKLED_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{root / PICKLED_WEIGHTS_FILE} does not hold a dict of named tensors")
        return config, check_finite(root / PICKLED_WEIGHTS_FILE, state)
    raise FileNotFoundError(f"no {WEIGHTS_FILE} (or {PICKLED_WEIGHTS_FILE}) in {directory} (expected a PEFT "
                            f"save_pretrained directory)")


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
    """Group "base_model.model.<path>.<name>" keys by module path; unknown keys and factors that are not
    floating raise."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        name = next((n for n in names if key.endswith("." + n)), None)
        if not key.startswith(KEY_PREFIX) or name is None:
            raise ValueError(f"PEFT checkpoint tensor {key!r} is not one of {names} under {KEY_PREFIX!r}; "
                             f"fastlora cannot represent it")
        if not tensor.is_floating_point():
            raise ValueError(f"PEFT checkpoint tensor {key!r} has dtype {tensor.dtype}, not a floating dtype")
        layers.setdefault(key[len(KEY_PREFIX):-len(name) - 1], {})[name] = tensor
    return layers


def _layer_shape(model: nn.Module, fmt: PeftFormat, path: str,
                 layers: dict[str, dict[str, Tensor]]) -> tuple[str, int, int]:
    """(name whose rank_pattern / alpha_pattern entry applies, d_out, d_in) of the checkpoint layer at ``path``:
    an nn.Linear (a Conv1D where the format has them), or an nn.MultiheadAttention's packed in-projection
    (at the attention's path) or out_proj (at "<attention>.base_layer.out_proj"), both present."""
    attention_path = path[:-len(OUT_PROJ)] if path.endswith(OUT_PROJ) else path
    try:
        module = model.get_submodule(attention_path)
    except AttributeError:
        raise ValueError(f"PEFT checkpoint adapts module {path!r}, which the model lacks") from None
    if is_attention(module):
        if fmt.out_proj_factor is None:
            raise ValueError(f"PEFT checkpoint adapts {attention_path!r}, an nn.MultiheadAttention; PEFT's "
                             f"{fmt.peft_type} adapts nn.Linear only")
        for part in (attention_path, attention_path + OUT_PROJ):
            if part not in layers:
                raise ValueError(f"PEFT checkpoint lacks the tensors of {part!r} for nn.MultiheadAttention "
                                 f"{attention_path!r} (PEFT adapts its in-projection and out_proj together)")
        embed = module.embed_dim
        return attention_path, (embed if path.endswith(OUT_PROJ) else 3 * embed), embed
    if attention_path != path or not is_adaptable(module):
        raise ValueError(f"PEFT checkpoint adapts {path!r}, a {type(module).__name__}; fastlora adapts nn.Linear, "
                         f"Conv1D and nn.MultiheadAttention (one packed in-projection) only")
    if type(module) is not nn.Linear and fmt.conv1d_field is None:
        raise ValueError(f"PEFT checkpoint adapts {path!r}, a {type(module).__name__}; "
                         f"PEFT's {fmt.peft_type} adapts nn.Linear only")
    return (path, *linear_shape(module))


def _check_layers(model: nn.Module, config: AdapterConfig, fmt: PeftFormat,
                  layers: dict[str, dict[str, Tensor]]) -> None:
    """Every checkpoint layer is one fastlora adapts (``_layer_shape``) holding the tensors of the
    shapes its own config (rank_pattern resolved) gives."""
    for path, tensors in layers.items():
        pattern_name, d_out, d_in = _layer_shape(model, fmt, path, layers)
        own = layer_config(config, pattern_name)
        if own.r > min(d_in, d_out):
            raise ValueError(f"PEFT rank r={own.r} exceeds min(d_in={d_in}, d_out={d_out}) of {path!r}")
        shapes = fmt.tensor_shapes(own, d_in, d_out)
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise ValueError(f"PEFT checkpoint lacks {missing} for module {path!r}")
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"PEFT tensor {path}.{name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {shape}")


def _fastlora_layers(model: nn.Module, fmt: PeftFormat, layers: dict[str, dict[str, Tensor]],
                     out_proj_updates: int) -> dict[str, dict[str, Tensor]]:
    """The checkpoint's layers under fastlora's layer names: an attention's as "<attention>.in_proj" and
    "<attention>.out_proj", out_proj's factor times ``out_proj_updates`` (PEFT's computation)."""
    ours = {}
    for path, tensors in layers.items():
        if path.endswith(OUT_PROJ):
            factor = fmt.out_proj_factor
            ours[path[:-len(OUT_PROJ)] + ".out_proj"] = {**tensors, factor: tensors[factor] * out_proj_updates}
        elif is_attention(model.get_submodule(path)):
            ours[path + ".in_proj"] = tensors
        else:
            ours[path] = tensors
    return ours


def _fastlora_targets(model: nn.Module, targets, paths: set[str]):
    """PEFT's target_modules when fastlora's matching selects exactly the checkpoint's layers
    (same rule as PEFT for a list or a regex), else the list of those layers' paths
    (exclude_modules, layers_to_transform, "all-linear" without the output layer)."""
    if isinstance(targets, (list, tuple, str)) and targets != "all-linear":
        linears = {n for n, m in model.named_modules() if is_adaptable(m) or is_attention(m)}
        if {n for n in linears if matches_targets(n, targets)} == paths:
            return targets
    return sorted(paths)


def load_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Load a PEFT checkpoint directory (peft_type "LORA" or "PEANUT") into ``model``, a model
    without adapters, as fastlora adapters (LoraConfig / NeatConfig) that compute the same
    outputs; returns ``model``. Tensors of modules_to_save (a classifier head) are copied into the
    model's parameters of those names, which become trainable. A LoRA checkpoint's rank_pattern /
    alpha_pattern give its layers their own r and alpha, resolved as PEFT resolves them. An
    nn.MultiheadAttention PEFT adapted becomes an AdapterMultiheadAttention computing PEFT's outputs
    (its out_proj factor times the updates of the PEFT that wrote it: twice before PEFT 0.22).

    Everything is checked before the model is changed. Raises ValueError naming the field
    or tensor for what fastlora cannot represent: another peft_type, DoRA, bias != "none", other LoRA
    variants, targets other than nn.Linear, GPT-2's Conv1D and nn.MultiheadAttention (nn.Linear only for
    PEANUT), PEANuT
    activations fastlora lacks.
    PEFT's fan_in_fan_out is not read: as in PEFT, a layer's own type says whether it is a Conv1D.
    """
    wrapper, model = model, unwrapped(model)
    if next(adapter_layers(model), None) is not None:
        raise ValueError("model already has fastlora adapters; load a PEFT checkpoint into a plain model")
    refuse_new_adapters(wrapper, "load_peft_adapter")
    peft, state = _read_peft_checkpoint(directory)
    peft_type, methods = peft.get("peft_type"), peft_methods()
    if peft_type not in methods:
        raise ValueError(f"unsupported peft_type {peft_type!r}; fastlora loads {sorted(methods)}")
    fmt = methods[peft_type].peft_format
    config = fmt.config(peft)
    saved = _saved_module_tensors(peft, state)
    layers = _layer_tensors(state, list(fmt.tensor_shapes(config, 0, 0)))  # names do not depend on dims
    if not layers:
        raise ValueError(f"PEFT checkpoint in {directory} holds no adapter tensors")
    _check_layers(model, config, fmt, layers)
    targets = check_saved_parameters(model, saved)
    modules = {path for path in layers if not path.endswith(OUT_PROJ)}
    ours = _fastlora_layers(model, fmt, layers, peft_out_proj_updates(peft.get("peft_version")))
    inject(model, dataclasses.replace(config, target_modules=_fastlora_targets(model, config.target_modules, modules)))
    for path, layer in adapter_layers(model):
        layer.adapter.load_state_dict(fmt.adapter_state(ours[path]))
    restore_saved_parameters(model, targets, saved)
    return wrapper


def _peft_layer_fields(fmt: PeftFormat, layers: list[tuple[str, AdapterLinear]]) -> dict[str, Any]:
    """The format's config fields for ``layers`` ((name, AdapterLinear) pairs): each per-layer field
    as its most common value plus a pattern entry selecting exactly that layer (``exact_name_pattern``)
    for every other layer; every other field must be the same in all layers."""
    (first_name, first), per_layer = layers[0], {field for field, _, _ in fmt.per_layer_fields}
    reference = first.config.to_dict()
    for name, layer in layers[1:]:
        fields = layer.config.to_dict()
        differing = differing_fields(reference, fields, per_layer)
        if differing:
            field = min(differing, key=lambda f: (f != "method", f))
            held = ("sets only " + " and ".join(f"{f} ({p})" for f, _, p in fmt.per_layer_fields)
                    + " per layer" if per_layer else "holds one config for all layers")
            raise ValueError(f"layer {name} has {field}={fields.get(field)!r}, unlike layer {first_name}'s "
                             f"{reference.get(field)!r}; PEFT's {fmt.peft_type} format {held}")
    meta = fmt.peft_config(first.config)
    for field, peft_field, pattern_field in fmt.per_layer_fields:
        values = {name: getattr(layer.config, field) for name, layer in layers}
        common = Counter(values.values()).most_common(1)[0][0]
        meta[peft_field] = common
        meta[pattern_field] = {exact_name_pattern(name): value for name, value in values.items() if value != common}
    return meta


def _peft_target_modules(model: nn.Module, names: list[str]) -> Union[list[str], str]:
    """The adapted layers' ``names`` as PEFT's target_modules: the list when PEFT's rule for a list
    (a module name equal to an entry or ending with "." + one) selects exactly them among the plain
    model's modules, else (an unadapted "inner.proj" beside an adapted "proj") the full-match regex
    of the escaped names."""
    adapted = set(names)

    def inside_adapted(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in adapted for i in range(1, len(parts)))

    plain = [n for n, _ in model.named_modules() if n and not inside_adapted(n)]
    if all(n in adapted or not matches_targets(n, names) for n in plain):
        return names
    return "|".join(re.escape(n) for n in names)


def _peft_modules(model: nn.Module, fmt: PeftFormat, layers: list[tuple[str, AdapterLinear]], out_proj_updates: int
                  ) -> tuple[list[tuple[str, AdapterLinear]], dict[str, Tensor]]:
    """(PEFT module path, the layer whose config it records) of each module the checkpoint adapts (an
    attention once, with its in-projection's config), and the checkpoint's tensors of ``layers``. Raises
    ValueError for an attention PEFT's format cannot hold, naming it."""
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, AdapterMultiheadAttention)}
    modules, tensors = [], {}
    for name, layer in layers:
        attention_name, _, part = name.rpartition(".")
        attention = attentions.get(attention_name)
        path, divisor = name, 1
        if attention is not None:
            if fmt.out_proj_factor is None:
                raise ValueError(f"layer {name} is a projection of nn.MultiheadAttention {attention_name!r}; "
                                 f"PEFT's {fmt.peft_type} does not adapt nn.MultiheadAttention")
            if len(attention.adapted_projections()) < 2:
                raise ValueError(f"nn.MultiheadAttention {attention_name!r} has only its {part} adapted; PEFT "
                                 f"adapts an attention's in-projection and out_proj together (a LoRA on its "
                                 f"out_proj alone never runs in PEFT)")
            differing = differing_fields(attention.in_proj.config.to_dict(), attention.out_proj.config.to_dict())
            if differing:
                raise ValueError(f"nn.MultiheadAttention {attention_name!r}: its in_proj and out_proj differ in "
                                 f"{differing[0]}; PEFT gives both projections the attention's one config")
            path = attention_name if part == "in_proj" else attention_name + OUT_PROJ
            divisor = 1 if part == "in_proj" else out_proj_updates
        if not path.endswith(OUT_PROJ):
            modules.append((path, layer))
        for key, tensor in fmt.peft_tensors(layer.adapter.state_dict()).items():
            tensor = tensor / divisor if divisor != 1 and key == fmt.out_proj_factor else tensor
            tensors[f"{KEY_PREFIX}{path}.{key}"] = tensor.detach().contiguous().cpu()
    return modules, tensors


def _target_peft_version() -> str:
    """The PEFT an export is written for: the installed one, else the newest this module knows."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return NEWEST_KNOWN_PEFT


def save_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike],
                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the model's fastlora LoRA (peft_type "LORA") or NEAT (peft_type "PEANUT") adapters
    in PEFT's format, so that ``peft.PeftModel.from_pretrained(base, directory)``
    computes the same outputs. An adapted nn.MultiheadAttention is written as PEFT's MultiheadAttention
    layer: both projections adapted, with one config (out_proj's factor divided by the number of times the
    installed PEFT, or the newest known, adds that update: 2 before PEFT 0.22), recording that PEFT's
    version as "peft_version" (as PEFT does since 0.18).

    target_modules is written as the list of adapted module paths, or as the full-match regex of
    them where PEFT's suffix matching would also select an unadapted module; trainable parameters
    outside the adapters (a classifier head) as modules_to_save; fan_in_fan_out as True when the
    layers wrap GPT-2's Conv1D (PEFT sets it per layer from the layer's type, so a model mixing
    Conv1D and nn.Linear layers loads too, with PEFT's warning).
    LoRA layers may differ in r and alpha: r / lora_alpha are written as the most common values
    (on a tie, the first layer's) and rank_pattern / alpha_pattern give each other layer its own
    under the key "^" + its escaped full name, which PEFT's pattern matching resolves to that
    module only.
    The two files are replaced as ``save_adapter`` replaces its own (created when missing,
    nothing else in the directory touched, old files restored on an exception); PEFT's
    format records no digest, so a hard crash between the two renames can leave new weights
    beside the old config. Raises ValueError for other methods, merged layers, layers differing
    in a field the format holds once for all layers (naming the layer and field), Conv1D layers or
    attention layers under a format without them (PEANUT), an attention with one projection adapted or
    with projections differing in a field (naming the attention).
    """
    model = unwrapped(model)
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no fastlora adapters to export")
    if adapters_sharded(model):
        raise ValueError("save_peft_adapter: the adapters are sharded by FSDP; export from an unsharded copy, or "
                         "write fastlora's format with fastlora.save_adapter called on every rank")
    for name, layer in layers:
        if method_of(layer.config).peft_format is None:
            supported = " and ".join(m.peft_format.description for m in peft_methods().values())
            raise ValueError(f"layer {name} has a {layer.config.method!r} adapter; PEFT export supports "
                             f"{supported} only")
        if layer.merged:
            raise ValueError(f"layer {name} is merged; unmerge before exporting")
    fmt = method_of(layers[0][1].config).peft_format
    conv1d = [name for name, layer in layers if layer.fan_in_fan_out]
    if conv1d and fmt.conv1d_field is None:
        raise ValueError(f"layer {conv1d[0]} wraps a Conv1D; PEFT's {fmt.peft_type} adapts nn.Linear only")
    peft_type = fmt.peft_type
    target = _target_peft_version()
    modules, tensors = _peft_modules(model, fmt, layers, peft_out_proj_updates(target))
    extra = saved_non_adapter_tensors(model)
    modules_to_save = sorted({name.rpartition(".")[0] for name in extra}) or None
    meta = {"peft_type": peft_type, "task_type": layers[0][1].config.task_type,
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "target_modules": _peft_target_modules(model, [name for name, _ in modules]),
            "modules_to_save": modules_to_save, **_peft_layer_fields(fmt, modules)}
    if (peft_release(target) or (0, 0)) >= (0, 18):  # PEFT records its version since 0.18 (older: no field)
        meta["peft_version"] = target
    if fmt.conv1d_field is not None:
        meta[fmt.conv1d_field] = bool(conv1d)
    tensors.update({f"{KEY_PREFIX}{name}": p.detach().contiguous().cpu() for name, p in extra.items()})
    check_finite(f"save_peft_adapter {UNSAVABLE}", tensors)
    return write_files_atomically(directory, [
        (WEIGHTS_FILE, lambda path: write_safetensors(path, tensors, metadata={"format": "pt"})),
        (CONFIG_FILE, lambda path: write_json(path, meta)),
    ])

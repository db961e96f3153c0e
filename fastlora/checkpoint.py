"""save_adapter / load_adapter: adapter tensors (safetensors) + per-layer configs (JSON).

Layout of a checkpoint directory (format_version 2; version 1 checkpoints, one config and a
list of layer names, still load)::

    adapter_config.json        {"format_version": 2, "config": {...}, "layers": {name: {...}},
                                "weights_sha256": "<hex digest of adapter_model.safetensors>"}
    adapter_model.safetensors  "<layer name>.adapter.<tensor name>" -> tensor

"config" is the first layer's config (what ``read_adapter_config`` returns), "layers" every
layer's own config. Parameters outside the adapters that train with them (a classifier head the
user unfroze, or ``modules_to_save``'s modules, trainable or frozen again at save time) are saved
too, under their qualified names, listed in the optional field "saved_parameters" (an inactive named
adapter's own values of them: ``fastlora.heads``); ``load_adapter`` copies them back. A model inside
torch.compile's or DDP's wrapper saves and loads under the plain model's names.

Writing touches these two files only (``write_files_atomically``), and their leftover temp
files: each is written to a temp file in the directory (``.<name>.<12 hex digits>.tmp``),
flushed and fsynced, then renamed over the old one (weights first, config last) and the
directory is fsynced. An exception at any step puts the old files back. A hard crash between
the two renames can leave the new weights beside the old config, with the old weights still
under a hidden temp name (and the new config under another); the config records the SHA-256 of
its weights file, so ``load_adapter`` refuses such a mixed pair and names the temp file that
holds the weights the config was saved with (rename it to ``adapter_model.safetensors`` for the
old adapter) and the one holding the config of the weights in place. The next successful save
into the directory removes leftover temp files of the names it writes (a second process saving
into the same directory at the same time is not supported). A new file gets the mode a file
created under the process's umask gets; a replaced one keeps the old file's mode.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Collection, Optional

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from fastlora.kernels.caller_warnings import warn_at_caller

from .atomic_files import PathLike, leftover_temp_files, write_files_atomically, write_json, write_safetensors
from .attention import is_attention
from .config import AdapterConfig
from .distributed import copy_full_, full_view, is_dtensor, placed_like
from .heads import check_inactive_head_values, head_tensors, head_value, write_inactive_head_values
from .inject import inject
from .layer import check_adapter_name, is_adaptable
from .methods import Adapter
from .model_tree import (
    adapter_layers,
    mark_saved_in_full,
    parameter_owner,
    set_submodule,
    unwrapped,
)
from .parallel_guards import refuse_new_adapters
from .targets import exact_name_pattern, matches_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
# config fields that only shape initialisation or sampling (overwritten by the loaded tensors),
# or how the same values are computed; every other field must match the model's layers
_NON_COMPUTATION_FIELDS = frozenset({"target_modules", "backend", "score_init", "importance_init", "seed", "eps",
                                     "keep_pretrained_copy", "modules_to_save", "task_type"})
# the fields a checkpoint's layers may differ in when it is injected: pattern field -> config field
_PER_LAYER_FIELDS = {"rank_pattern": "r", "alpha_pattern": "alpha"}
# integer adapter tensors that index W: name -> the layer dimension bounding them
_INDEX_BOUNDS = {"row_index": "out_features", "col_index": "in_features"}


def named_adapters(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, tuple[nn.Module, Adapter]]:
    """Layer name -> (layer, its adapter called ``adapter_name``; None: the active one)."""
    layers = {}
    for name, layer in adapter_layers(model):
        try:
            layers[name] = (layer, layer.adapter if adapter_name is None else layer.named_adapter(adapter_name))
        except KeyError:
            raise ValueError(f"the model has no adapter named {adapter_name!r} (adapters: "
                             f"{layer.adapter_names()})") from None
    return layers


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, Tensor]:
    """Every tensor (parameters and persistent buffers) of the adapter ``adapter_name`` (None: the
    active one), keyed "<layer name>.adapter.<tensor name>" whatever the adapter's name, whole on the
    CPU (FSDP2's shards gathered: every rank calls it)."""
    state = {}
    for name, (_, adapter) in named_adapters(model, adapter_name).items():
        for key, tensor in adapter.state_dict().items():
            state[f"{name}.adapter.{key}"] = full_view(tensor.detach()).contiguous().cpu()
    return state


def saved_non_adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Tensors outside the adapter layers' adapters that a checkpoint carries, keyed by qualified
    name: those that require grad (a head the user unfroze) and those of the modules marked saved in
    full (``modules_to_save``; trainable or not), with those modules' persistent buffers (a BatchNorm's
    running statistics)."""
    adapters = {id(p) for _, layer in adapter_layers(model) for n in layer.adapter_names()
                for p in layer.named_adapter(n).parameters()}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in adapters}
    in_full = {f"{owner}.{n}" if owner else n: getattr(sub, n) for owner, sub, names in head_tensors(model)
               for n in names}
    return {**trainable, **in_full}


def adapters_sharded(model: nn.Module) -> bool:
    """Whether what ``save_adapter`` writes (the adapters, the modules saved in full) is sharded by FSDP2
    (DTensors): ``save_adapter`` is then a collective, called on every rank."""
    model = unwrapped(model)
    adapters = (p for _, layer in adapter_layers(model) for p in layer.adapter.parameters())
    return any(is_dtensor(t) for t in (*adapters, *saved_non_adapter_tensors(model).values()))


def save_adapter(model: nn.Module, directory: PathLike, adapter_name: Optional[str] = None) -> Path:
    """Write the model's active adapter (or the one called ``adapter_name``: tensors and each layer's
    config) and its trainable parameters outside the adapters (``modules_to_save``: a classifier
    head) into ``directory``, created when missing; other files in it are left alone. Returns the
    directory's path. Under FSDP2 every rank calls it: the shards are gathered (a collective), rank 0
    writes and the others wait for it."""
    model = unwrapped(model)
    if next(adapter_layers(model), None) is None:
        raise ValueError("model has no fastlora adapters to save")
    layers = named_adapters(model, adapter_name)
    state = adapter_state_dict(model, adapter_name)
    inactive = _inactive_name(model, adapter_name)
    sharded = adapters_sharded(model)
    extra = {name: full_view(head_value(model, name, inactive).detach()).contiguous().cpu()
             for name in saved_non_adapter_tensors(model)}
    state.update(extra)
    check_finite(f"save_adapter {UNSAVABLE}", state)
    configs = {name: adapter.config.to_dict() for name, (_, adapter) in layers.items()}
    meta = {"format_version": FORMAT_VERSION, "config": next(iter(configs.values())), "layers": configs,
            "saved_parameters": sorted(extra)}
    digest = {}

    def write_weights(path: str) -> None:
        digest["sha256"] = write_safetensors(path, state)

    def write_config(path: str) -> None:
        write_json(path, {**meta, "weights_sha256": digest["sha256"]})

    try:
        if sharded and torch.distributed.get_rank() != 0:
            return Path(directory).expanduser()
        return write_files_atomically(directory, [(WEIGHTS_FILE, write_weights), (CONFIG_FILE, write_config)])
    finally:
        if sharded:  # the files are whole when any rank goes on (to load them, say)
            torch.distributed.barrier()


def _read_meta(directory: PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(directory).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')!r} "
                         f"(this fastlora reads {list(_READABLE_VERSIONS)})")
    return path, meta


def _parse_config(path: Path, field: str, data: Any) -> AdapterConfig:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: field {field!r} must be a JSON object, got {type(data).__name__}")
    try:
        return AdapterConfig.from_dict(data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: field {field!r}: {error}") from None


def read_adapter_config(directory: PathLike) -> AdapterConfig:
    """The AdapterConfig stored in a checkpoint directory (its first layer's, when the layers'
    configs differ)."""
    path, meta = _read_meta(directory)
    return _parse_config(path, "config", meta.get("config"))


def _layer_configs(path: Path, meta: dict[str, Any]) -> dict[str, AdapterConfig]:
    """Layer name -> config of every layer in the checkpoint."""
    config = _parse_config(path, "config", meta.get("config"))
    layers = meta.get("layers")
    if meta["format_version"] == 1:
        if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"{path}: field 'layers' must be a non-empty list of layer names, got {layers!r}")
        return dict.fromkeys(layers, config)
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: field 'layers' must be a non-empty object (layer name -> config), got {layers!r}")
    return {name: _parse_config(path, f"layers.{name}", data) for name, data in layers.items()}


def _saved_parameter_names(path: Path, meta: dict[str, Any]) -> list[str]:
    names = meta.get("saved_parameters", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: field 'saved_parameters' must be a list of parameter names, got {names!r}")
    return names


def _read_checkpoint(directory: PathLike) -> tuple[dict[str, AdapterConfig], dict[str, Tensor], dict[str, Tensor]]:
    """(layer configs, adapter tensors, saved non-adapter parameters), the weights file checked
    against the config's digest."""
    path, meta = _read_meta(directory)
    configs = _layer_configs(path, meta)
    saved_names = _saved_parameter_names(path, meta)
    weights = path.with_name(WEIGHTS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
    data = weights.read_bytes()
    expected = meta.get("weights_sha256")
    if meta["format_version"] >= 2:
        if not isinstance(expected, str):
            raise ValueError(f"{path}: field 'weights_sha256' must be a hex string, got {expected!r}")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ValueError(f"{weights} (SHA-256 {actual[:12]}...) is not the weights file {path.name} was saved "
                             f"with ({expected[:12]}...): the files come from different saves (an interrupted "
                             f"save_adapter?) or the weights file was changed"
                             f"{_crash_leftovers(path.parent, expected, actual)}")
    try:
        state = load_safetensors(data)
    except Exception as error:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{weights}: not a readable safetensors file ({error})") from None
    check_finite(weights, state)
    missing = sorted(set(saved_names) - set(state))
    if missing:
        raise ValueError(f"{weights}: lacks the saved parameters {missing[:5]} that {path.name} lists")
    return configs, state, {name: state.pop(name) for name in saved_names}


#: why a save refuses non-finite values (see ``check_finite``)
UNSAVABLE = ("(nothing written: a checkpoint with NaN or inf values would be refused by the loaders; did training "
             "diverge?)")


def check_finite(source: object, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` when its floating tensors hold no NaN or inf, else ValueError naming ``source`` and the tensor."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{source}: tensor {key!r} has {bad} non-finite values (NaN or inf)")
    return state


def _crash_leftovers(directory: Path, expected: str, actual: str) -> str:
    """What the temp files a hard-crashed save left in ``directory`` hold, for the mixed-pair refusal:
    the weights the config expects (SHA-256 ``expected``) and the config of the weights in place (``actual``)."""
    def weights_digest(path: Path) -> Optional[str]:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None

    def config_digest(path: Path) -> Optional[str]:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return meta.get("weights_sha256") if isinstance(meta, dict) else None

    notes = []
    for path in leftover_temp_files(directory, WEIGHTS_FILE):
        notes.append(f"{path.name} holds the weights {CONFIG_FILE} was saved with (rename it to {WEIGHTS_FILE} to "
                     f"load the previous adapter)" if weights_digest(path) == expected
                     else f"{path.name}: other weights")
    for path in leftover_temp_files(directory, CONFIG_FILE):
        if config_digest(path) == actual:
            notes.append(f"{path.name} holds the config of the weights in place (rename it to {CONFIG_FILE} to load "
                         f"the new adapter)")
        elif config_digest(path) == expected:
            notes.append(f"{path.name}: a copy of {CONFIG_FILE}")
        else:
            notes.append(f"{path.name}: another config")
    return "; temp files left by the interrupted save: " + "; ".join(notes) if notes else ""


def differing_fields(ours: dict[str, Any], theirs: dict[str, Any], ignored: Collection[str] = ()) -> list[str]:
    """The keys not in ``ignored`` whose values differ between ``ours`` and ``theirs`` (a missing
    key's value: None), sorted."""
    return sorted(k for k in ours.keys() | theirs.keys() if k not in ignored and ours.get(k) != theirs.get(k))


def _computation_fields_differ(ours: AdapterConfig, theirs: AdapterConfig) -> bool:
    """Whether two configs of one method may differ in a field that changes the computation: a cheap
    comparison of the fields as stored (equal values are equal JSON values; only a difference needs
    ``to_dict``'s deep copies and normalisation to be told apart)."""
    return any(getattr(ours, f.name) != getattr(theirs, f.name, None) for f in dataclasses.fields(ours)
               if f.name not in _NON_COMPUTATION_FIELDS)


def _checkpoint_config(configs: dict[str, AdapterConfig], names: dict[str, list[str]]) -> AdapterConfig:
    """One config that builds every checkpoint layer as saved: the first layer's, plus rank_pattern /
    alpha_pattern entries giving each layer (under each of its ``names``) its own r / alpha where the
    layers' values differ (what a config with per-layer ranks saves). Other fields must agree."""
    first_name, first = next(iter(configs.items()))
    ignored = ("target_modules", *_PER_LAYER_FIELDS.values())
    shared = first.to_dict()
    for name, config in configs.items():
        fields = config.to_dict()
        differing = differing_fields(shared, fields, ignored)
        if differing:
            detail = ", ".join(f"{k} ({shared.get(k)!r} vs {fields.get(k)!r})" for k in differing)
            raise ValueError(f"checkpoint layers {first_name!r} and {name!r} differ in {detail}; a model without "
                             f"adapters is injected with one config (only r and alpha may differ per layer): "
                             f"build the model's adapter layers first (AdapterLinear), then load")
    patterns = {}
    for pattern, field in _PER_LAYER_FIELDS.items():
        values = {name: getattr(config, field, None) for name, config in configs.items()}
        if len(set(values.values())) > 1:
            patterns[pattern] = {exact_name_pattern(alias): value for name, value in values.items()
                                 for alias in names[name]}
    return dataclasses.replace(first, **patterns) if patterns else first


def _inject_checkpoint_layers(model: nn.Module, configs: dict[str, AdapterConfig]) -> Callable[[], None]:
    """Inject the checkpoint's configs (per-layer r and alpha kept) into exactly the checkpoint's
    layers of a model without adapters (under every name of a shared Linear; an nn.MultiheadAttention
    whose "<name>.in_proj" and "<name>.out_proj" are checkpoint layers, or its out_proj alone); returns
    the function that undoes it."""
    modules: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_adaptable(module) or is_attention(module):
            modules.setdefault(id(module), (module, []))[1].append(name)
    by_name: dict[str, list[str]] = {}  # checkpoint layer name -> all its names
    for module, names in modules.values():
        parts = ("in_proj", "out_proj") if is_attention(module) else ("",)
        for part in parts:
            aliases = [f"{n}.{part}" if part else n for n in names]
            by_name.update(dict.fromkeys(aliases, aliases))
    missing = sorted(set(configs) - set(by_name))
    if missing:
        raise ValueError(f"checkpoint layers {missing[:5]} are not nn.Linear (or Conv1D) modules or "
                         f"MultiheadAttention projections of the model")
    config = _checkpoint_config(configs, {name: by_name[name] for name in configs})
    selected, originals, attention = set(), {}, False
    for module, names in modules.values():
        if not is_attention(module):
            if any(n in configs for n in names):
                selected.update(names)
                originals.update(dict.fromkeys(names, module))
            continue
        parts = {part for part in ("in_proj", "out_proj") if any(f"{n}.{part}" in configs for n in names)}
        if parts == {"in_proj"}:
            raise ValueError(f"checkpoint adapts the in-projection of {names[0]!r} without its out_proj; an "
                             f"nn.MultiheadAttention is adapted whole (as PEFT) or in its out_proj only")
        if parts:
            attention = True
            selected.update(names if len(parts) == 2 else [f"{n}.out_proj" for n in names])
            originals.update(dict.fromkeys(names, module))
    selected = sorted(selected)
    selectable = [n for module, names in modules.values() for n in names]  # what inject matches targets against
    selectable += [f"{n}.out_proj" for module, names in modules.values() if is_attention(module) for n in names]
    if attention or sorted(n for n in selectable if matches_targets(n, config.target_modules)) != selected:
        config = dataclasses.replace(config, target_modules=selected)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inject(model, config)

    def undo() -> None:
        for name, module in originals.items():
            set_submodule(model, name, module)
        for param, flag in flags:
            param.requires_grad_(flag)

    return undo


def _check_tensor(key: str, tensor: Tensor, expected: Tensor, layer: nn.Module, adapter: Adapter) -> None:
    shape, want = tuple(tensor.shape), tuple(expected.shape)
    if key.rsplit(".", 1)[-1] in adapter.variable_length_keys:  # any number of stages (checked by the adapter)
        shape, want = shape[1:], want[1:]
    if shape != want and not (shape == () and want == (1,)):  # (): a Selective LoRA score saved 0-dim
        raise ValueError(f"{key}: checkpoint shape {shape} != model shape {want}")
    if expected.is_floating_point():
        if not tensor.is_floating_point():
            raise ValueError(f"{key}: checkpoint dtype {tensor.dtype} is not a floating dtype "
                             f"(model: {expected.dtype})")
        return
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{key}: checkpoint dtype {tensor.dtype} is not an integer dtype (model: {expected.dtype})")
    bound = getattr(layer, _INDEX_BOUNDS.get(key.rsplit(".", 1)[-1], ""), None)
    low, high = (int(tensor.min()), int(tensor.max())) if tensor.numel() else (0, 0)
    if low < 0 or (bound is not None and high >= bound):
        limit = f"[0, {bound})" if bound is not None else ">= 0"
        raise ValueError(f"{key}: checkpoint values span [{low}, {high}], outside {limit}")


def _check_fits(layers: dict[str, tuple[nn.Module, Adapter]], configs: dict[str, AdapterConfig],
                state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Everything ``load_adapter`` checks before changing a layer (``layers``: from ``named_adapters``);
    returns the checkpoint's tensors by layer name (each by its name in the adapter's state dict)."""
    missing, unexpected = sorted(set(configs) - set(layers)), sorted(set(layers) - set(configs))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: checkpoint layers missing from the model's adapter "
                         f"layers {missing[:5]}, model adapter layers missing from the checkpoint {unexpected[:5]}")
    for name, (layer, adapter) in layers.items():
        if layer.merged and adapter is layer.adapter:
            raise ValueError(f"layer {name} is merged; unmerge before loading adapters")
        if adapter.config.method != configs[name].method:
            raise ValueError(f"layer {name} has a {adapter.config.method!r} adapter, checkpoint is "
                             f"{configs[name].method!r}")
    # checkpoint key -> (layer name, key in the adapter's state dict, the model's tensor, layer, adapter)
    expected = {f"{name}.adapter.{key}": (name, key, t, layer, adapter) for name, (layer, adapter) in layers.items()
                for key, t in adapter.state_dict().items()}
    optional = {f"{name}.adapter.{key}" for name, (_, adapter) in layers.items() for key in adapter.optional_state_keys}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    per_layer: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
    for key, tensor in sorted(state.items()):  # a fixed order: the first mismatch reported is reproducible
        name, adapter_key, *model_side = expected[key]
        _check_tensor(key, tensor, *model_side)
        per_layer[name][adapter_key] = tensor
    tasks_behind = max(_check_tasks_done(name, adapter, per_layer[name]) for name, (_, adapter) in layers.items())
    if tasks_behind:
        warn_at_caller(f"fastlora: the checkpoint's adapters were saved after {tasks_behind} tasks "
                       f"(fastlora.next_task) whose updates are in the W they trained on, which an adapter-only "
                       f"checkpoint does not hold: "
                       f"load the weights those tasks left into the model first (as you may have); over the "
                       f"pretrained weights the tasks' updates are missing", RuntimeWarning)
    for name, (_, adapter) in layers.items():
        if _computation_fields_differ(adapter.config, configs[name]):
            ours, theirs = adapter.config.to_dict(), configs[name].to_dict()
            differing = differing_fields(ours, theirs, _NON_COMPUTATION_FIELDS)
            if differing:
                detail = ", ".join(f"{k}={theirs.get(k)!r} (model: {ours.get(k)!r})" for k in differing)
                raise ValueError(f"layer {name}: checkpoint config differs from the layer's in {detail}")
        try:
            adapter.check_state(per_layer[name])
        except ValueError as error:
            raise ValueError(f"layer {name}: {error}") from None
    return per_layer


def _check_tasks_done(name: str, adapter: Adapter, state: dict[str, Tensor]) -> int:
    """Refuse the adapter of another point of a task sequence for a layer that has ended tasks (next_task
    folded them into its W): saved after fewer tasks, its update is already in W; after more, W lacks
    theirs. A layer that ended none takes any (an adapter-only checkpoint holds no W, so the W its tasks
    left may have been loaded beside it): returns the tasks the checkpoint ended then (0 otherwise), for
    ``load_adapter`` to warn of."""
    ended, saved = int(adapter.tasks_done), state.get("tasks_done")
    if saved is None:
        return 0
    if not ended:
        return int(saved)
    if int(saved) != ended:
        raise ValueError(f"layer {name} has ended {ended} tasks (fastlora.next_task folded them into its W), and the "
                         f"checkpoint's adapter was saved after {int(saved)}: it belongs with the W of that point of "
                         f"the task sequence (an adapter-only checkpoint holds no W); load it into a model at it")
    return 0


def check_saved_parameters(model: nn.Module, saved: dict[str, Tensor]) -> dict[str, nn.Parameter]:
    """The model's parameters (or a saved module's buffers) the checkpoint's saved non-adapter tensors go
    into (same shapes; floating for floating, integer for integer)."""
    params = {**dict(model.named_buffers(remove_duplicate=False)),
              **dict(model.named_parameters(remove_duplicate=False))}
    targets = {}
    for name, tensor in saved.items():
        if name not in params:
            raise ValueError(f"checkpoint parameter {name!r} (modules_to_save) is not a parameter of the model")
        if (tuple(tensor.shape) != tuple(params[name].shape)
                or tensor.is_floating_point() != params[name].is_floating_point()):
            raise ValueError(f"checkpoint parameter {name!r}: {tensor.dtype} {tuple(tensor.shape)} does not fit the "
                             f"model's {params[name].dtype} {tuple(params[name].shape)}")
        targets[name] = params[name]
    return targets


def load_adapter(model: nn.Module, directory: PathLike, adapter_name: Optional[str] = None) -> nn.Module:
    """Load adapters saved by ``save_adapter`` into ``model``'s active adapter, or into the one
    called ``adapter_name`` (added with the stored config when the model has none of that name);
    returns ``model``.

    A model without adapters is first injected with the stored config into exactly the
    checkpoint's layers, each with its own saved r and alpha (a config's rank_pattern /
    alpha_pattern; other fields must agree), as ``PeftModel.from_pretrained`` does (its adapter
    named ``adapter_name``, "default" when None). Saved
    non-adapter parameters (``modules_to_save``: a classifier head) are copied into the model's
    parameters of the same names, which become trainable again, or, loaded into an inactive named
    adapter, kept as that adapter's own values of them (``fastlora.heads``).
    Raises (leaving the model as it was) on: a malformed or mixed checkpoint, non-finite values,
    missing or unexpected layers or tensors, shape or dtype mismatches, indices outside W, merged
    layers, a layer config that differs in a field that changes the computation (all but
    target_modules, backend and init/sampling fields), a layer that has ended tasks (next_task) other
    than the checkpoint's, or an adapter's own check (``check_state``: LoRASC's stage record, whose
    stage count may differ from the model's).
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    configs, state, saved = _read_checkpoint(directory)
    inner = unwrapped(model)
    undo = _add_checkpoint_adapter(inner, configs, adapter_name, wrapper=model)
    try:
        layers = named_adapters(inner, adapter_name)
        by_layer = _check_fits(layers, configs, state)
        targets = check_saved_parameters(inner, saved)
        inactive = _inactive_name(inner, adapter_name)
        if inactive is not None:
            check_inactive_head_values(inner, saved)
    except BaseException:
        if undo is not None:
            undo()
        raise
    for name, (_, adapter) in layers.items():
        current = adapter.state_dict()  # FSDP2's sharded tensors take this rank's part of the saved ones
        adapter.load_state_dict({key: placed_like(value, current[key]) if key in current else value
                                 for key, value in by_layer[name].items()})
    if inactive is None:
        restore_saved_parameters(inner, targets, saved)
    else:  # the head values of an inactive adapter (fastlora.heads): the ones in place stay the active one's
        write_inactive_head_values(inner, inactive, saved)
    return model


def _inactive_name(model: nn.Module, adapter_name: Optional[str]) -> Optional[str]:
    """``adapter_name`` when it names an adapter other than the active one, else None."""
    active = next(adapter_layers(model))[1].adapter_name
    return adapter_name if adapter_name is not None and adapter_name != active else None


def _add_checkpoint_adapter(model: nn.Module, configs: dict[str, AdapterConfig], adapter_name: Optional[str],
                            wrapper: nn.Module) -> Optional[Callable[[], None]]:
    """Build the adapter a checkpoint loads into when the model lacks it: inject into a model
    without adapters, ``add_adapter`` for a new name; returns the function that undoes it (None:
    nothing built). Refused inside a data-parallel ``wrapper`` (``fastlora.parallel_guards``)."""
    first = next(adapter_layers(model), None)
    if first is None or (adapter_name is not None and adapter_name not in first[1].adapter_names()):
        refuse_new_adapters(wrapper, "load_adapter")
    if first is None:
        undo = _inject_checkpoint_layers(model, configs)
        if adapter_name is not None:
            for _, layer in adapter_layers(model):
                layer.adapter_name = adapter_name
        return undo
    if adapter_name is None or adapter_name in first[1].adapter_names():
        return None
    from .adapters_api import add_adapter, delete_adapter  # adapters_api builds on inject, as this module does

    config = _checkpoint_config(configs, {name: [name] for name in configs})
    add_adapter(model, adapter_name, dataclasses.replace(config, target_modules=sorted(configs)))
    return lambda: delete_adapter(model, adapter_name)


@torch.no_grad()
def restore_saved_parameters(model: nn.Module, targets: dict[str, nn.Parameter], saved: dict[str, Tensor]) -> None:
    """Copy each saved tensor into its parameter of ``model`` (checked by ``check_saved_parameters``),
    which becomes trainable, as it was when saved, and its module saved in full from now on (a
    parameter of the root module only while it is trainable: marking the root would save every one)."""
    for name, param in targets.items():
        copy_full_(param, saved[name].to(param.device))
        if isinstance(param, nn.Parameter):  # a buffer (running statistics) only takes the value
            param.requires_grad_(True)
        owner, _ = parameter_owner(model, name)
        if owner is not model:
            mark_saved_in_full(owner)

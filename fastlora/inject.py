"""inject: adapters into a model's selected layers; switching them on and off; counting what trains.

Shared weights: ``inject`` of a method that writes W in place (LoRASC) is refused on a layer whose W
shares memory with another module's parameter or buffer (an lm_head tied to the input embeddings, one
weight in two Linear layers, a view of W held elsewhere), naming both owners;
``untie_shared_weights=True`` gives each such layer its own copy of W and says so in a warning.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch
from torch import Tensor, nn

from fastlora.kernels.caller_warnings import warn_at_caller

from .attention import AdapterMultiheadAttention, is_attention
from .config import AdapterConfig
from .encoder_paths import keep_fused_paths_off
from .layer import AdapterLinear, is_adaptable, linear_shape
from .model_tree import mark_saved_in_full, required_adapter_layers, set_submodule
from .parallel_guards import refuse_new_adapters
from .shared_weights import shared_weight_owners
from .targets import (
    dotted_suffixes,
    in_task_head,
    is_selected,
    layer_config,
    matches_targets,
    output_layer_names,
    projection_config,
    resolved_targets,
    task_heads,
    unmatched_pattern_keys,
    within,
)
from .training import watch_training_rules


def inject(model: nn.Module, config: AdapterConfig, *, untie_shared_weights: bool = False) -> nn.Module:
    """Replace every nn.Linear (and transformers' Conv1D: GPT-2's layers) the config selects with an
    AdapterLinear (sharing the original weight and bias) and freeze every other parameter. A selected
    nn.MultiheadAttention becomes an AdapterMultiheadAttention (sharing its tensors) whose packed
    in-projection and out_proj are AdapterLinear layers ("<name>.in_proj", "<name>.out_proj"; its
    out_proj alone when only "<name>.out_proj" is selected). Modules a selection matches but fastlora
    cannot adapt (nn.Linear subclasses, attention with separate q/k/v weights) are named in a warning.
    torch's fused nn.TransformerEncoder(Layer) inference paths, which would skip the adapters or pass
    them nested tensors, are kept off around adapted layers (``fastlora.encoder_paths``).

    Selection and per-layer rank/alpha follow PEFT (``fastlora.targets``): target_modules
    (None: PEFT's default for a transformers model's architecture, every nn.Linear in another
    model; "all-linear": every nn.Linear and Conv1D but a transformers model's output layer),
    exclude_modules, layers_to_transform/layers_pattern, rank_pattern and alpha_pattern. Each
    layer's ``config`` holds its own r and alpha, without the selection fields. A method with a
    training rule gets a one-shot check that warns when it trains without its hooks or penalty
    (``fastlora.training.watch_training_rules``). The modules named by ``config.modules_to_save``
    (a classifier head) are unfrozen and train in full, as PEFT's field; checkpoints carry them
    (frozen again or not).

    Returns ``model`` (changed in place). All or nothing: every target is checked and every
    adapter built before the model changes, so on any error the model is left as it was.
    A Linear registered under several names is adapted once, the same AdapterLinear placed
    under each name (all of its names must be matched, or none). Raises ValueError when a
    listed target matches no nn.Linear, when nothing matches, when ``model`` is itself an
    nn.Linear (wrap it with ``AdapterLinear.from_linear``), or naming the layer whose rank
    or device does not fit.

    A method that writes W in place (LoRASC: its stages and noise) is refused on a layer whose W
    shares memory with another module's tensor (an lm_head tied to the input embeddings, one
    weight in two Linear layers), naming both owners: writing it would change the other module
    too. ``untie_shared_weights=True`` gives each such layer its own copy of W instead (one more W
    of memory each; the other modules keep the original, unchanged) and warns naming them; a
    transformers model that re-ties its weights (``tie_weights()``) would share them again.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear: inject cannot replace the root module; "
                         "use AdapterLinear.from_linear(model, config) instead")
    if any(isinstance(m, AdapterLinear) for m in model.modules()):
        raise ValueError("model already has fastlora adapters; merge_and_unload it first")
    refuse_new_adapters(model, "inject")
    _refuse_peft_layers(model)
    chosen = _without_modules_in_full(model, config, _chosen_linears(model, config))
    saved_modules = _modules_to_save(model, config, chosen)
    untied = _check_weight_writes(model, config, chosen, untie_shared_weights)
    built = _build_layers(model, chosen, config)
    layers = {name: layer for (names, _, _), module in zip(chosen, built)
              for name, layer in _projections(names[0], module)}
    for name, layer in layers.items():
        if name in untied:  # its own copy of W, in the layer's (d_out, d_in) layout
            layer.weight = nn.Parameter(layer.weight.detach().clone(memory_format=torch.contiguous_format),
                                        requires_grad=False)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in saved_modules:
        module.requires_grad_(True)
        mark_saved_in_full(module)
    for (names, _, _), module in zip(chosen, built):
        for name in names:
            set_submodule(model, name, module)
        keep_fused_paths_off(model, module, names)
    if untied:
        warn_at_caller(f"inject: {', '.join(f'{n!r} (shared with {o})' for n, o in untied.items())}: each of these "
                       f"layers now has its own copy of W, which {type(config).__name__} writes in place; the modules "
                       f"that shared it keep the original W, unchanged")
    watch_training_rules(model)
    return model


def _refuse_peft_layers(model: nn.Module) -> None:
    """Refuse a model holding PEFT adapter layers: inject would adapt PEFT's own modules (its lora_A / lora_B,
    its base_layer) and freeze PEFT's adapter, which would still run."""
    if "peft" not in sys.modules:  # a model cannot hold PEFT's layers without peft imported
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    found = next((name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
    if found is not None:
        raise ValueError(f"the model holds PEFT adapter layers (e.g. {found!r}); inject would adapt PEFT's own "
                         f"modules and freeze its adapter: run PEFT's adapters through the fused op with "
                         f"fastlora.accelerate(peft_model), or inject into the base model (peft_model.unload())")


def _projections(name: str, module: nn.Module) -> list[tuple[str, AdapterLinear]]:
    """(name, layer) of the adapted layers of a built module: itself, or an attention's adapted projections."""
    if isinstance(module, AdapterMultiheadAttention):
        return [(f"{name}.{part}", getattr(module, part)) for part in ("in_proj", "out_proj")
                if isinstance(getattr(module, part), AdapterLinear)]
    return [(name, module)]


def _writes_weight(config: AdapterConfig) -> bool:
    """Whether the config's method writes its layers' W in place (LoRASC)."""
    from .registry import method_of
    return method_of(config).adapter.writes_weight


def _check_weight_writes(model: nn.Module, config: AdapterConfig, chosen, untie: bool) -> dict[str, list[str]]:
    """For a method that writes W: refuse (or, with ``untie``, list for a copy) the chosen layers whose W
    shares memory with another module's tensor. Returns {first layer name: the other owners} to untie."""
    if not isinstance(untie, bool):
        raise TypeError(f"untie_shared_weights must be a bool, got {type(untie).__name__}")
    if not _writes_weight(config):
        return {}
    weights = []
    for names, module, part in chosen:
        if part is None:
            weights.append((names[0], module, module.weight))
            continue
        if part == "both":
            weights.append((f"{names[0]}.in_proj", module, module.in_proj_weight))
        weights.append((f"{names[0]}.out_proj", module.out_proj, module.out_proj.weight))
    shared = shared_weight_owners(model, weights)
    if shared and not untie:
        name, others = next(iter(shared.items()))
        raise ValueError(f"cannot inject {type(config).__name__} into layer {name!r}: its weight shares memory with "
                         f"{others} (tied or shared weights), and the method writes W in place (its stages and "
                         f"noise), which would change them too; untie it first (give the layer its own copy of W), "
                         f"or pass untie_shared_weights=True to have inject do that")
    return shared


def _chosen_linears(model: nn.Module, config: AdapterConfig) -> list[tuple[list[str], nn.Module, Optional[str]]]:
    """(every name, module, part) of each layer to adapt, in model order: an nn.Linear or Conv1D (part None),
    or an nn.MultiheadAttention, adapted whole when its name is selected (part "both": the packed
    in-projection and out_proj, as PEFT) or only its out_proj when that name is (part "out")."""
    candidates: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_adaptable(module) or is_attention(module):
            candidates.setdefault(id(module), ([], module))[0].append(name)
    targets = resolved_targets(model, config)
    output_layers = output_layer_names(model) if targets == "all-linear" else set()

    def selected(names: list[str], module: nn.Module, suffix: str = "") -> list[str]:
        matched = [n for n in names if is_selected(n + suffix, targets, config, output_layers)]
        if matched and len(matched) < len(names):
            unmatched = [n + suffix for n in names if n not in matched]
            kind = "nn.Linear" if type(module) is nn.Linear else type(module).__name__
            raise ValueError(f"{kind} {matched[0] + suffix!r} is also registered as {unmatched}, which target_modules "
                             f"{targets!r} does not match (or the selection fields leave out); a shared module is "
                             f"adapted under all its names, so match all of them or none")
        return matched

    chosen, names = [], []
    for module_names, module in candidates.values():
        if is_attention(module):
            names += [*module_names, *(n + ".out_proj" for n in module_names)]
            part = "both" if selected(module_names, module) else "out" if selected(module_names, module,
                                                                                     ".out_proj") else None
            if part is not None:
                chosen.append((module_names, module, part))
        else:
            names += module_names
            if selected(module_names, module):
                chosen.append((module_names, module, None))
    _check_targets(model, config, targets, names, chosen)
    _warn_skipped(model, targets, config, output_layers, candidates)
    _warn_unmatched_patterns(config, chosen)
    return chosen


def _warn_unmatched_patterns(config: AdapterConfig, chosen) -> None:
    """Warn about rank_pattern / alpha_pattern keys that select none of the adapted layers (a misspelt key
    would leave every layer at the config's r or alpha)."""
    if not (config.rank_pattern or config.alpha_pattern):
        return
    names = [n for module_names, _, part in chosen for n in module_names]
    names += [f"{n}.{p}" for module_names, _, part in chosen if part is not None for n in module_names
              for p in (("in_proj", "out_proj") if part == "both" else ("out_proj",))]
    for field, keys in unmatched_pattern_keys(config, names).items():
        warn_at_caller(f"fastlora: {field} keys {keys} select none of the adapted layers (e.g. {names[:3]}); "
                       f"those layers keep the config's {'r' if field == 'rank_pattern' else 'alpha'}")


def _warn_skipped(model: nn.Module, targets, config: AdapterConfig, output_layers: set[str], candidates) -> None:
    """Warn, naming them, about modules the selection matches that fastlora cannot adapt (left as they are):
    nn.Linear subclasses other than an adapted attention's out_proj (quantized or custom layers), attention
    layers with separate q/k/v weights."""
    handled = {id(module.out_proj) for _, module in candidates.values() if is_attention(module)}
    handled |= set(candidates)
    skipped = []
    for name, module in model.named_modules():
        linear_like = isinstance(module, (nn.Linear, nn.MultiheadAttention))
        if name and linear_like and id(module) not in handled and is_selected(name, targets, config, output_layers):
            skipped.append(f"{name} ({type(module).__name__})")
    if skipped:
        warn_at_caller(f"fastlora: the selection (target_modules {targets!r}) matches {len(skipped)} modules of a type "
                       f"fastlora cannot adapt (nn.Linear subclasses, attention with separate q/k/v weights), left as "
                       f"they are: {skipped[:5]}")


def _without_modules_in_full(model: nn.Module, config: AdapterConfig, chosen):
    """The selection less the modules trained in full and the layers inside them: the task type's heads
    (``in_task_head``) and, when the targets are implicit ("all-linear" or the method's default), the
    modules ``modules_to_save`` names, as PEFT trains those in full and adapts the rest; refused when
    nothing else is left."""
    in_head = in_task_head(model, config)
    implicit = config.target_modules in (None, "all-linear")  # the config keeps "all-linear" in lower case
    saved = [n for n, _ in model.named_modules() if n and implicit and config.modules_to_save
             and matches_targets(n, list(config.modules_to_save))]
    kept = [entry for entry in chosen if not any(in_head(n) or any(within(n, s) for s in saved) for n in entry[0])]
    if chosen and not kept:
        trained = f"the heads of task_type {config.task_type!r}" if any(in_head(n) for e in chosen for n in e[0]) \
            else f"modules_to_save {list(config.modules_to_save)}"
        raise ValueError(f"the selection (target_modules {config.target_modules!r}) adapts only {trained}, which it "
                         f"trains in full; name other modules to adapt")
    return kept


def _modules_to_save(model: nn.Module, config: AdapterConfig, chosen) -> list[nn.Module]:
    """The modules ``config.modules_to_save`` names (exact name or "." + suffix, as target names), and
    the task type's heads (``TASK_HEADS``) the model has, trained in full; a listed name matching no
    module, or a listed module that is also an adapter target, is refused."""
    listed, heads = config.modules_to_save or (), task_heads(config)
    if not listed and not heads:
        return []
    adapted = {n for names, _, _ in chosen for n in names}
    found: dict[int, nn.Module] = {}
    for key in (*listed, *heads):
        matched = [(n, m) for n, m in model.named_modules() if n and matches_targets(n, [key])]
        overlap = [n for n, _ in matched if any(within(a, n) for a in adapted)]
        if key in heads and not matched:
            continue  # PEFT's task heads: those the model has
        if not matched:
            raise ValueError(f"modules_to_save {key!r} matches no module of the model")
        if overlap:
            raise ValueError(f"modules_to_save {key!r} names {overlap}, which the config also adapts (or which "
                             f"hold layers it adapts); a module is either trained in full or adapted: drop it "
                             f"from target_modules (or list it in exclude_modules)")
        found.update((id(m), m) for _, m in matched)
    _refuse_tied_saved_modules(model, config, found)
    return list(found.values())


def _refuse_tied_saved_modules(model: nn.Module, config: AdapterConfig, found: dict[int, nn.Module]) -> None:
    """Refuse a module to save in full whose parameter another module outside them holds too (an lm_head tied
    to the input embeddings): training it would train that module too (PEFT trains a copy instead)."""
    saved = {id(p) for m in found.values() for p in m.parameters()}
    inside = {id(sub) for m in found.values() for sub in m.modules()}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside:
            continue
        for key, param in module.named_parameters(recurse=False):
            if id(param) in saved:
                raise ValueError(f"modules_to_save {list(config.modules_to_save)}: a parameter of the modules to "
                                 f"save is also {name or 'the model'}'s {key!r} (tied weights), which training it "
                                 f"in full would change too; untie them first (give the module its own copy) or "
                                 f"save {name or 'that module'!r} in full too")


def _check_targets(model: nn.Module, config: AdapterConfig, targets, names: list[str], chosen) -> None:
    """Refuse listed targets that name no adaptable layer (naming the type of the modules they do name)
    and a selection of nothing; warn when exclude_modules left nothing out (PEFT warns too)."""
    given = ("target_modules" if config.target_modules is not None else f"{type(config).__name__}'s default "
             f"target_modules {targets!r}" if config.default_targets is not None else
             f"PEFT's default target_modules {targets}")
    if isinstance(targets, tuple):
        suffixes = {suffix for n in names for suffix in dotted_suffixes(n)}
        missing = [t for t in targets if t not in suffixes]  # matches_targets(n, [t]) for no name n
        if missing:
            others = {f"{n} ({type(m).__name__})" for n, m in model.named_modules() if matches_targets(n, missing)}
            named = (f"; they name {sorted(others)[:3]}, and fastlora adapts nn.Linear, Conv1D and "
                     f"nn.MultiheadAttention (packed in-projection) only" if others else "")
            raise ValueError(f"{given}: {missing} match no nn.Linear, Conv1D or MultiheadAttention in the "
                             f"model{named}; linear modules are: {sorted({n.rsplit('.', 1)[-1] for n in names})}")
    if not chosen:
        raise ValueError(f"{given} {targets!r} with exclude_modules {config.exclude_modules!r}, layers_to_transform "
                         f"{config.layers_to_transform!r} select no nn.Linear, Conv1D or MultiheadAttention in the "
                         f"model")
    if config.exclude_modules is not None:
        kept = {n for names, _, part in chosen for n in names}
        kept |= {n + ".out_proj" for names, _, part in chosen if part is not None for n in names}
        if not any(is_selected(n, targets, dataclasses.replace(config, exclude_modules=None), set()) and n not in kept
                   for n in names):
            warn_at_caller(f"exclude_modules {config.exclude_modules!r} left out no module the config selects; "
                           f"check its names")


def _check_layer(name: str, linear: nn.Module, config: AdapterConfig) -> None:
    """Refuse a rank the layer cannot hold and a layer without values (meta device), naming the layer."""
    _check_shape(name, linear.weight, linear.bias, config, linear_shape(linear))


def _check_shape(name: str, weight: Tensor, bias: Optional[Tensor], config: AdapterConfig,
                 shape: tuple[int, int]) -> None:
    d_out, d_in = shape
    if config.r > min(d_in, d_out):
        raise ValueError(f"layer {name!r}: r={config.r} exceeds min(d_in={d_in}, d_out={d_out})={min(d_in, d_out)}")
    if any(p is not None and p.is_meta for p in (weight, bias)):
        raise ValueError(f"layer {name!r} is on the meta device (no values to build the adapter from); "
                         f"materialise the model first (e.g. to_empty() and load its weights), then inject")


def _build_layers(model: nn.Module, chosen, config: AdapterConfig) -> list[nn.Module]:
    """One AdapterLinear per chosen Linear and one AdapterMultiheadAttention per chosen attention, each
    projection built with its own config (``layer_config``); every layer is checked first. On failure
    every requires_grad flag is restored and a ValueError/TypeError is re-raised with the layer's name."""
    plans = []
    for names, module, part in chosen:
        name = names[0]
        if part is None:
            pieces = [(name, module)]
        else:
            pieces = [(f"{name}.in_proj", None)] if part == "both" else []
            pieces.append((f"{name}.out_proj", module.out_proj))
        configs = []
        for piece, linear in pieces:
            try:
                configs.append(layer_config(config, piece) if part is None else projection_config(config, piece, name))
            except (ValueError, TypeError) as error:
                raise type(error)(f"layer {piece!r}: {error}") from error
            if linear is None:  # the packed in-projection (3 E, E)
                _check_shape(piece, module.in_proj_weight, module.in_proj_bias, configs[-1],
                             (3 * module.embed_dim, module.embed_dim))
            else:
                _check_layer(piece, linear, configs[-1])
        plans.append(configs)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built, index = [], 0
    try:
        for (names, module, part), configs in zip(chosen, plans):
            try:
                if part is None:
                    built.append(AdapterLinear.from_linear(module, configs[0], layer_index=index)
                                 .train(module.training))
                else:
                    in_config, out_config = (configs if part == "both" else (None, configs[0]))
                    built.append(AdapterMultiheadAttention.from_attention(module, in_config, out_config,
                                                                          layer_index=index))
            except (ValueError, TypeError) as error:
                if type(error) not in (ValueError, TypeError):
                    raise
                raise type(error)(f"layer {names[0]!r}: {error}") from error
            index += len(configs)
    except BaseException:
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    return built


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter on or off (off: the layers compute the base model exactly, merged
    ones from the W kept at merge time)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    for _, layer in required_adapter_layers(model):
        layer.adapter_enabled = enabled


def trainable_parameter_count(model: nn.Module) -> int:
    """How many elements the parameters that require grad hold."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

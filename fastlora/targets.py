"""Which nn.Linear (and Conv1D) layers ``inject`` adapts, and each one's rank and alpha: PEFT's selection rules.

A config's target_modules, exclude_modules, layers_to_transform/layers_pattern, rank_pattern and
alpha_pattern select and size layers as PEFT's LoraConfig does; "all-linear" leaves out a
transformers model's output layer and a missing target_modules means PEFT's default targets
for the model's architecture.

nn.MultiheadAttention: the attention module's own name selects it whole (its packed in-projection and
out_proj, as PEFT), the name "<attention>.out_proj" its out_proj alone, and "all-linear" selects it whole
(PEFT's "all-linear" adapts out_proj alone, as a Linear whose forward the attention never calls). A
projection's r and alpha come from a rank_pattern / alpha_pattern key matching "<attention>.in_proj" or
"<attention>.out_proj", else from one matching the attention's name (PEFT gives both the attention's).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Iterator, Optional, Union

from torch import nn

from .config import TASK_HEADS, AdapterConfig

# PEFT's LoRA targets when target_modules is missing, by transformers model_type
DEFAULT_TARGETS: dict[str, Union[str, tuple[str, ...]]] = {  # a str: a regex, matched as target_modules
    "bart": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "bloom": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "chatglm": ("query_key_value",),
    "codegen": ("qkv_proj",),
    "deberta": ("in_proj",),
    "deberta-v2": ("query_proj", "value_proj"),
    "electra": ("query", "value"),
    "falcon": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "RefinedWebModel": ("query_key_value",),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "gpt_neo": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "layoutlm": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "mpt": ("Wqkv",),
    "mt5": ("q", "v"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "opt": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
    "stablelm": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
}
# attributes holding a classification head, left out by "all-linear" (PEFT's SEQ_CLS rule)
HEAD_ATTRIBUTES = ("classifier", "score")
_SELECTION_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
                     "modules_to_save")

Targets = Union[None, str, tuple[str, ...]]  # None: every nn.Linear and Conv1D


def model_type(model: nn.Module) -> Optional[str]:
    """``model.config.model_type`` of a transformers model, else None."""
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) and value else None


def resolved_targets(model: nn.Module, config: AdapterConfig) -> Targets:
    """config.target_modules with None replaced by the method's ``default_targets`` or, where it has none,
    PEFT's default for the model's architecture (a model that is not a transformers model: None, every
    nn.Linear and Conv1D)."""
    targets = config.target_modules
    if targets is not None:
        return targets
    kind = model_type(model)
    if kind is None:
        return None
    if config.default_targets is not None:
        return config.default_targets
    if kind not in DEFAULT_TARGETS:
        raise ValueError(f"{type(config).__name__}.target_modules is missing and there is no default for "
                         f"model_type {kind!r} (defaults: {sorted(DEFAULT_TARGETS)}); name the modules to adapt "
                         f"or use target_modules='all-linear'")
    return DEFAULT_TARGETS[kind]


def output_layer_names(model: nn.Module) -> set[str]:
    """Every name of the output layer "all-linear" leaves out (with its submodules): a transformers
    model's output embeddings, else its classification head; nothing in another model."""
    if model_type(model) is None:
        return set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((getattr(model, a) for a in HEAD_ATTRIBUTES if isinstance(getattr(model, a, None), nn.Module)),
                    None)
    if head is None:
        return set()
    roots = [name for name, module in model.named_modules(remove_duplicate=False) if module is head]
    return {f"{root}.{sub}" if sub else root for root in roots for sub, _ in head.named_modules()}


@functools.lru_cache(maxsize=64)
def _entry_set(entries: tuple[str, ...]) -> frozenset[str]:
    return frozenset(entries)


def dotted_suffixes(name: str) -> Iterator[str]:
    """``name`` and each part of it after one of its dots ("a.b.c", "b.c", "c"): what a target list entry
    matches."""
    yield name
    dot = name.find(".")
    while dot != -1:
        yield name[dot + 1:]
        dot = name.find(".", dot + 1)


def matches_targets(name: str, target_modules) -> bool:
    """Whether ``name`` is one of ``target_modules`` (name or suffix), its full-match regex, or None/"all-linear".

    A list entry matches the whole name or a dotted suffix of it ("q_proj", "0.self_attn.q_proj"): each of
    the name's suffixes is looked up in the entries' set, so a checkpoint listing every layer's name selects
    in time linear in the model's modules."""
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    entries = _entry_set(tuple(target_modules))
    return any(suffix in entries for suffix in dotted_suffixes(name))


def _layer_index(name: str, patterns: Optional[tuple[str, ...]]) -> Optional[int]:
    """The layer index in ``name``: the first number after a layers_pattern part, or without
    patterns the first number preceded by at least two dotted parts (PEFT's rule)."""
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    for pattern in patterns:
        found = re.match(rf"(?:^|.*?\.)(?:{pattern})\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def is_selected(name: str, targets: Targets, config: AdapterConfig, output_layers: set[str]) -> bool:
    """Whether the nn.Linear (or Conv1D) called ``name`` is adapted (``targets``: from ``resolved_targets``)."""
    exclude = config.exclude_modules
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, tuple) and matches_targets(name, exclude):
        return False
    if targets == "all-linear":
        if name in output_layers:
            return False
    elif isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    elif targets is not None:
        if name in targets:
            return True  # an exact name is adapted whatever its layer (PEFT)
        if not any(name.endswith("." + t) for t in targets):
            return False
    if config.layers_to_transform is None:
        return True
    return _layer_index(name, config.layers_pattern) in config.layers_to_transform


def task_heads(config: AdapterConfig) -> list[str]:
    """The task type's head names (``TASK_HEADS``) that modules_to_save does not list already."""
    return [key for key in TASK_HEADS.get(config.task_type, ()) if key not in (config.modules_to_save or ())]


def within(name: str, outer: str) -> bool:
    """Whether the module named ``name`` is the module named ``outer`` or inside it."""
    return name == outer or name.startswith(outer + ".")


def in_task_head(model: nn.Module, config: AdapterConfig) -> Callable[[str], bool]:
    """Whether a module name is one of the task type's heads or inside one: as PEFT, a head its task type
    names is trained in full, not adapted ("all-linear" over DistilBERT's pre_classifier, say)."""
    keys = task_heads(config)
    heads = [n for n, _ in model.named_modules() if n and keys and matches_targets(n, keys)]
    return lambda name: any(within(name, head) for head in heads)


def exact_name_pattern(name: str) -> str:
    r"""The rank_pattern / alpha_pattern key that selects the module called ``name`` and no other:
    "^" + the escaped name. PEFT matches a key k to a name n by ``re.match(rf"(.*\.)?({k})$", n)``
    and fastlora by ``re.fullmatch(rf"(?:.*\.)?(?:{k})", n)`` (``_key_matches``): both let a
    prefix ending with "." precede the key, but "^" only matches at the start of n, so the prefix must
    be empty and n the whole name (the key for "proj" selects neither "inner.proj" nor "a.proj")."""
    return "^" + re.escape(name)


def _key_matches(key: str, name: str) -> bool:
    """Whether the rank_pattern / alpha_pattern key (a regex) selects ``name``: name is the key, or ends
    with "." + key."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", name) is not None


def _pattern_value(pairs: tuple, name: str, default):
    """The value of the first key of ``pairs`` that ``name`` equals or ends with ("." + key, key a regex)."""
    return next((value for key, value in pairs if _key_matches(key, name)), default)


def unmatched_pattern_keys(config: AdapterConfig, names: list[str]) -> dict[str, list[str]]:
    """rank_pattern / alpha_pattern keys that select none of ``names`` (the adapted layers' names), per field."""
    unmatched = {}
    for field in ("rank_pattern", "alpha_pattern"):
        keys = [key for key, _ in getattr(config, field) if not any(_key_matches(key, name) for name in names)]
        if keys:
            unmatched[field] = keys
    return unmatched


def layer_config(config: AdapterConfig, name: str) -> AdapterConfig:
    """The config the layer ``name`` is built with: rank_pattern's r and alpha_pattern's alpha
    resolved, PEFT's selection fields and modules_to_save dropped (they chose the layers; the layer
    keeps what it computes)."""
    if not any(getattr(config, field) for field in _SELECTION_FIELDS):
        return config
    changes = {"r": _pattern_value(config.rank_pattern, name, config.r), "exclude_modules": None,
               "layers_to_transform": None, "layers_pattern": None, "rank_pattern": (), "alpha_pattern": (),
               "modules_to_save": None}
    if config.alpha_pattern:
        changes["alpha"] = _pattern_value(config.alpha_pattern, name, config.alpha)
    return dataclasses.replace(config, **changes)


def projection_config(config: AdapterConfig, name: str, attention: str) -> AdapterConfig:
    """The config of an attention projection called ``name``: its own rank_pattern / alpha_pattern entry,
    else the attention's (PEFT gives both projections the attention's)."""
    if any(_key_matches(key, name) for key, _ in (*config.rank_pattern, *config.alpha_pattern)):
        return layer_config(config, name)
    return layer_config(config, attention)

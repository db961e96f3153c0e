"""PEFT's checkpoint formats of the methods that have one (LORA: plain LoRA, PEANUT: NEAT).

Each format converts PEFT's adapter_config.json fields and per-layer tensors to a fastlora
config and adapter state dict and back; a method module registers its format with the method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from torch import Tensor

from .config import TASK_HEADS, AdapterConfig, LoraConfig, NeatConfig, is_real

# PEFT LoRA fields that change the computation in ways fastlora cannot represent, each with
# the one value accepted (None / False also accept any empty value).
_LORA_UNSUPPORTED = {
    "use_dora": False, "bias": "none", "lora_bias": False,
    "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "alora_invocation_tokens": None, "use_qalora": False,
    "megatron_config": None, "velora_config": None, "monteclora_config": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None,
}


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How one PEFT peft_type maps onto a fastlora method (registered with the method).

    peft_type: PEFT's name of the format ("LORA"); description: the method as error messages name it.
    config: PEFT config dict -> fastlora config (raises on what it cannot represent).
    tensor_shapes: (fastlora config, d_in, d_out) -> {PEFT tensor name of a layer: shape}.
    adapter_state: {PEFT tensor name: tensor} of a layer -> the fastlora adapter's state dict.
    peft_config: fastlora config -> the method's fields of PEFT's adapter_config.json.
    peft_tensors: the fastlora adapter's state dict -> {PEFT tensor name: tensor} of a layer.
    conv1d_field: the config field PEFT sets True when the layers are GPT-2 Conv1D layers (weight
    stored (d_in, d_out); same tensor shapes as over an nn.Linear); None: the format adapts nn.Linear only.
    per_layer_fields: (fastlora field, PEFT field, PEFT pattern field) of each value PEFT's format can
    give layers one by one (LORA: r through rank_pattern, alpha through alpha_pattern); every other
    field holds one value for all layers.
    out_proj_factor: the PEFT tensor of a layer its update is linear in (LORA: lora_B.weight), which an
    nn.MultiheadAttention's out_proj holds divided by ``peft_out_proj_updates``; None: PEFT's format does not
    adapt nn.MultiheadAttention.
    """

    peft_type: str
    description: str
    config: Callable[[dict[str, Any]], AdapterConfig]
    tensor_shapes: Callable[[AdapterConfig, int, int], dict[str, tuple[int, ...]]]
    adapter_state: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    peft_config: Callable[[AdapterConfig], dict[str, Any]]
    peft_tensors: Callable[[dict[str, Tensor]], dict[str, Tensor]]
    conv1d_field: Optional[str] = None
    per_layer_fields: tuple[tuple[str, str, str], ...] = ()
    out_proj_factor: Optional[str] = None


#: the first PEFT release whose MultiheadAttention LoRA layer adds its out_proj update once; before it, twice
#: (its merge, which its forward runs, wrote W + s B A into out_proj's weight, and out_proj's own merge added
#: s B A again)
PEFT_OUT_PROJ_ONCE_FROM = (0, 22)
#: the PEFT an export is written for when no peft is installed to ask (the newest this module knows)
NEWEST_KNOWN_PEFT = "0.22.0"


def peft_release(version: Optional[str]) -> Optional[tuple[int, int]]:
    """(major, minor) of a PEFT version string ("0.22.0", "0.21.2.dev0"), None when it is missing or not one."""
    parts = (version or "").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def peft_out_proj_updates(version: Optional[str]) -> int:
    """How many times PEFT of ``version`` adds an nn.MultiheadAttention's out_proj update in its forward:
    2 before 0.22, 1 from 0.22; 2 for a checkpoint that does not say (PEFT records its version since 0.18)."""
    if version is not None and not isinstance(version, str):
        raise ValueError(f"PEFT checkpoint's peft_version {version!r} is not a version string")
    release = peft_release(version)
    return 1 if release is not None and release >= PEFT_OUT_PROJ_ONCE_FROM else 2


def _check_unsupported(peft: dict[str, Any], unsupported: dict[str, Any]) -> None:
    peft_type = peft["peft_type"]
    for field, accepted in unsupported.items():
        value = peft.get(field, accepted)
        ok = not value if accepted in (None, False) else value == accepted
        if not ok:
            raise ValueError(f"PEFT {peft_type} config has {field}={value!r}, which fastlora cannot represent "
                             f"(only {accepted!r} is supported)")


def _number(peft: dict[str, Any], field: str, default: float) -> float:
    """PEFT's numeric ``field`` (``default`` when absent) as a float; anything but an int or float is refused."""
    value = peft.get(field, default)
    if not is_real(value):
        raise ValueError(f"PEFT {peft['peft_type']} config has {field}={value!r}, expected a number")
    return float(value)


def _flag(peft: dict[str, Any], field: str) -> bool:
    """PEFT's boolean ``field`` (False when absent); anything but true or false is refused."""
    value = peft.get(field, False)
    if not isinstance(value, bool):
        raise ValueError(f"PEFT {peft['peft_type']} config has {field}={value!r}, expected true or false")
    return value


def _task_type(peft: dict[str, Any]) -> Optional[str]:
    """PEFT's task_type where fastlora knows it (``TASK_HEADS``), else None (a model-wrapper choice only)."""
    task = peft.get("task_type")
    return task if task in TASK_HEADS else None


def _peft_targets(peft: dict[str, Any]):
    """PEFT's target_modules (saved from a set, so in arbitrary order) as a sorted list, or its regex."""
    targets = peft.get("target_modules")
    return sorted(targets) if isinstance(targets, (list, tuple, set)) else targets


def _lora_config(peft: dict[str, Any]) -> LoraConfig:
    """PEFT's LoRA fields as a LoraConfig; rank_pattern / alpha_pattern keep PEFT's keys and order
    (fastlora resolves them as PEFT does: the first key the module name ends with wins)."""
    _check_unsupported(peft, _LORA_UNSUPPORTED)
    return LoraConfig(r=peft.get("r", 8), alpha=_number(peft, "lora_alpha", 8), use_rslora=_flag(peft, "use_rslora"),
                      dropout=_number(peft, "lora_dropout", 0.0), task_type=_task_type(peft),
                      target_modules=_peft_targets(peft), rank_pattern=peft.get("rank_pattern") or {},
                      alpha_pattern=peft.get("alpha_pattern") or {})


# transformers ACT2FN names (PEANuT's act_fn) -> fastlora activations computing the same function.
PEANUT_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu", "tanh": "tanh",
                       "sigmoid": "sigmoid", "linear": "identity"}


def _neat_config(peft: dict[str, Any]) -> NeatConfig:
    act_fn = peft.get("act_fn", "relu")
    if act_fn not in PEANUT_ACTIVATIONS:
        raise ValueError(f"PEFT PEANUT config has act_fn={act_fn!r}; fastlora supports {sorted(PEANUT_ACTIVATIONS)}")
    return NeatConfig(r=peft.get("r", 32), depth=peft.get("depth", 0), activation=PEANUT_ACTIVATIONS[act_fn],
                      scale=_number(peft, "scaling", 1.0), target_modules=_peft_targets(peft),
                      task_type=_task_type(peft))


def _peanut_shapes(config: NeatConfig, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    shapes = {"peanut_A.weight": (config.r, d_out), "peanut_B.weight": (d_out, config.r)}
    for side in ("encoders", "decoders"):
        shapes.update({f"peanut_{side}.{i}.weight": (config.r, config.r) for i in range(config.depth)})
    return shapes


_PEANUT_FACTORS = {"peanut_A.weight": "neat_A", "peanut_B.weight": "neat_B"}


def _neat_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {_PEANUT_FACTORS.get(name, name.removeprefix("peanut_")): t for name, t in tensors.items()}


def _peanut_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``_neat_state``: neat_A -> peanut_A.weight, encoders.0.weight -> peanut_encoders.0.weight
    (floating tensors: the adapter's integer bookkeeping, tasks_done, has no PEFT counterpart)."""
    names = {ours: theirs for theirs, ours in _PEANUT_FACTORS.items()}
    return {names.get(key, "peanut_" + key): t for key, t in state.items() if t.is_floating_point()}


def _peanut_config(config: NeatConfig) -> dict[str, Any]:
    act_fn = next(name for name, ours in PEANUT_ACTIVATIONS.items() if ours == config.activation)
    return {"r": config.r, "depth": config.depth, "act_fn": act_fn, "scaling": config.scale, "init_weights": True}


def _lora_peft_config(config: LoraConfig) -> dict[str, Any]:
    return {"r": config.r, "lora_alpha": config.alpha, "use_rslora": config.use_rslora,
            "lora_dropout": config.dropout, "bias": "none", "use_dora": False,
            "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


LORA_FORMAT = PeftFormat(
    peft_type="LORA", description="plain LoRA (LoraConfig)", config=_lora_config,
    tensor_shapes=lambda c, d_in, d_out: {"lora_A.weight": (c.r, d_in), "lora_B.weight": (d_out, c.r)},
    adapter_state=lambda t: {"lora_A": t["lora_A.weight"], "lora_B": t["lora_B.weight"]},
    peft_config=_lora_peft_config,
    peft_tensors=lambda s: {"lora_A.weight": s["lora_A"], "lora_B.weight": s["lora_B"]},
    conv1d_field="fan_in_fan_out",
    per_layer_fields=(("r", "r", "rank_pattern"), ("alpha", "lora_alpha", "alpha_pattern")),
    out_proj_factor="lora_B.weight",
)
PEANUT_FORMAT = PeftFormat(peft_type="PEANUT", description="NEAT (NeatConfig, PEFT's PEANuT)", config=_neat_config,
                           tensor_shapes=_peanut_shapes, adapter_state=_neat_state, peft_config=_peanut_config,
                           peft_tensors=_peanut_tensors)

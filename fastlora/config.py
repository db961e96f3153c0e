"""Adapter configurations: one frozen dataclass per method, PEFT-like fields, JSON round trip.

Every config validates itself on construction, so a bad value fails where it is written,
and cannot change afterwards (copy with ``dataclasses.replace``, which validates again).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

from fastlora.kernels import BACKENDS

from .registry import method_named
from .safe_regex import check_regex

TargetModules = Optional[Union[tuple[str, ...], list[str], str]]

MAX_NEAT_DEPTH = 32
#: PEFT's task types -> the heads its model wrapper trains in full for them (added to modules_to_save where the
#: model has a module of that name and the config does not adapt it)
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score", "pre_classifier"), "TOKEN_CLS": ("classifier", "score", "pre_classifier"),
    "QUESTION_ANS": ("qa_outputs",), "CAUSAL_LM": (), "SEQ_2_SEQ_LM": (), "FEATURE_EXTRACTION": ()}

@dataclass(frozen=True)
class AdapterConfig:
    """Fields every method shares.

    r: rank (> 0 and <= min(d_in, d_out) of every adapted layer).
    target_modules: names matched like PEFT (a module whose qualified name equals an
    entry or ends with "." + entry; a list, tuple or set of non-empty strings, kept as a
    tuple), a regex string (full match), "all-linear" (any case, as PEFT; every nn.Linear but a transformers
    model's output layer: its output embeddings or classifier/score head), or None (the method's
    ``default_targets``: PEFT's default targets for the transformers model's architecture, or
    "all-linear" for Selective LoRA and CoDyRA; every nn.Linear in any other model).
    A regex must compile and, so that matching cannot backtrack catastrophically, must
    not repeat a group that itself contains a repetition or an alternation (``(a+)+``,
    ``(a|ab)*``; a repetition is ``*``, ``+`` or ``{m,n}`` with n > 1) and may hold at
    most ``safe_regex.MAX_REGEX_REPETITIONS`` repetitions in all.
    dropout: dropout on the adapter input (PEFT's lora_dropout).
    backend: the fused op's execution plan: "auto" (the cublas plan on CUDA, or a winner ``fastlora.tune``
    measured; torch on CPU) | "triton" | "cublas" | "onepass" | "torch".

    PEFT's selection fields (keyword-only, same meaning as in PEFT):
    exclude_modules: names (exact or "." + suffix) or a full-match regex never adapted.
    layers_to_transform: an int or ints: only modules of those layers, the layer index being the
    first number after a module named by layers_pattern (a name or regex, or several), or, without
    layers_pattern, the first dotted number after at least two name parts ("model.layers.3.mlp").
    Needs target_modules given as names (not a regex or "all-linear").
    rank_pattern / alpha_pattern: {key: r} / {key: alpha}, the rank or alpha of the modules whose
    name is ``key`` or ends with "." + ``key`` (``key`` a regex; the first matching key wins).
    Both are kept as tuples of (key, value) pairs; alpha_pattern needs a config with an alpha.
    modules_to_save: names (exact or "." + suffix) of modules trained in full beside the adapters
    (a classifier head, as PEFT's field): ``inject`` unfreezes their parameters, ``save_adapter``
    saves them and ``load_adapter`` restores them. A name that matches no module is refused.
    task_type: PEFT's task type ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", ...; a PEFT
    ``TaskType`` too): as PEFT's model wrappers, SEQ_CLS and TOKEN_CLS also train the model's
    "classifier" / "score" / "pre_classifier" in full, QUESTION_ANS its "qa_outputs" (``TASK_HEADS``:
    those the model has and the config does not adapt); the others add nothing.

    PEFT's names are accepted as keywords when building a config (not stored): ``lora_dropout``
    for dropout, ``lora_alpha`` for alpha (LoRA-family configs).
    """

    method: ClassVar[str] = ""
    #: what target_modules=None selects in a transformers model: None for PEFT's table per architecture
    default_targets: ClassVar[Optional[str]] = None
    #: keywords of earlier versions -> what replaced them (refused with that message, not a bare TypeError)
    RETIRED: ClassVar[dict[str, str]] = {}
    r: int = 8
    target_modules: TargetModules = None
    dropout: float = 0.0
    backend: str = "auto"
    _: dataclasses.KW_ONLY
    exclude_modules: TargetModules = None
    layers_to_transform: Optional[Union[int, tuple[int, ...], list[int]]] = None
    layers_pattern: Optional[Union[str, tuple[str, ...], list[str]]] = None
    rank_pattern: Union[dict[str, int], tuple[tuple[str, int], ...]] = ()
    alpha_pattern: Union[dict[str, float], tuple[tuple[str, float], ...]] = ()
    modules_to_save: Optional[Union[tuple[str, ...], list[str]]] = None
    task_type: Optional[str] = None
    lora_alpha: dataclasses.InitVar[Optional[float]] = None
    lora_dropout: dataclasses.InitVar[Optional[float]] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "AdapterConfig":
        _refuse_retired(cls, kwargs)
        # here, where the given keywords are known: a field given at its default value counts too
        for name, alias, position in (("alpha", "lora_alpha", None), ("dropout", "lora_dropout", 2)):
            if kwargs.get(alias) is not None and (name in kwargs or (position is not None and len(args) > position)):
                raise ValueError(f"{cls.__name__}: give {name} or PEFT's {alias}, not both")
        return super().__new__(cls)

    def __post_init__(self, lora_alpha: Optional[float], lora_dropout: Optional[float]) -> None:
        for alias, name, value in (("lora_alpha", "alpha", lora_alpha), ("lora_dropout", "dropout", lora_dropout)):
            if value is None:
                continue
            if name not in {f.name for f in dataclasses.fields(self)} or (name == "alpha" and
                                                                          not isinstance(self, LoraConfig)):
                raise ValueError(f"{type(self).__name__} has no {alias} (PEFT's LoRA field); its fields are "
                                 f"{sorted(f.name for f in dataclasses.fields(self))}")
            object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"{type(self).__name__}.r must be a positive int, got {self.r!r}")
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}.backend must be one of {BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "target_modules", _checked_targets(self.target_modules))
        _check_selection(self)
        object.__setattr__(self, "modules_to_save", _checked_module_names(self.modules_to_save,
                                                                          f"{type(self).__name__}.modules_to_save"))
        task = self.task_type.value if isinstance(self.task_type, enum.Enum) else self.task_type  # PEFT's TaskType
        if task is not None and (not isinstance(task, str) or task not in TASK_HEADS):
            raise ValueError(f"{type(self).__name__}.task_type must be None or one of PEFT's task types "
                             f"{sorted(TASK_HEADS)}, got {task!r}")
        object.__setattr__(self, "task_type", task)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists, rank/alpha patterns as objects), plus "method"."""
        data = dataclasses.asdict(self)
        for name, value in data.items():
            if name in ("rank_pattern", "alpha_pattern"):
                data[name] = dict(value)
            elif isinstance(value, tuple):
                data[name] = list(value)
        data["method"] = self.method
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        """The config of the registered method ``data["method"]`` with the other fields of ``data``."""
        if not isinstance(data, dict):
            raise TypeError(f"AdapterConfig.from_dict takes a dict of fields (as to_dict returns), "
                            f"got {type(data).__name__}: {data!r:.80}")
        data = dict(data)
        cls = method_named(data.pop("method", None)).config
        _refuse_retired(cls, data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
        return cls(**data)


def _refuse_retired(cls: type, fields: dict[str, Any]) -> None:
    """A TypeError naming what replaced each keyword of an earlier version among ``fields``."""
    retired = [f"{name} {cls.RETIRED[name]}" for name in fields if name in cls.RETIRED]
    if retired:
        raise TypeError(f"{cls.__name__}: " + "; ".join(retired))


def is_real(value: Any) -> bool:
    """An int or float, not a bool (True would silently read as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_targets(targets: Any, field: str = "target_modules") -> Union[None, str, tuple[str, ...]]:
    """target_modules (or ``field``) validated: None, a safe compiling regex, or a tuple of names."""
    if targets is None:
        return None
    if isinstance(targets, str):
        if field == "target_modules" and targets.lower() == "all-linear":  # PEFT's shorthand, in any case
            return "all-linear"
        check_regex(targets, field)
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise TypeError(f"{field} must be a list of names, a regex string or None, got {type(targets).__name__}")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"{field} entries must be non-empty strings, got {bad!r}")
    if not targets:
        raise ValueError(f"{field} is empty; name at least one module, or use None")
    return tuple(sorted(targets) if isinstance(targets, (set, frozenset)) else targets)


def _checked_module_names(names: Any, field: str) -> Optional[tuple[str, ...]]:
    """A list of module names as a tuple (None or empty: none); entries must be non-empty strings."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise TypeError(f"{field} must be a list of module names, got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"{field} entries must be non-empty strings, got {bad!r}")
    return tuple(sorted(names) if isinstance(names, (set, frozenset)) else names) or None


def _check_selection(config: AdapterConfig) -> None:
    """Validate and normalise PEFT's selection fields (see AdapterConfig); empty values mean none, as in PEFT."""
    name = type(config).__name__
    exclude = config.exclude_modules
    exclude = None if isinstance(exclude, (list, tuple, set, frozenset)) and not exclude else exclude
    object.__setattr__(config, "exclude_modules", _checked_targets(exclude, f"{name}.exclude_modules"))
    layers = config.layers_to_transform
    layers = (layers,) if _is_index(layers) else layers
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(_is_index(i) for i in layers):
            raise ValueError(f"{name}.layers_to_transform must be an int >= 0 or a list of them, "
                             f"got {config.layers_to_transform!r}")
        layers = tuple(layers) or None
    object.__setattr__(config, "layers_to_transform", layers)
    patterns = config.layers_pattern
    patterns = (patterns,) if isinstance(patterns, str) else patterns
    if patterns is not None:
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{name}.layers_pattern must be a name, a regex or a list of them, got {patterns!r}")
        for pattern in patterns:
            check_regex(pattern, f"{name}.layers_pattern")
        patterns = tuple(p for p in patterns if p) or None
    object.__setattr__(config, "layers_pattern", patterns)
    if (layers or patterns) and isinstance(config.target_modules, str):
        raise ValueError(f"{name}: layers_to_transform and layers_pattern need target_modules given as names, "
                         f"not the regex or shorthand {config.target_modules!r} (as in PEFT)")
    if patterns and not layers:
        raise ValueError(f"{name}: layers_pattern {list(patterns)} needs layers_to_transform (as in PEFT)")
    if config.alpha_pattern and "alpha" not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"{name} has no alpha, so no alpha_pattern")
    for field, check in (("rank_pattern", _is_index), ("alpha_pattern", is_real)):
        pairs = getattr(config, field)
        pairs = tuple(pairs.items()) if isinstance(pairs, dict) else pairs
        if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError(f"{name}.{field} must map module names or regexes to values, got {pairs!r}")
        for key, value in pairs:
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name}.{field} keys must be non-empty strings, got {key!r}")
            check_regex(key, f"{name}.{field}")
            if not check(value) or value <= 0 or not math.isfinite(value):
                raise ValueError(f"{name}.{field}[{key!r}] must be a positive "
                                 f"{'int' if field == 'rank_pattern' else 'number'}, got {value!r}")
        object.__setattr__(config, field, tuple((key, value) for key, value in pairs))


def _is_index(value: Any) -> bool:
    """An int >= 0, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_positive(config: AdapterConfig, name: str, allow_zero: bool = False) -> None:
    value = getattr(config, name)
    ok = is_real(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{type(config).__name__}.{name} must be a finite number {bound}, got {value!r}")


def _check_nonzero(config: AdapterConfig, name: str) -> None:
    """A factor of the adapter's output: finite, and nonzero (0 makes every adapter gradient 0)."""
    value = getattr(config, name)
    if not is_real(value) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{type(config).__name__}.{name} must be finite and nonzero (an int or float; 0 makes every "
                         f"adapter gradient 0, so training would change nothing), got {value!r}")


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """Plain LoRA: y = x W^T + b + (alpha/r) (dropout(x) A^T) B^T (alpha/sqrt(r) with use_rslora)."""

    method: ClassVar[str] = "lora"
    alpha: float = 8.0
    use_rslora: bool = False

    def validate(self) -> None:
        super().validate()
        _check_positive(self, "alpha")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"{type(self).__name__}.use_rslora must be True or False, got {self.use_rslora!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class SelectiveLoraConfig(LoraConfig):
    """Selective LoRA: a learnable score per layer gates the block, g = 1[score >= threshold].

    threshold tau = 0.1 and score_init = 0.15 as TAPS (score_init >= threshold: every block starts
    on). The penalty added by ``regularization_loss`` is sparsity_weight * |score| per layer, divided
    by the number of Selective LoRA layers of the model when normalize_penalty (TAPS, default), and
    0 during the first sparsity_warmup_steps optimizer steps (TAPS: 2 epochs; default 0, since the
    epoch length is the training loop's). sparsity_weight = 1 as TAPS.

    How soon blocks switch off: under Adam(W) a score moves about lr per step, so the first blocks
    go off after about (score_init - threshold) / lr steps (500 at lr 1e-4, 170 at 3e-4; a linear
    decay to 0 needs a run twice as long). Under SGD the penalty alone moves each score by
    lr * sparsity_weight / L per step (10x that with momentum 0.9): at TAPS's lr 0.01 every block
    goes off within tens of steps, before B has learned, unless sparsity_warmup_steps holds the
    penalty back (TAPS: 2 epochs).

    target_modules=None adapts every linear layer ("all-linear"; our choice, the sources name none):
    the method gates blocks off, so it starts from all of them.
    """

    method: ClassVar[str] = "selective_lora"
    default_targets: ClassVar[Optional[str]] = "all-linear"
    threshold: float = 0.1
    score_init: float = 0.15
    sparsity_weight: float = 1.0
    normalize_penalty: bool = True
    sparsity_warmup_steps: int = 0

    def validate(self) -> None:
        super().validate()
        _check_positive(self, "sparsity_weight", allow_zero=True)
        for name in ("threshold", "score_init"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value):
                raise ValueError(f"SelectiveLoraConfig.{name} must be a finite number, got {value!r}")
        if self.score_init < self.threshold:
            raise ValueError(f"SelectiveLoraConfig.score_init={self.score_init!r} must be >= "
                             f"threshold={self.threshold!r} (every block starts switched on)")
        if not isinstance(self.normalize_penalty, bool):
            raise ValueError(f"SelectiveLoraConfig.normalize_penalty must be True or False, "
                             f"got {self.normalize_penalty!r}")
        value = self.sparsity_warmup_steps
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"SelectiveLoraConfig.sparsity_warmup_steps must be an int >= 0, got {value!r}")


@dataclass(frozen=True)
class RankSelectiveLoraConfig(LoraConfig):
    """CoDyRA: per-rank importance w, soft-thresholded after each optimizer step by a scheduled kappa.

    y = x W^T + b + s ((x A^T) ⊙ w) B^T; after optimizer step t: w <- sign(w) max(|w| - kappa(t), 0).
    kappa(t) = 0 for t <= D = min(round(dense_fraction * total_steps), total_steps - 1) (dense phase), then
    kappa_max * ceil(threshold_levels * (t - D) / (total_steps - D)) / threshold_levels up to
    kappa(total_steps) = kappa_max, and 0 after total_steps: the ranks at 0 then are dropped for good
    and the kept ones train on unthresholded. Defaults are the authors' run:
    r = 16, alpha = None (s = 1), w ~ N(0, 1), 500 steps, half dense, 50 levels, kappa_max = 0.005.
    importance_init: "randn" (w ~ N(0, 1), the authors' code) or a nonzero constant.

    total_steps: the schedule's length in optimizer steps. None (the default) means the run's length:
    FastLoraCallback takes Trainer's max_steps, ``attach_training_hooks(model, optimizer, total_steps=N)``
    takes N; a layer that steps with neither (and no length saved in its checkpoint) raises at its first
    rule step, as the schedule cannot be placed. The resolved length is the adapter's persistent buffer
    ``run_steps`` (a resumed run continues the same schedule). kappa_max is the authors' peak for their
    500-step run (REFERENCE_STEPS): a schedule over a run of N steps thresholds by kappa * 500 / N, so
    its thresholds add up to about the same budget (0.6375 with the defaults) at any length. An explicit
    int fixes the schedule whatever the run, with kappa_max absolute (the authors' code). Over the
    schedule the thresholds shrink each |w| by sum_t kappa(t) in all, so the ranks that end below that
    are pruned (about half of N(0, 1) draws; a constant 1.0 outlasts it and prunes nothing); an explicit total_steps
    longer than the run stops early in the staircase (nothing is pruned in the dense phase;
    FastLoraCallback warns). A longer run keeps the pruned set of step total_steps and only trains
    the kept ranks after it.
    """

    method: ClassVar[str] = "rank_selective_lora"
    default_targets: ClassVar[Optional[str]] = "all-linear"  # the authors adapt every linear layer
    RETIRED: ClassVar[dict[str, str]] = {
        "sparsity_strength": "was removed: the threshold is an absolute kappa on a schedule, not lr * "
                             "sparsity_strength; set kappa_max (and total_steps, dense_fraction, threshold_levels)"}
    #: the authors' schedule length, which kappa_max is set for (a run-length schedule scales kappa to it)
    REFERENCE_STEPS: ClassVar[int] = 500
    r: int = 16
    alpha: Optional[float] = None
    importance_init: Union[float, str] = "randn"
    total_steps: Optional[int] = None
    dense_fraction: float = 0.5
    threshold_levels: int = 50
    kappa_max: float = 0.005

    def validate(self) -> None:
        if self.alpha is None:  # s = 1: LoraConfig's alpha check does not apply
            AdapterConfig.validate(self)
            if not isinstance(self.use_rslora, bool):
                raise ValueError(f"RankSelectiveLoraConfig.use_rslora must be True or False, got {self.use_rslora!r}")
        else:
            super().validate()
        value = self.importance_init
        if value != "randn" and (not is_real(value) or not math.isfinite(value) or value == 0):
            raise ValueError(f"RankSelectiveLoraConfig.importance_init must be a finite nonzero number or 'randn' "
                             f"(0 would prune every rank before training), got {value!r}")
        for name in ("total_steps", "threshold_levels"):
            value = getattr(self, name)
            if name == "total_steps" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RankSelectiveLoraConfig.{name} must be an int > 0, got {value!r}")
        if not is_real(self.dense_fraction) or not 0.0 <= self.dense_fraction < 1.0:
            raise ValueError(f"RankSelectiveLoraConfig.dense_fraction must be a number in [0, 1), "
                             f"got {self.dense_fraction!r}")
        _check_positive(self, "kappa_max", allow_zero=True)

    @property
    def scale(self) -> float:
        """alpha / r (alpha / sqrt(r) with use_rslora); 1 when alpha is None (the authors' s)."""
        return 1.0 if self.alpha is None else super().scale

    def schedule_length(self, run_steps: Optional[int] = None) -> int:
        """The schedule's length: total_steps when set, else ``run_steps`` (the run's length); raises
        ValueError when neither is known."""
        total = self.total_steps if self.total_steps is not None else run_steps
        if not total:
            raise ValueError("the CoDyRA threshold schedule needs the run's length: train with FastLoraTrainer / "
                             "FastLoraCallback (it takes Trainer's max_steps), pass attach_training_hooks(model, "
                             "optimizer, total_steps=N), or set RankSelectiveLoraConfig(total_steps=N)")
        return total

    def kappa(self, step: int, run_steps: Optional[int] = None) -> float:
        """The threshold applied after optimizer step ``step`` (1-based) of a schedule of
        ``schedule_length(run_steps)`` steps: 0 in the dense phase and after it (the pruned set is final
        then), the staircase in between; times REFERENCE_STEPS / N on a schedule over the run's N steps
        (total_steps None), so that its thresholds add up to what a REFERENCE_STEPS-step run's do."""
        total = self.schedule_length(run_steps)
        dense = self.dense_steps_of(total)
        if step <= dense or step > total:
            return 0.0
        level = math.ceil(self.threshold_levels * (step - dense) / (total - dense))
        peak = self.kappa_max if self.total_steps is not None else self.kappa_max * self.REFERENCE_STEPS / total
        return peak * level / self.threshold_levels

    def dense_steps_of(self, total: int) -> int:
        """D of a ``total``-step schedule: round(dense_fraction * total), at most total - 1 so that step
        total always thresholds by kappa_max."""
        return min(round(self.dense_fraction * total), total - 1)

    @property
    def dense_steps(self) -> int:
        """D of the config's own total_steps (which must be set)."""
        return self.dense_steps_of(self.schedule_length())


@dataclass(frozen=True)
class CurLoraConfig(AdapterConfig):
    """CURLoRA: C = W[:, J], R = W[I, :] sampled by inverted probabilities, U (r x r) trained.

    y = x W^T + b + alpha (x R^T) U^T C^T. eps regularises q ∝ 1/(p + eps) (1e-3 as in
    the authors' code; 0 is the paper's formula); layer k of the model samples with
    seed + k (k = its position among adapted layers); 0 <= seed < 2**63.

    Learning rate: U starts at 0 and its update C U R is made of W's own (small) entries, so a step
    moves W far less than a LoRA step at the same lr; it needs a much larger one (under Adam,
    benchmarks/continual selects 0.01-1 for CURLoRA where it selects 0.001-0.03 for LoRA).
    """

    method: ClassVar[str] = "curlora"
    alpha: float = 1.0
    eps: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        _check_positive(self, "eps", allow_zero=True)
        _check_nonzero(self, "alpha")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"CurLoraConfig.seed must be an int >= 0 and < 2**63, got {self.seed!r}")


@dataclass(frozen=True)
class NeatConfig(AdapterConfig):
    """NEAT / PEANuT: y = x W^T + b + scale * x f(act(W^T A_n^T)) B_n^T.

    depth: number of r x r encoder/decoder pairs in f (0 = identity, at most MAX_NEAT_DEPTH);
    activation one of fastlora.kernels.ACTIVATIONS.
    """

    method: ClassVar[str] = "neat"
    depth: int = 0
    activation: str = "relu"
    scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        from fastlora.kernels import ACTIVATIONS
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or not 0 <= self.depth <= MAX_NEAT_DEPTH:
            raise ValueError(f"NeatConfig.depth must be an int >= 0 and <= {MAX_NEAT_DEPTH}, got {self.depth!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(f"NeatConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        _check_nonzero(self, "scale")


@dataclass(frozen=True)
class CascadeLoraConfig(LoraConfig):
    """LoRASC: stages of a fast LoRA pair, each folded into W in place, each started with NoisyTune noise on W.

    cascade_interval: the stage length. "epoch" (the default): a fresh fast pair every epoch, a stage
    ending every E optimizer steps, E the epoch's length in optimizer steps (FastLoraCallback takes
    Trainer's steps per epoch, ``attach_training_hooks(..., steps_per_epoch=E)`` takes E; kept in the
    adapter's persistent buffer ``epoch_steps``, so a resumed run keeps its stages; the hooks refuse to
    attach while it is unknown). An int: optimizer steps per stage. None: stages only where the
    training loop calls ``cascade_step()``. stages_per_run: K stages per run instead (default None):
    the run's N optimizer steps (Trainer's max_steps, or ``attach_training_hooks(..., total_steps=N)``,
    as CoDyRA's total_steps) split into K stages of N / K steps (rounded; the stage ends at steps
    ceil(j N / K), j < K); it replaces cascade_interval (left out or None, saved as None; an interval
    given beside it is refused, "epoch" included). With a known run length no stage ends on the run's
    final step: the last stage stays the fast pair (evaluated as W + s B A), folded by ``next_task``
    or merged by ``merge``. slow_momentum: m of the slow-fast update, the stage folds (1 - m) s B A
    into W (the paper's pace alpha = 1 - m; default 0.5, Lookahead's; 0 folds the whole fast pair).
    noise_intensity: NoisyTune's lambda, each stage starts with W += U(-lambda/2, lambda/2) * std(W)
    (default 0.15 as NoisyTune; 0 = no noise), drawn from a CPU generator seeded from noise_seed, the
    layer index and the stage. keep_pretrained_copy: keep a host-memory copy of W as the adapter found
    it (one more W in CPU memory per layer; default off), for ``restore_pretrained()`` and for loading
    a checkpoint of another stage history.
    """

    method: ClassVar[str] = "cascade_lora"
    RETIRED: ClassVar[dict[str, str]] = {
        "noise_std": "was replaced by noise_intensity (NoisyTune's lambda: each stage starts with "
                     "W += U(-lambda/2, lambda/2) * std(W))",
        "max_cascades": "was removed: every stage is folded into W in place, so no number of stages is kept"}
    cascade_interval: Union[int, str, None] = "epoch"
    stages_per_run: Optional[int] = None
    slow_momentum: float = 0.5
    noise_intensity: float = 0.15
    noise_seed: int = 0
    keep_pretrained_copy: bool = False

    def __new__(cls, *args: Any, **kwargs: Any) -> "CascadeLoraConfig":
        # here, where the given keywords are known: an interval given counts, "epoch" too; the default left out does not
        interval, stages = kwargs.get("cascade_interval"), kwargs.get("stages_per_run")
        if interval is not None and stages is not None:
            raise ValueError(f"CascadeLoraConfig: give stages_per_run ({stages!r}) or cascade_interval ({interval!r}), "
                             f"not both")
        return super().__new__(cls, *args, **kwargs)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.keep_pretrained_copy, bool):
            raise ValueError(f"CascadeLoraConfig.keep_pretrained_copy must be True or False, "
                             f"got {self.keep_pretrained_copy!r}")
        value = self.cascade_interval
        steps = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if not (steps or value is None or (isinstance(value, str) and value == "epoch")):
            raise ValueError(f"CascadeLoraConfig.cascade_interval must be an int > 0 (optimizer steps per stage), "
                             f"'epoch' or None, got {value!r}")
        stages = self.stages_per_run
        if stages is not None:
            if not isinstance(stages, int) or isinstance(stages, bool) or stages <= 0:
                raise ValueError(f"CascadeLoraConfig.stages_per_run must be an int > 0 or None, got {stages!r}")
            object.__setattr__(self, "cascade_interval", None)  # left out (a given interval was refused)
        value = self.slow_momentum
        if not is_real(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"CascadeLoraConfig.slow_momentum must lie in [0, 1) (1 would discard every "
                             f"fast pair), got {value!r}")
        _check_positive(self, "noise_intensity", allow_zero=True)
        value = self.noise_seed
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise ValueError(f"CascadeLoraConfig.noise_seed must be an int >= 0 and < 2**31, got {value!r}")

"""Adapter configurations: one dataclass per method, PEFT-like fields, JSON round trip.

Every config validates itself on construction, so a bad value fails where it is written.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

TargetModules = Optional[Union[list[str], str]]

_CONFIG_TYPES: dict[str, type["AdapterConfig"]] = {}


def _register(cls):
    _CONFIG_TYPES[cls.method] = cls
    return cls


@dataclass
class AdapterConfig:
    """Fields every method shares.

    r: rank (> 0 and <= min(d_in, d_out) of every adapted layer).
    target_modules: names matched like PEFT (a module whose qualified name equals an
    entry or ends with "." + entry), a regex string (full match), "all-linear", or
    None (= "all-linear").
    dropout: dropout on the adapter input (PEFT's lora_dropout).
    backend: "auto" | "torch" | "triton" for the fused op.
    """

    method: ClassVar[str] = ""
    r: int = 8
    target_modules: TargetModules = None
    dropout: float = 0.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"{type(self).__name__}.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must lie in [0, 1), got {self.dropout!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"{type(self).__name__}.backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple)):
            raise TypeError(f"target_modules must be a list of names, a regex string or None, "
                            f"got {type(self.target_modules).__name__}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        method = data.pop("method", None)
        if method not in _CONFIG_TYPES:
            raise ValueError(f"unknown adapter method {method!r}; known: {sorted(_CONFIG_TYPES)}")
        cls = _CONFIG_TYPES[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
        return cls(**data)


def _check_positive(config: AdapterConfig, name: str, allow_zero: bool = False) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{type(config).__name__}.{name} must be a finite number {bound}, got {value!r}")


@_register
@dataclass
class LoraConfig(AdapterConfig):
    """Plain LoRA: y = x W^T + b + (alpha/r) (dropout(x) A^T) B^T (alpha/sqrt(r) with use_rslora)."""

    method: ClassVar[str] = "lora"
    alpha: float = 8.0
    use_rslora: bool = False

    def validate(self) -> None:
        super().validate()
        _check_positive(self, "alpha")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@_register
@dataclass
class SelectiveLoraConfig(LoraConfig):
    """Selective LoRA: a learnable score per layer gates the block, g = 1[score >= threshold].

    score_init >= threshold (all blocks on at start, as METHODS.md fixes); sparsity_weight
    is the coefficient lambda of the L1 penalty lambda * |score| of regularization_loss.
    """

    method: ClassVar[str] = "selective_lora"
    threshold: float = 0.1
    score_init: float = 1.0
    sparsity_weight: float = 1e-3

    def validate(self) -> None:
        super().validate()
        _check_positive(self, "sparsity_weight", allow_zero=True)
        for name in ("threshold", "score_init"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SelectiveLoraConfig.{name} must be a finite number, got {value!r}")
        if self.score_init < self.threshold:
            raise ValueError(f"SelectiveLoraConfig.score_init={self.score_init!r} must be >= "
                             f"threshold={self.threshold!r} (every block starts switched on)")


@_register
@dataclass
class RankSelectiveLoraConfig(LoraConfig):
    """CoDyRA: per-rank importance lambda, soft-thresholded after each optimizer step.

    lambda <- sign(lambda) * max(|lambda| - lr * sparsity_strength, 0).
    """

    method: ClassVar[str] = "rank_selective_lora"
    importance_init: float = 1.0
    sparsity_strength: float = 1e-3

    def validate(self) -> None:
        super().validate()
        _check_positive(self, "sparsity_strength", allow_zero=True)
        value = self.importance_init
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
            raise ValueError(f"RankSelectiveLoraConfig.importance_init must be a finite nonzero number "
                             f"(0 would prune every rank before training), got {value!r}")


@_register
@dataclass
class CurLoraConfig(AdapterConfig):
    """CURLoRA: C = W[:, J], R = W[I, :] sampled by inverted probabilities, U (r x r) trained.

    y = x W^T + b + alpha (x R^T) U^T C^T. eps regularises q ∝ 1/(p + eps) (1e-3 as in
    the authors' code; 0 is the paper's formula); layer k of the model samples with
    seed + k (k = its position among adapted layers).
    """

    method: ClassVar[str] = "curlora"
    alpha: float = 1.0
    eps: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        _check_positive(self, "eps", allow_zero=True)
        if not math.isfinite(self.alpha):
            raise ValueError(f"CurLoraConfig.alpha must be finite, got {self.alpha!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"CurLoraConfig.seed must be an int >= 0, got {self.seed!r}")


@_register
@dataclass
class NeatConfig(AdapterConfig):
    """NEAT / PEANuT: y = x W^T + b + scale * x f(act(W^T A_n^T)) B_n^T.

    depth: number of r x r encoder/decoder pairs in f (0 = identity); activation one
    of fastlora.kernels.ACTIVATIONS.
    """

    method: ClassVar[str] = "neat"
    depth: int = 0
    activation: str = "relu"
    scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        from fastlora.kernels import ACTIVATIONS
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ValueError(f"NeatConfig.depth must be an int >= 0, got {self.depth!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"NeatConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"NeatConfig.scale must be finite, got {self.scale!r}")


@_register
@dataclass
class CascadeLoraConfig(LoraConfig):
    """LoRASC: cascaded LoRA pairs with slow-fast updates and noisy cascade starts.

    cascade_interval: optimizer steps per cascade step. slow_momentum: m of the slow-fast
    update slow <- m * slow + (1 - m) * fast at each cascade step (the paper's pace
    alpha = 1 - m; default 0.5, Lookahead's alpha; 0 folds the whole fast pair). noise_std:
    std of the Gaussian noise B of each fresh pair starts from (0 = no noise). max_cascades:
    how many folded pairs are kept (r * max_cascades folded ranks; beyond that the folded
    update is recompressed to its best rank-(r * max_cascades) approximation).
    """

    method: ClassVar[str] = "cascade_lora"
    cascade_interval: int = 100
    slow_momentum: float = 0.5
    noise_std: float = 0.0
    max_cascades: int = 4

    def validate(self) -> None:
        super().validate()
        for name in ("cascade_interval", "max_cascades"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CascadeLoraConfig.{name} must be an int > 0, got {value!r}")
        value = self.slow_momentum
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            raise ValueError(f"CascadeLoraConfig.slow_momentum must lie in [0, 1) (1 would discard every "
                             f"fast pair), got {value!r}")
        _check_positive(self, "noise_std", allow_zero=True)

"""Per-method cases of the adapted-Linear benchmark: every method through the user layer.

Each case is ``AdapterLinear.from_linear`` around an ``nn.Linear`` holding the frozen
weight (d_out, d_in) shared with the raw variants (not copied), bias None, rank r; the
factors the method trains from zero are filled with N(0, FILL_STD^2) so no path is
trivially zero. Cases (active rank in brackets):

- ``lora``: alpha = 2 r, scale 2 as the raw variants and PEFT [r];
- ``selective_lora``: block on (score_init above the threshold) [r];
- ``selective_lora_off``: score set below the threshold, the block is gated off [0; in
  training the straight-through score gradient is still formed];
- ``rank_selective_lora``: importance of ranks r/2.. set to 0, then
  ``refresh_active_ranks()`` (half the ranks pruned) [r/2];
- ``curlora``: U random; C, R gathered from W by index [r];
- ``neat``: depth 0, B random [r];
- ``cascade_lora``: after one ``cascade_step()`` (the first pair folded into the backbone copy
  of W), fast B random [r].
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

from fastlora import (
    AdapterConfig,
    AdapterLinear,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)

from .timing import measure

FILL_STD = 0.02


def _fill(gen: torch.Generator) -> Callable[[Tensor], None]:
    """t <- N(0, FILL_STD^2) in place, drawn from ``gen``."""
    return lambda t: nn.init.normal_(t, std=FILL_STD, generator=gen)


def _lora(adapter, fill) -> None:
    fill(adapter.lora_B)


def _selective_off(adapter, fill) -> None:
    fill(adapter.lora_B)
    adapter.score.fill_(adapter.threshold - 1.0)


def _rank_selective(adapter, fill) -> None:
    fill(adapter.lora_B)
    adapter.importance[adapter.config.r // 2:] = 0.0
    adapter.refresh_active_ranks()


def _curlora(adapter, fill) -> None:
    fill(adapter.U)


def _neat(adapter, fill) -> None:
    fill(adapter.neat_B)


def _cascade(adapter, fill) -> None:
    fill(adapter.lora_B)
    adapter.cascade_step()
    fill(adapter.lora_B)


# name -> (config type, config fields besides r and backend, state set on the fresh adapter)
_CASES: dict[str, tuple[type[AdapterConfig], dict, Callable]] = {
    "lora": (LoraConfig, {}, _lora),
    "selective_lora": (SelectiveLoraConfig, {}, _lora),
    "selective_lora_off": (SelectiveLoraConfig, {}, _selective_off),
    "rank_selective_lora": (RankSelectiveLoraConfig, {}, _rank_selective),
    "curlora": (CurLoraConfig, {}, _curlora),
    "neat": (NeatConfig, {"depth": 0}, _neat),
    "cascade_lora": (CascadeLoraConfig, {}, _cascade),
}
METHODS = tuple(_CASES)


@torch.no_grad()
def method_layer(name: str, weight: Tensor, r: int, backend: str, gen: torch.Generator) -> AdapterLinear:
    """The ``name`` case's AdapterLinear around ``weight`` (d_out, d_in), in train mode."""
    config_type, fields, prepare = _CASES[name]
    if issubclass(config_type, LoraConfig):
        fields = {"alpha": 2.0 * r, **fields}
    config = config_type(r=r, backend=backend, **fields)
    d_out, d_in = weight.shape
    linear = nn.Linear(d_in, d_out, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    layer = AdapterLinear.from_linear(linear, config)
    prepare(layer.adapter, _fill(gen))
    return layer


@torch.no_grad()
def active_rank(layer: AdapterLinear) -> int:
    """Ranks the fused op computes in eval mode: rows of A (or of the CUR index), 0 when gated off."""
    layer.eval()
    args = layer.adapter.op_arguments(layer.weight)
    if float(args.get("gate", 1.0)) == 0.0:
        return 0
    a = args["lora_a"]
    return int(a.shape[0] if a is not None else args["row_index"].numel())


def method_jobs(x: Tensor, weight: Tensor, dy: Tensor, r: int, backend: str) -> dict[str, Callable[[], dict]]:
    """name -> a call measuring that method's layer on x (N, d_in): ``measure(...)`` plus its
    "active_rank" (the layer is built when the call runs)."""
    gen = torch.Generator(device=x.device).manual_seed(1)

    def job(name: str) -> dict:
        layer = method_layer(name, weight, r, backend, gen)
        params = [x, *(p for p in layer.parameters() if p.requires_grad)]
        return {**measure(lambda: layer(x), params, dy, x.device, module=layer), "active_rank": active_rank(layer)}

    return {name: functools.partial(job, name) for name in METHODS}

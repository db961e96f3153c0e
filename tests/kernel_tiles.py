"""Launch configurations forced on the Triton kernels, so the interpreter runs them at the tiles a GPU uses.

Under ``TRITON_INTERPRET=1`` every kernel gets one 16-wide configuration (``launch_config``); a kernel that
confuses two block sizes cannot show it there. The autotuned kernels (fused GEMM, one-pass forward and input
gradient) are given a one-entry configuration list (the autotuner then neither prunes nor benchmarks, so a
configuration the prune would remove runs too); the skinny kernels (shrink, dy pass, dA, NEAT's projection)
read their blocks from ``skinny_blocks``, replaced in each module that calls it. The interpreter has no warps
or pipeline stages: configurations are listed once per distinct block sizes.
"""
from __future__ import annotations

from unittest import mock

import triton

from fastlora.kernels.triton import (
    fused_linear,
    launch_config,
    neat_kernels,
    onepass_backward,
    onepass_tiles,
    shrink,
    skinny,
)

#: Blocks of the skinny kernels beside the GPU's: the interpreter's and two small unequal ones (rows < columns,
#: rows > columns) that keep CPU runs short.
SMALL_SKINNY = ({"BLOCK_M": 16, "BLOCK_K": 16}, {"BLOCK_M": 16, "BLOCK_K": 64}, {"BLOCK_M": 32, "BLOCK_K": 16})
#: A GEMM tile beside the GPU's and the interpreter's: small, unequal, K wider than M.
SMALL_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}


def _blocks(config: dict) -> dict:
    return {name: value for name, value in config.items() if name.startswith(("BLOCK_", "GROUP_"))}


def _distinct(configs) -> list[dict]:
    seen = []
    for config in configs:
        if config.kwargs not in seen:
            seen.append(dict(config.kwargs))
    return seen


def gemm_tiles() -> list[dict]:
    """Block sizes of the fused GEMM: every GPU tile (``gemm_configs`` and the expand's ``expand_config`` on a
    GPU), the interpreter's, SMALL_GEMM."""
    with mock.patch.object(launch_config, "INTERPRETED", False):
        gpu = launch_config.gemm_configs() + [triton.Config(_blocks(launch_config.expand_config()))]
    return _distinct(gpu + launch_config.gemm_configs()) + [{**SMALL_GEMM, "GROUP_M": 2}]


def persistent_tiles() -> list[dict]:
    """Block sizes of the one-pass kernels: every GPU tile (``persistent_configs`` on a GPU), the interpreter's,
    SMALL_GEMM. The input gradient runs each with its BLOCK_M as the row tile of its partials."""
    with mock.patch.object(launch_config, "INTERPRETED", False):
        gpu = _distinct(onepass_tiles.persistent_configs())
    return gpu + _distinct(onepass_tiles.persistent_configs()) + [SMALL_GEMM]


def skinny_tiles() -> list[dict]:
    """Blocks of the skinny kernels: every value ``skinny_blocks`` takes on a GPU, then SMALL_SKINNY."""
    with mock.patch.object(launch_config, "INTERPRETED", False):
        gpu = [launch_config.skinny_blocks(r_pad, precision, dropout) for r_pad in (16, 32, 64, 128)
               for precision in ("tf32", "ieee") for dropout in (False, True)]
    blocks = []
    for cfg in gpu + list(SMALL_SKINNY):
        cfg = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_K": cfg["BLOCK_K"]}
        if cfg not in blocks:
            blocks.append(cfg)
    return blocks


def tile_id(blocks: dict) -> str:
    """A test id of block sizes: 'M64-N128-K32'."""
    return "-".join(f"{name[6]}{value}" for name, value in blocks.items() if name.startswith("BLOCK_"))


def force_gemm(monkeypatch, blocks: dict) -> None:
    """The fused GEMM runs with these block sizes (GROUP_M included) whatever its prune would keep, and so does
    the expand alone (its fixed ``expand_config``)."""
    monkeypatch.setattr(fused_linear._fused_linear_kernel, "configs", [triton.Config(dict(blocks))])
    monkeypatch.setattr(fused_linear, "expand_config", lambda: {**blocks, "num_warps": 4})


def force_persistent(monkeypatch, blocks: dict) -> None:
    """Both one-pass kernels run with these block sizes; the input gradient's partials use its BLOCK_M."""
    from fastlora.kernels.triton.onepass_forward import _onepass_forward_kernel
    monkeypatch.setattr(_onepass_forward_kernel, "configs", [triton.Config(dict(blocks))])
    monkeypatch.setattr(onepass_backward._onepass_input_grad_kernel, "configs", [triton.Config(dict(blocks))])
    monkeypatch.setattr(onepass_backward, "BACKWARD_BLOCK_M", blocks["BLOCK_M"])


def force_skinny(monkeypatch, blocks: dict) -> None:
    """The shrink, dy-pass, dA and NEAT kernels run with these (BLOCK_M, BLOCK_K) whatever the rank, precision
    and dropout."""
    def fixed(r_pad, precision, dropout=False):
        return {**blocks, "num_warps": 4}
    for module in (shrink, skinny, neat_kernels):
        monkeypatch.setattr(module, "skinny_blocks", fixed)

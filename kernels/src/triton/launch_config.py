"""Launch policy of the kernels: the GEMM tile list and its pruning, skinny-kernel blocks, how a
reduction is split across programs, tl.dot's input precision, and the launch context.

Under ``TRITON_INTERPRET=1`` (read by ``@triton.jit`` when a kernel module is imported)
every kernel gets one small configuration, so CPU tests are quick and cross tile edges.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

#: True when the kernels of this package were built for the Triton interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: ...and so were Triton's own library functions (tl.rand), i.e. triton was imported with it set.
INTERPRETER_READY = INTERPRETED and type(tl.rand).__name__ == "InterpretedFunction"

#: Integer kernel arguments that follow the token count (the rows, the token bucket), passed to
#: ``triton.jit(do_not_specialize=...)``: Triton would otherwise compile a kernel anew for each of
#: their classes (1, a multiple of 16, other), so a run whose batches vary in length (the last
#: batch, dynamic padding) would stall on recompiles of every kernel. Neither enters an address
#: whose alignment matters. The rows or columns per split stay specialized: they are multiples of
#: the block by construction (one class), and knowing so keeps the shrink's loads of x vectorized
#: (unspecialized, it compiled for sm_90 to 212 registers instead of 86).
TOKEN_ARGS = ("M", "M_BUCKET")
#: Smallest K of a ``tl.dot`` on NVIDIA GPUs; the rank is padded to at least this.
MIN_DOT = 16
#: fp32 accumulator registers per thread a GEMM configuration may plan for (255 is the hardware
#: limit; the rest holds operand fragments, pointers and masks). Compiled for sm_90, tiles past it
#: spill (e.g. the fused GEMM with dropout at 128x256 on 8 warps: two 128-register tiles).
ACCUMULATOR_REGISTERS = 160


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints. The launch code calls this, not ``triton.cdiv``: on Triton 3.9 that is a
    constexpr function whose host call costs ~4 us, some 20 times per adapted layer's forward + backward."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for host ints n >= 1 (as ``triton.next_power_of_2``, without its
    per-call cost; see ``cdiv``)."""
    return 1 << (n - 1).bit_length()


def gemm_configs() -> list[triton.Config]:
    """Tiles of the fused base GEMM (M = tokens, N = output features, K = reduction).

    The deep-pipelined 128x256 / 256x128 tiles (4 stages, ~196 KB of shared memory) suit
    Hopper (H100/H200, 228 KB per SM); ``prune_gemm_configs`` drops what a device or a
    token bucket cannot use, so one list serves every GPU.
    """
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
        (128, 128, 64, 8, 4), (128, 128, 64, 4, 5), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3), (32, 64, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in tiles]


def shared_memory_limit(device_index: int) -> Optional[int]:
    """Bytes of shared memory a block may opt into on a CUDA device (None when torch does not say)."""
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", None)


def within_register_budget(config: triton.Config, fp32_elements: int) -> bool:
    """Whether ``fp32_elements`` accumulator values of one program fit ACCUMULATOR_REGISTERS per thread."""
    return fp32_elements // (32 * config.num_warps) <= ACCUMULATOR_REGISTERS


def prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than twice the token bucket (mostly padding), tiles whose pipeline
    (stages x (BLOCK_M + BLOCK_N) x BLOCK_K operands) exceeds the device's shared memory, and
    tiles whose fp32 accumulators pass ACCUMULATOR_REGISTERS per thread: one output tile, two
    when the low-rank term is masked by dropout (it cannot accumulate into the output tile).
    Always keeps the smallest tile."""
    m_bucket = kwargs.get("M_BUCKET", named_args.get("M_BUCKET", 1 << 30))
    x = named_args.get("x_ptr")
    element = x.element_size() if hasattr(x, "element_size") else 2
    limit = shared_memory_limit(x.device.index or 0) if getattr(x, "is_cuda", False) else None
    tiles = 2 if kwargs.get("HAS_LOWRANK", False) and kwargs.get("DROPOUT", False) else 1
    kept = []
    for config in configs:
        meta = config.kwargs
        if meta["BLOCK_M"] > max(2 * m_bucket, 32):
            continue
        staged = config.num_stages * (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * element
        if limit is not None and staged > limit:
            continue
        if not within_register_budget(config, tiles * meta["BLOCK_M"] * meta["BLOCK_N"]):
            continue
        kept.append(config)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def pad_rank(r: int) -> int:
    """The rank as a power of two of at least MIN_DOT (masked beyond r)."""
    return max(MIN_DOT, next_power_of_2(r))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: fp32 follows torch's TF32 switch, as a torch matmul would."""
    if dtype != torch.float32:
        return "tf32"  # Triton's default; no effect on fp16/bf16 operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED else "ieee"


def target_programs(device: torch.device) -> int:
    """Programs a split reduction should launch to fill the device."""
    if device.type == "cuda":
        return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    """The CUDA device's SM count, read once (split reductions ask on every launch)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def skinny_blocks(r_pad: int, precision: str, dropout: bool = False) -> dict:
    """Tiles of the skinny kernels (shrink, dP/dB pass, dA, NEAT's projection) whose dots run at
    ``precision`` (``dot_precision``): (rows, reduction columns) and warps. ``dropout``: the shrink
    masks its x tile in registers (the mask's integer work holds a second tile): 64 columns, as 128
    spilled compiled for sm_90. "ieee" (fp32 operands with TF32 off, torch's default) dots are FMAs
    whose operand tiles sit in registers: 32 columns, as 128 (and 64) spilled compiled for sm_90
    (dA with dropout at 255 registers and 200-320 B of stack, the dy pass with dbias at r = 8); at
    32 none spills."""
    if INTERPRETED:
        return {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4}
    if precision == "ieee":
        return {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_K": 128 if r_pad <= 32 and not dropout else 64, "num_warps": 4}


def expand_config() -> dict:
    """The one launch configuration of the low-rank expand alone (``fused_linear`` without a base
    GEMM: read v (M, r) and U (r, N), write out (M, N)): memory-bound, so one tile serves every
    shape and nothing is autotuned (no first-use compile of a tile list). 64x64 on 4 warps: the
    smallest of the GEMM tiles that holds 128 B rows; compiled for sm_90 with dropout (Triton 3.6)
    it used 128 registers without spilling (64x128 used 232, and spilled 272 B on odd shapes)."""
    if INTERPRETED:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}


@functools.lru_cache(maxsize=4096)
def split_reduction(length: int, block: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, per_split) of a reduction over ``length`` elements in tiles of ``block``: split
    so that splits * other_programs programs fill the device; per_split is a multiple of
    ``block`` and every split is non-empty (splits = cdiv(length, per_split)). Memoized: every
    launch of a split reduction asks, with the same few shapes call after call."""
    blocks = cdiv(length, block)
    wanted = max(1, min(cdiv(target_programs(device), max(other_programs, 1)), blocks))
    per_split = cdiv(blocks, wanted) * block
    return cdiv(length, per_split), per_split


#: the context of a launch that needs no device switch (reused: entering it costs next to nothing)
_NO_SWITCH = contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def _one_visible_gpu() -> bool:
    return torch.cuda.device_count() == 1


def launch_context(device: torch.device):
    """Context to launch on ``device``: its CUDA device (Triton launches on the current one; with a
    single visible GPU that is ``device`` already, and the switch, two driver calls per launch, is
    skipped), or the interpreter for CPU tensors."""
    if device.type == "cuda":
        return _NO_SWITCH if _one_visible_gpu() else torch.cuda.device(device)
    if not INTERPRETER_READY:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
            "triton is first imported (Triton reads it when kernels are defined, its own included)")
    return _NO_SWITCH

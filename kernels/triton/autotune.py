"""Launch configurations: the GEMM autotune list, skinny-kernel blocks, dot precision.

Under ``TRITON_INTERPRET=1`` (read by ``@triton.jit`` when a kernel module is imported)
every kernel gets one small configuration, so CPU tests are quick and cross tile edges.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

#: True when the kernels of this package were built for the Triton interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: ...and so were Triton's own library functions (tl.rand), i.e. triton was imported with it set.
INTERPRETER_READY = INTERPRETED and type(tl.rand).__name__ == "InterpretedFunction"

#: Smallest K of a ``tl.dot`` on NVIDIA GPUs; the rank is padded to at least this.
MIN_DOT = 16


def gemm_configs() -> list[triton.Config]:
    """Tiles of the fused base GEMM (M = tokens, N = output features, K = reduction)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]


def pad_rank(r: int) -> int:
    """The rank as a power of two of at least MIN_DOT (masked beyond r)."""
    return max(MIN_DOT, triton.next_power_of_2(r))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: fp32 follows torch's TF32 switch, as a torch matmul would."""
    if dtype != torch.float32:
        return "tf32"  # Triton's default; no effect on fp16/bf16 operands
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED else "ieee"


def target_programs(device: torch.device) -> int:
    """Programs a split reduction should launch to fill the device."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def skinny_blocks(r_pad: int) -> dict:
    """Tiles of the skinny kernels (shrink, dP/dB pass, dA): (rows, reduction columns) and warps."""
    if INTERPRETED:
        return {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_K": 128 if r_pad <= 32 else 64, "num_warps": 4}


def split_reduction(length: int, block: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, per_split) of a reduction over ``length`` elements in tiles of ``block``: split
    so that splits * other_programs programs fill the device; per_split is a multiple of
    ``block`` and every split is non-empty (splits = cdiv(length, per_split))."""
    blocks = triton.cdiv(length, block)
    wanted = max(1, min(triton.cdiv(target_programs(device), max(other_programs, 1)), blocks))
    per_split = triton.cdiv(blocks, wanted) * block
    return triton.cdiv(length, per_split), per_split


def launch_context(device: torch.device):
    """Context to launch on ``device``: its CUDA device, or the interpreter for CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    if not INTERPRETER_READY:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
            "triton is first imported (Triton reads it when kernels are defined, its own included)")
    return contextlib.nullcontext()

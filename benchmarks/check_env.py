"""GPU check, section "env": versions, the device, copy bandwidth and matmul throughput.

Copy bandwidth: bytes read + written per second of a large device-to-device copy (the
ceiling of a memory-bound kernel). Matmul: a square GEMM's FLOP/s (cuBLAS bf16 on CUDA;
fp32 on CPU, where the numbers only exercise the code).
"""
from __future__ import annotations

import platform
import subprocess
import sys
from typing import Optional

import torch

from .bench_adapted_linear import device_name, version
from .timing import median_ms

# (copy bytes, matmul size) per device type, and the quick CPU sizes
SIZES = {"cuda": (2**30, 8192), "cpu": (2**26, 1024)}
QUICK_SIZES = (2**22, 128)
MATMUL_DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}


def _driver() -> Optional[str]:
    """The NVIDIA driver version from nvidia-smi, None when it is not there."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _device_info(device: torch.device) -> dict:
    info = {"name": device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                     "capability": f"{props.major}.{props.minor}"})
    else:
        info.update({"cpu_threads": torch.get_num_threads()})
    return info


def copy_gbs(device: torch.device, nbytes: int) -> float:
    """GB/s (read + written) of copying ``nbytes`` bytes on ``device``."""
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, size: int) -> float:
    """TFLOP/s of a (size x size) @ (size x size) matmul in the device's benchmark dtype."""
    dtype = MATMUL_DTYPES[device.type]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def run(ctx) -> dict:
    device = ctx.device
    nbytes, size = QUICK_SIZES if ctx.quick else SIZES[device.type]
    result = {"versions": {"python": sys.version.split()[0], "platform": platform.platform(),
                           "torch": torch.__version__, "triton": version("triton"), "peft": version("peft"),
                           "cuda": torch.version.cuda, "driver": _driver() if device.type == "cuda" else None},
              "device": _device_info(device)}
    result["copy_bytes"] = nbytes
    result["copy_gbs"] = copy_gbs(device, nbytes)
    result["matmul"] = {"size": size, "dtype": str(MATMUL_DTYPES[device.type]).replace("torch.", ""),
                        "tflops": matmul_tflops(device, size)}
    result["summary"] = (f"{result['device']['name']}; copy {result['copy_gbs']:.0f} GB/s; "
                         f"matmul {result['matmul']['tflops']:.1f} TFLOP/s ({result['matmul']['dtype']} {size}^3)")
    return result

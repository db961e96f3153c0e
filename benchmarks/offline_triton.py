"""Triton made to compile for a GPU that is not there: an offline driver, and a record of each
compiled kernel with the cubin's resource usage (registers, spilled stack, shared memory).

``install_offline_triton(arch, compiled)`` patches this process's Triton: a kernel call compiles
for sm_<arch> with Triton's own ptxas (an autotuned kernel: every configuration its autotuner
would try) and launches nothing. Used by ``compile_check`` and by ``bench_host --plan cublas`` on the CPU
(there every launch runs Triton's own launch path up to the driver); import it before anything launches.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


class OfflineDriver:
    """Triton's view of a device of ``target`` (a GPUTarget) that never launches: enough for
    ``JITFunction.run(..., warmup=True)``, which compiles and returns the kernel."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def install_offline_triton(arch: int, compiled: list) -> None:
    """Make this process's Triton compile for sm_<arch> instead of launching, appending one record
    per kernel compiled to ``compiled``, and let the fastlora Triton plans take CPU tensors."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from fastlora.kernels import dispatch, eligibility
    from fastlora.kernels.triton import launch_config

    if launch_config.INTERPRETED:
        raise SystemExit("compile_check compiles for a GPU: unset TRITON_INTERPRET")
    driver.set_active(OfflineDriver(GPUTarget("cuda", arch, 32)))
    jit_run, seen = JITFunction.run, set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.hash not in seen:
            seen.add(kernel.hash)
            compiled.append(_record(self.__name__, kernel, kwargs, time.perf_counter() - start))
        return kernel

    def compile_every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            for config in configs:
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    JITFunction.run = compile_only
    Autotuner.run = compile_every_config
    launch_config.INTERPRETER_READY = True  # launch_context: no CUDA device to enter
    eligible = dispatch.triton_ineligibility
    dispatch.triton_ineligibility = lambda device, dtype: eligible(device, dtype) \
        if dtype not in eligibility.TRITON_DTYPES else None


def _record(name: str, kernel, kwargs: dict, seconds: float) -> dict:
    """One compiled kernel: name, constexprs, warps, stages, compile seconds, resource usage."""
    meta = kernel.metadata
    constexprs = {k: v for k, v in kwargs.items() if k.isupper() and not isinstance(v, torch.Tensor)}
    return {"kernel": name, "hash": kernel.hash, "constexprs": constexprs, "num_warps": meta.num_warps,
            "num_stages": meta.num_stages, "seconds": round(seconds, 3), **resource_usage(kernel.asm["cubin"])}


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack bytes (spills and local arrays) and static shared memory of a cubin."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = RESOURCE.search(out)
    if match is None:
        return {"resource_usage": out.strip()}
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "stack_bytes": stack, "local_bytes": local, "static_shared": shared}

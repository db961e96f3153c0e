"""``backend="auto"``: time the plans once per shape, keep the fastest in memory and on disk.

A shape is a ``PlanKey``: device, dtype, token bucket (next power of two of N), d_in, d_out,
r, dropout on/off, gathered factors. On first use of a key the candidates ("triton",
"cublas", "torch", "onepass") each run forward + backward on random tensors of that shape; the
fastest median wins (ties go to the earlier candidate). Winners are kept in memory and in
``plans.json`` under the cache directory (``FASTLORA_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``), in a section per device name and
torch / Triton versions, so another process or a later run reuses them without timing.

No timing happens while torch.compile traces or a CUDA graph is captured: there the
recorded winner is used, or ``DEFAULT_PLAN`` (cuBLAS base GEMMs: never slower than the
frozen layer's own GEMMs) when none is recorded.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

#: plan used without a measurement (torch.compile tracing, CUDA-graph capture)
DEFAULT_PLAN = "cublas"
CANDIDATES = ("triton", "cublas", "torch", "onepass")
CACHE_FILE = "plans.json"

#: timer(fn) -> seconds per call of fn; replaceable (tests inject a deterministic one)
Timer = Callable[[Callable[[], None]], float]


def _library_directories() -> tuple[str, ...]:
    """Source directories of fastlora, its kernels and torch (the frames a warning should not point at)."""
    modules = (sys.modules[__package__.rpartition(".")[0]], sys.modules[__package__], torch)
    return tuple(str(Path(module.__file__).resolve().parent) + os.sep for module in modules)


def warn_at_caller(message: str) -> None:
    """``warnings.warn`` attributed to the first frame outside fastlora and torch: the user's line that
    ran the layer (or called the cache), wherever in the library the warning arose."""
    inside = _library_directories()
    frame, stacklevel = sys._getframe(1), 2
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(inside):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, stacklevel=stacklevel)


@dataclass(frozen=True)
class PlanKey:
    """What the plan choice depends on."""

    device: str
    dtype: str
    token_bucket: int
    d_in: int
    d_out: int
    rank: int
    dropout: bool
    gathered: bool

    def __str__(self) -> str:
        return "|".join(str(v) for v in astuple(self))


def token_bucket(n_tokens: int) -> int:
    """The next power of two of ``n_tokens`` (at least 1): one measurement serves a range of batch shapes."""
    return 1 << max(n_tokens - 1, 0).bit_length()


def cuda_timer(fn: Callable[[], None], warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, after ``warmup`` calls (autotuning included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cache_directory() -> Path:
    explicit = os.environ.get("FASTLORA_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fastlora"


def environment_section(device: torch.device) -> str:
    """The cache section of a device: its name and the torch / Triton versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"{name}|torch {torch.__version__}|triton {triton_version}"


@functools.lru_cache(maxsize=None)
def device_section(device: torch.device) -> str:
    """``environment_section`` read once per device (``auto`` asks for it on every call)."""
    return environment_section(device)


class PlanCache:
    """Winners by (environment section, key): in memory, mirrored to a JSON file."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self._path = path
        self._entries: Optional[dict[str, dict[str, str]]] = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_directory() / CACHE_FILE

    def _loaded(self) -> dict[str, dict[str, str]]:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            warn_at_caller(f"fastlora: ignoring the unreadable plan cache {self.path}: {error}")
            return {}
        if not isinstance(data, dict):
            return {}
        return {section: {k: v for k, v in plans.items() if v in CANDIDATES}
                for section, plans in data.items() if isinstance(plans, dict)}

    def get(self, section: str, key: PlanKey) -> Optional[str]:
        with self._lock:
            return self._loaded().get(section, {}).get(str(key))

    def put(self, section: str, key: PlanKey, plan: str) -> None:
        with self._lock:
            self._loaded().setdefault(section, {})[str(key)] = plan
            self._write()

    def entries(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {section: dict(plans) for section, plans in self._loaded().items()}

    def clear(self) -> None:
        """Forget the in-memory winners (the file is read again on next use)."""
        with self._lock:
            self._entries = None

    def _write(self) -> None:
        """Replace the file atomically (merged with what other processes wrote meanwhile); failures only warn."""
        try:
            on_disk = self._read()
            for section, plans in self._entries.items():
                on_disk.setdefault(section, {}).update(plans)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=self.path.parent)
            try:
                with os.fdopen(handle, "w") as file:
                    json.dump(on_disk, file, indent=1, sort_keys=True)
                os.replace(temp, self.path)
            except BaseException:
                os.unlink(temp)
                raise
        except OSError as error:
            warn_at_caller(f"fastlora: could not write the plan cache {self.path}: {error}")


CACHE = PlanCache()


def measure_and_choose(key: PlanKey, run: Callable[[str], None], candidates: Optional[tuple[str, ...]] = None,
                       timer: Optional[Timer] = None) -> tuple[str, dict[str, float]]:
    """(fastest plan, seconds per plan): ``run(plan)`` is one forward + backward of ``key``'s shape."""
    candidates = candidates or CANDIDATES
    timer = timer or cuda_timer
    seconds = {plan: timer(lambda plan=plan: run(plan)) for plan in candidates}
    best = min(candidates, key=lambda plan: seconds[plan])
    return best, seconds


def choose(key: PlanKey, section: str, run: Callable[[str], None], *, measurable: bool,
           timer: Optional[Timer] = None, cache: Optional[PlanCache] = None) -> str:
    """The recorded plan for ``key``, else (when ``measurable``) the measured fastest, recorded; else DEFAULT_PLAN."""
    cache = cache or CACHE
    plan = cache.get(section, key)
    if plan is not None:
        return plan
    if not measurable:
        return DEFAULT_PLAN
    plan, _ = measure_and_choose(key, run, timer=timer)
    cache.put(section, key, plan)
    return plan


def auto_choices() -> dict[str, str]:
    """The plans ``auto`` has chosen, as {"<section>|<key>": plan} (for reports)."""
    return {f"{section}|{key}": plan for section, plans in CACHE.entries().items() for key, plan in plans.items()}

"""``backend="auto"`` on CUDA: a rule by default, measurements only when asked for.

The rule: ``DEFAULT_PLAN`` ("cublas": torch's GEMMs, i.e. cuBLAS, for x W^T and dy W, the low-rank
work in Triton kernels around them), the plan a committed GPU correctness run showed correct and
whose time is the frozen layer's GEMMs plus memory-bound low-rank glue; below ``SIZE_RULE``'s size
the torch plan instead (``default_plan``). No plan is compiled or timed on first use, so a first
step costs the frozen model's plus the compilation of the default plan's few kernels.

Why a size: a call's host work (Python, dispatcher, launches) is about constant, its device work
grows with N * d_in * d_out. Where the device work is shorter than the host work the device waits
for the host, and the plan with less host work per call wins whatever its bytes: the torch plan
(torch's ops recorded by autograd, as PEFT's layer runs) has less than the cublas plan (an autograd
Function and Triton launches). ``benchmarks/bench_crossover.py`` measures where the cublas plan
starts to win (``size_rule``); ``SIZE_RULE`` holds that size from a committed run, or None (no run
has measured it: the cublas plan at every size).

Measured choice is opt-in: ``fastlora.tune(model, batch)`` (or ``FASTLORA_TUNE=1``, which times
each new shape on first use) runs forward + backward of every plan in ``AUTO_CANDIDATES`` (the
plans a committed GPU run showed correct; "triton" and "onepass" are reachable by name only) on
random tensors of each shape and keeps the fastest. A shape is a ``PlanKey``: device, dtype,
token bucket (next power of two of N), d_in, d_out, r, dropout on/off, gathered factors.
Winners are kept in memory and in ``plans.json`` under the cache directory
(``FASTLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastlora``, else ``~/.cache/fastlora``), in a
section per device name and torch / Triton versions, so another process or a later run reuses
them; every write merges with what other processes recorded, under a file lock. A plan that
raises while it is timed is recorded as failed for that key and never tried again there.
Nothing is timed while torch.compile traces or a CUDA graph is captured.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from .caller_warnings import warn_at_caller

try:
    import fcntl
except ImportError:  # not on Windows: writes are then merged without a lock
    fcntl = None

#: auto's plan on CUDA unless a measured winner is recorded for the shape or ``SIZE_RULE`` says torch
DEFAULT_PLAN = "cublas"


@dataclass(frozen=True)
class SizeRule:
    """auto's default on CUDA is the torch plan for a layer whose base GEMM is smaller than
    ``torch_below`` multiply-adds (token bucket x d_in x d_out), the cublas plan from there on;
    ``source``: the committed crossover run it was read from."""

    torch_below: int
    source: str


#: auto's size rule (see the module docstring); None until a committed GPU run has measured one
SIZE_RULE: Optional[SizeRule] = None

#: the plans auto may time and choose: shown correct by a committed GPU run of
#: benchmarks/gpu_check.py (tests/test_plans.py checks the record under benchmarks/results/)
AUTO_CANDIDATES = ("cublas", "torch")
CACHE_FILE = "plans.json"
#: set to 1 to time each new shape on first use (``fastlora.tune`` does it for one batch)
TUNE_ENV_VAR = "FASTLORA_TUNE"

#: timer(fn) -> seconds per call of fn; replaceable (tests inject a deterministic one)
Timer = Callable[[Callable[[], None]], float]


class PlanKey(NamedTuple):
    """What the plan choice depends on (a named tuple: ``auto`` builds and hashes one per call)."""

    device: str
    dtype: str
    token_bucket: int
    d_in: int
    d_out: int
    rank: int
    dropout: bool
    gathered: bool

    def __str__(self) -> str:
        return (f"{self.device}|{self.dtype}|{self.token_bucket}|{self.d_in}|{self.d_out}|{self.rank}|"
                f"{self.dropout}|{self.gathered}")


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


@dataclass
class Record:
    """What is known of one key: the measured winner (None: not measured) and the plans that failed there."""

    plan: Optional[str] = None
    failed: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"plan": self.plan, "failed": list(self.failed)}

    @staticmethod
    def from_json(value) -> Optional["Record"]:
        """A record from the file (a bare plan name is a winner), or None when malformed."""
        if isinstance(value, str):
            value = {"plan": value}
        if not isinstance(value, dict):
            return None
        plan, failed = value.get("plan"), value.get("failed", [])
        if plan is not None and plan not in AUTO_CANDIDATES:  # a plan auto no longer takes: measure again
            plan = None
        if not isinstance(failed, list):
            return None
        return Record(plan, tuple(p for p in failed if isinstance(p, str)))


Entries = dict[str, dict[str, Record]]


class PlanCache:
    """Records by (environment section, key): in memory, mirrored to a JSON file.

    ``record`` is asked on every ``auto`` call on CUDA: its answers are kept by (section, key) until
    this process records or forgets something (the file is read once; see ``clear``)."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self._path = path
        self._entries: Optional[Entries] = None
        self._answers: dict[tuple[str, PlanKey], Record] = {}
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_directory() / CACHE_FILE

    def _loaded(self) -> Entries:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> Entries:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            warn_at_caller(f"fastlora: ignoring the unreadable plan cache {self.path}: {error}")
            return {}
        if not isinstance(data, dict):
            return {}
        entries: Entries = {}
        for section, records in data.items():
            if isinstance(records, dict):
                parsed = {key: Record.from_json(value) for key, value in records.items()}
                entries[section] = {key: record for key, record in parsed.items() if record is not None}
        return entries

    def record(self, section: str, key: PlanKey) -> Record:
        answer = self._answers.get((section, key))
        if answer is not None:
            return answer
        with self._lock:
            answer = self._answers[section, key] = self._loaded().get(section, {}).get(str(key), Record())
            return answer

    def get(self, section: str, key: PlanKey) -> Optional[str]:
        """The measured winner for ``key``, or None."""
        return self.record(section, key).plan

    def put(self, section: str, key: PlanKey, plan: Optional[str], failed: tuple[str, ...] = ()) -> None:
        """Record the winner (None when every candidate failed) and the plans that failed for ``key``."""
        with self._lock:
            self._answers.clear()
            self._loaded().setdefault(section, {})[str(key)] = Record(plan, tuple(failed))
            self._write({section: {str(key): self._entries[section][str(key)]}})

    def entries(self) -> dict[str, dict[str, str]]:
        """The measured winners: {section: {key: plan}}."""
        with self._lock:
            return {section: {key: r.plan for key, r in records.items() if r.plan is not None}
                    for section, records in self._loaded().items()}

    def clear(self) -> None:
        """Forget the in-memory records (the file is read again on next use)."""
        with self._lock:
            self._entries = None
            self._answers.clear()

    def _write(self, new: Entries) -> None:
        """Merge ``new`` into the file (read, merge, replace atomically, under a file lock, so records
        other processes wrote meanwhile are kept) and into memory; failures only warn."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(f".{CACHE_FILE}.lock")):
                merged = self._read()
                for section, records in new.items():
                    merged.setdefault(section, {}).update(records)
                handle, temp = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=self.path.parent)
                try:
                    with os.fdopen(handle, "w") as file:
                        json.dump({section: {key: r.to_json() for key, r in records.items()}
                                   for section, records in merged.items()}, file, indent=1, sort_keys=True)
                    os.replace(temp, self.path)
                except BaseException:
                    os.unlink(temp)
                    raise
            for section, records in merged.items():
                self._entries.setdefault(section, {}).update(records)
        except OSError as error:
            warn_at_caller(f"fastlora: could not write the plan cache {self.path}: {error}")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created when missing) while the block runs."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


CACHE = PlanCache()
_TUNING = threading.local()


@contextlib.contextmanager
def tuning(report: Optional[Callable[[str], None]] = None) -> Iterator[None]:
    """Within the block, ``auto`` times the candidates of every shape it has no record for;
    ``report`` gets one line per measured shape."""
    previous = getattr(_TUNING, "report", None)
    _TUNING.report = report or (lambda line: None)
    try:
        yield
    finally:
        _TUNING.report = previous


def tuning_on() -> bool:
    return getattr(_TUNING, "report", None) is not None or os.environ.get(TUNE_ENV_VAR, "0") == "1"


def _report(line: str) -> None:
    report = getattr(_TUNING, "report", None)
    if report is not None:
        report(line)
    else:
        print(line, file=sys.stderr, flush=True)


def measure_and_choose(key: PlanKey, run: Callable[[str], None], candidates: Optional[tuple[str, ...]] = None,
                       timer: Optional[Timer] = None) -> tuple[Optional[str], dict[str, float], dict[str, str]]:
    """(fastest plan or None, seconds per plan that ran, error per plan that raised): ``run(plan)`` is
    one forward + backward of ``key``'s shape. A plan that raises is left out; when the error left
    the CUDA context unusable (an illegal address), it is raised instead: nothing after it can run."""
    candidates = candidates or AUTO_CANDIDATES
    timer = timer or cuda_timer
    seconds, errors = {}, {}
    for plan in candidates:
        try:
            seconds[plan] = timer(lambda plan=plan: run(plan))
        except Exception as error:  # noqa: BLE001 - a failing plan is recorded, not fatal
            _raise_if_context_lost(key, error)
            errors[plan] = f"{type(error).__name__}: {error}"
    best = min(seconds, key=seconds.__getitem__) if seconds else None
    return best, seconds, errors


def _raise_if_context_lost(key: PlanKey, error: Exception) -> None:
    if not key.device.startswith("cuda"):
        return
    try:
        torch.cuda.synchronize()
    except Exception as lost:  # noqa: BLE001
        raise RuntimeError(f"timing plans for {key} left the CUDA context unusable: {error}") from lost


def default_plan(key: PlanKey) -> str:
    """auto's plan for ``key`` when nothing was measured for it: the torch plan below ``SIZE_RULE``'s size,
    else ``DEFAULT_PLAN``."""
    rule = SIZE_RULE
    if rule is not None and key.token_bucket * key.d_in * key.d_out < rule.torch_below:
        return "torch"
    return DEFAULT_PLAN


def choose(key: PlanKey, section: str, run: Optional[Callable[[str], None]], *, measurable: bool,
           timer: Optional[Timer] = None, cache: Optional[PlanCache] = None) -> str:
    """The recorded winner for ``key``; else, when tuning is on and ``measurable``, the measured
    fastest of the candidates that have not failed there (recorded with the failures; ``run(plan)``
    runs one call of ``plan``, None where not ``measurable``); else ``default_plan(key)``, or where
    that plan failed the first candidate that has not (the torch plan when none is left)."""
    cache = cache or CACHE
    record = cache.record(section, key)
    if record.plan is not None:
        return record.plan
    timing = measurable and tuning_on()
    if not timing and not record.failed:  # the common call: nothing recorded for the key, nothing to time
        return default_plan(key)
    candidates = tuple(p for p in AUTO_CANDIDATES if p not in record.failed)
    if not timing or not candidates:
        plan = default_plan(key)
        return plan if plan not in record.failed else (candidates[0] if candidates else "torch")
    plan, seconds, errors = measure_and_choose(key, run, candidates, timer=timer)
    cache.put(section, key, plan, record.failed + tuple(errors))
    times = ", ".join(f"{p} {1e3 * t:.3f} ms" for p, t in seconds.items())
    failures = "".join(f"; {p} failed ({e})" for p, e in errors.items())
    _report(f"fastlora: {key}: {times}{failures} -> {plan or 'torch'}")
    return plan or "torch"


def auto_choices() -> dict[str, str]:
    """The plans ``auto`` has measured, as {"<section>|<key>": plan} (for reports)."""
    return {f"{section}|{key}": plan for section, plans in CACHE.entries().items() for key, plan in plans.items()}

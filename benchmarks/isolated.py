"""Run one benchmark step in a child Python process, so that a fault (a CUDA illegal memory access
poisons the whole process's context, a segfault ends it) stays in that child.

The child is ``python -m <module> <args>`` from the repository root; it reports by writing JSON to
a path it is given (``--out``), ideally after every item, so that the parent still reads how far
it got when it dies. ``CUDA_FAULT_MARKERS`` names the errors after which a process's CUDA context
is unusable.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
TAIL_LINES = 40
#: the ``Child`` processes started and not yet seen ended
LIVE: set = set()
#: substrings of an error after which the process's CUDA context is unusable (every later CUDA call fails)
CUDA_FAULT_MARKERS = ("illegal memory access", "misaligned address", "illegal instruction", "device-side assert",
                      "unspecified launch failure", "CUDA error: an illegal", "cudaErrorIllegalAddress")


def is_cuda_fault(text: str) -> bool:
    """Whether ``text`` (an error or a traceback) reports a fault that poisons the CUDA context."""
    return any(marker in text for marker in CUDA_FAULT_MARKERS)


def read_json(path: Path) -> Optional[dict]:
    """The JSON object at ``path``; None when it is missing or cut short (a child killed mid-write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file and a rename: a reader (or a kill mid-write) never
    leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    """``data`` to ``path`` as JSON, atomically (``write_text``)."""
    write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def descendants(pid: int) -> list[int]:
    """The live processes descended from ``pid`` (read from Linux's /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after the command name: state, ppid
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process it started (a benchmark's own children: first-step processes)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.kill()
    proc.wait()


def child_command(module: str, args: list[str], prefix: tuple[str, ...] = ()) -> list[str]:
    """``python -m module args``, run under the program ``prefix`` when given (e.g. a memory checker)."""
    return [*prefix, sys.executable, "-m", module, *args]


def child_env(extra: Optional[dict] = None) -> dict:
    """This process's environment with the repository root importable and ``extra`` set (a value of
    None removes the variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def kill_live_children() -> None:
    """Kill every ``Child`` still running, with the processes each started (a run being stopped)."""
    for child in list(LIVE):
        child.kill()


class Child:
    """``python -m module args`` started from the repository root (under ``prefix`` when given), its
    output going to ``<out>.log``."""

    def __init__(self, module: str, args: list[str], out: Path, env: Optional[dict] = None,
                 prefix: tuple[str, ...] = ()) -> None:
        self.out, self.log = out, out.with_name(out.name + ".log")
        self.start = time.monotonic()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(child_command(module, args, prefix), cwd=ROOT, env=child_env(env),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.timed_out = False
        self.end: Optional[float] = None
        LIVE.add(self)

    def running(self) -> bool:
        if self.end is None and self.proc.poll() is not None:
            self.end = time.monotonic()
            LIVE.discard(self)
        return self.end is None

    def wait(self, timeout_s: float) -> None:
        """Wait for its end, at most ``timeout_s`` seconds; then kill it (``timed_out``)."""
        try:
            self.proc.wait(timeout=max(timeout_s, 0.0))
        except subprocess.TimeoutExpired:
            self.kill()
        self.running()

    def kill(self) -> None:
        """Stop it (counted as out of time) if it is still running."""
        if self.running():
            self.timed_out = True
            _kill_tree(self.proc)
            self.running()

    def output(self) -> str:
        """Its stdout and stderr so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def report(self) -> dict:
        """{"returncode" (None when killed for time), "seconds", "timed_out", "output" (the last lines of
        its stdout and stderr together), "result" (the JSON it wrote, None when none)}; after its end."""
        return {"returncode": None if self.timed_out else self.proc.returncode,
                "seconds": (self.end or time.monotonic()) - self.start, "timed_out": self.timed_out,
                "output": tail(self.output()), "result": read_json(self.out)}


def run_child(module: str, args: list[str], out: Path, timeout_s: float, env: Optional[dict] = None) -> dict:
    """Run ``python -m module args`` (which writes its JSON to ``out``) to its end or ``timeout_s``;
    ``Child.report``."""
    child = Child(module, args, out, env)
    child.wait(timeout_s)
    return child.report()

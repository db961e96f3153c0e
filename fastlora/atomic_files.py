"""Writing a set of files into a directory all at once: every new file or every old one.

    write_files_atomically(directory, [("weights.safetensors", writer), ("config.json", writer)])

Each file is written to a temp file beside it (``.<name>.<12 hex digits>.tmp``), flushed and
fsynced, then renamed over its name in the given order, and the directory is fsynced. The old files
stay reachable under temp names until every rename is done, so an exception at any step puts them
back. A hard crash between two renames can leave a mix; a reader that must tell (``load_adapter``)
records a digest of one file in the other, and ``leftover_temp_files`` finds what the crash left.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from safetensors.torch import save_file
from torch import Tensor

PathLike = Union[str, os.PathLike]
#: writer(path) writes one file at the temp path it is given
Writer = Callable[[str], None]


def write_safetensors(path: str, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> str:
    """Write ``tensors`` as a safetensors file at ``path``; returns the file's SHA-256 (hex)."""
    save_file(tensors, path, metadata=metadata)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON into the existing file ``path``."""
    view = memoryview(json.dumps(data, indent=2).encode())
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_files_atomically(directory: PathLike, files: Sequence[tuple[str, Writer]]) -> Path:
    """Replace the files ``files`` names in ``directory`` (``~`` expanded; created when missing,
    an existing one keeps its mode) and touch nothing else there.

    ``files``: (file name, writer) pairs; a writer writes the file at the path it is given.
    Every file is first written to a temp file beside it (``.<name>.<random>.tmp``) and fsynced,
    then renamed over its final name in the given order, then the directory is fsynced. The
    old files stay hard-linked under temp names until all renames are done: an exception at any
    step restores them, so ``directory`` holds either every old file or every new one. A
    replaced file keeps the old file's mode.
    """
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it exists and is not a directory")
    if not target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        _fsync_directory(target.parent)
    staged: dict[str, Path] = {}
    kept: dict[str, Path] = {}
    placed: list[str] = []
    try:
        for name, write in files:
            staged[name] = _write_temp(target, name, write)
        for name, _ in files:
            if (target / name).exists():
                kept[name] = _keep(target / name)
        for name, _ in files:
            os.replace(staged[name], target / name)
            del staged[name]
            placed.append(name)
        _fsync_directory(target)
    except BaseException:
        _restore(target, placed, kept)
        raise
    finally:
        for path in (*staged.values(), *kept.values()):
            path.unlink(missing_ok=True)
    for name, _ in files:  # what a hard crash of an earlier save left behind
        for path in leftover_temp_files(target, name):
            path.unlink(missing_ok=True)
    return target


def leftover_temp_files(directory: Path, name: str) -> list[Path]:
    """The temp files of ``name`` (``.<name>.<12 hex digits>.tmp``) in ``directory``, sorted: left there
    only by a save that crashed hard (every finished or failed save removes its own)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{12}}\.tmp")
    try:
        return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name) and p.is_file())
    except OSError:
        return []


def _temp_path(directory: Path, name: str) -> Path:
    return directory / f".{name}.{secrets.token_hex(6)}.tmp"


def _write_temp(directory: Path, name: str, write: Writer) -> Path:
    """A fresh temp file beside ``name`` filled by ``write`` and fsynced (mode: the old file's,
    else what a new file gets under the umask)."""
    path = _temp_path(directory, name)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = path.stat().st_mode & 0o7777  # 0o666 less the umask
        write(str(path))  # a writer may replace the file (safetensors creates its own, mode 0o600)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if (directory / name).exists():
            mode = (directory / name).stat().st_mode & 0o7777
        os.chmod(path, mode)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _keep(path: Path) -> Path:
    """A second name for the existing file ``path`` (a hard link, a copy where links fail)."""
    kept = _temp_path(path.parent, path.name)
    try:
        os.link(path, kept)
    except OSError:
        shutil.copy2(path, kept)
    return kept


def _restore(directory: Path, placed: list[str], kept: dict[str, Path]) -> None:
    """Undo the renames of ``placed`` files: the kept old file goes back, a new file without an
    old one is removed. Best effort (the original error is what the caller raises); an old file
    that cannot be put back stays under its temp name."""
    for name in reversed(placed):
        try:
            if name in kept:
                os.replace(kept[name], directory / name)
                del kept[name]
            else:
                (directory / name).unlink()
        except OSError:
            kept.pop(name, None)


def _fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

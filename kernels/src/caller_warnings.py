"""Warnings attributed to the user's line of code.

``warn_at_caller`` issues a warning at the first frame of the stack outside fastlora (its kernels
included) and the libraries that call into fastlora's layers and hooks (torch, transformers, peft,
accelerate, and Hugging Face's ``kernels``, whose layer wrappers transformers puts around a model's
forward): the line of the user's script that led to it (the training step that ran a layer, the
``inject``, ``load`` or ``trainer.train()`` call), wherever inside those libraries it arose and however
deep. Python's default warning filter then shows each warning once per such line.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

#: the packages whose frames a warning never points at (those imported at the time of the warning)
LIBRARY_PACKAGES = ("fastlora", "torch", "transformers", "peft", "accelerate", "kernels")


def _directory(path: str) -> str:
    return str(Path(path).resolve().parent) + os.sep


def library_directories() -> tuple[str, ...]:
    """Source directories of this package and of the imported ``LIBRARY_PACKAGES``."""
    return _directories_of(tuple(sys.modules.get(name) for name in LIBRARY_PACKAGES))


@functools.lru_cache(maxsize=8)
def _directories_of(modules: tuple) -> tuple[str, ...]:
    """Memoized by the imported modules (a warning on a per-call path asks call after call)."""
    return (_directory(__file__), *(_directory(m.__file__) for m in modules if getattr(m, "__file__", None)))


@functools.lru_cache(maxsize=4096)
def _inside(filename: str, directories: tuple[str, ...]) -> bool:
    """Whether the source file ``filename`` lies in one of ``directories`` (memoized: a warning on a
    per-call path walks the same frames call after call)."""
    return str(Path(filename).resolve()).startswith(directories)


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside the library packages."""
    directories = library_directories()
    frame, stacklevel = sys._getframe(1), 2
    while frame is not None and _inside(frame.f_code.co_filename, directories):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)

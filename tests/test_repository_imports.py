"""The repository root on sys.path (``python -m ...``, ``python -c`` from a checkout, ``python -m pytest``)
must not shadow another distribution: transformers imports Hugging Face's ``kernels`` package, and the
compute layer's sources live in the top-level ``kernels/`` folder (``kernels/src`` is what installs as
``fastlora.kernels``; ``kernels/`` itself has no ``__init__.py``, so it is at most a namespace portion,
which loses to the regular package installed in site-packages)."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "src" / "__init__.py").exists()


def test_transformers_peft_and_fastlora_import_together_from_the_repository_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels distribution is not installed (transformers older than 5)")
    code = ("import transformers.activations, peft, fastlora, kernels\n"
            "from fastlora.kernels import adapted_linear\n"
            "import fastlora.kernels.triton\n"
            "print(kernels.__file__)\n"
            "print(fastlora.kernels.__file__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hub_kernels, ours = done.stdout.split()
    assert not Path(hub_kernels).resolve().is_relative_to(ROOT / "kernels"), f"`kernels` is ours: {hub_kernels}"
    assert Path(ours).resolve() == ROOT / "kernels" / "src" / "__init__.py"

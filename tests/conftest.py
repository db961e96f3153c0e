"""Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors.

Set before any test module imports triton (the interpreter flag is read at import time
by some Triton versions), so the whole suite sees one consistent mode.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# backend="auto" records measured plans under the user's cache directory: keep tests out of it
if "FASTLORA_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FASTLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastlora-test-cache-")


@pytest.fixture(scope="module")
def one_thread():
    """Small matmuls run fastest on one thread (and leave the other cores alone): for a module's training
    runs, ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

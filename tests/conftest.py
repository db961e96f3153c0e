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


@pytest.fixture(scope="module")
def triton_impl():
    """The Triton backend module (``fastlora.kernels.triton.impl``); skips the module's tests where its kernels
    cannot run: without a GPU they must have been built for the interpreter (TRITON_INTERPRET=1 at import)."""
    from fastlora.kernels.eligibility import triton_backend, triton_interpreter_on

    impl = triton_backend()
    if impl is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available() and not triton_interpreter_on():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run here")
    if not torch.cuda.is_available() and not impl.INTERPRETER_READY:
        pytest.skip("triton (or fastlora's kernels) was imported before TRITON_INTERPRET=1 was set, so the "
                    "kernels were built for a GPU; run pytest with TRITON_INTERPRET=1 in the environment")
    return impl

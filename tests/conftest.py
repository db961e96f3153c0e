"""Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors.

Set before any test module imports triton (the interpreter flag is read at import time
by some Triton versions), so the whole suite sees one consistent mode.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# backend="auto" records measured plans under the user's cache directory: keep tests out of it
if "FASTLORA_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FASTLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastlora-test-cache-")

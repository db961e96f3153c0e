"""The fast path reads no tensor value on the host per call (on a GPU each read is a sync).

For every method and backend, once an adapted layer has run (an adapter may read its state
once, e.g. Selective LoRA's gate or CURLoRA's index ranges), further training forwards +
backwards and eval forwards read nothing, until the adapter's tensors change. Without a GPU
the Triton backend runs under the interpreter (tests/conftest.py).
"""
import dataclasses

import pytest
import torch

from fastlora import AdapterLinear

from distributed_worker import METHODS
from host_reads import HostReads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cublas"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_repeated_calls_read_nothing_on_the_host(method, backend, dropout):
    if backend != "torch":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    config = dataclasses.replace(METHODS[method][0], backend=backend, dropout=dropout)
    layer = AdapterLinear(23, 17, config=config, device=DEVICE)
    x = torch.randn(3, 5, 23, device=DEVICE, requires_grad=True)
    layer(x).sum().backward()
    with HostReads() as training:
        layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(x)
        with HostReads() as inference:
            layer(x)
    assert training.count == 0 and inference.count == 0
    assert training.copies == 0 and inference.copies == 0, "a tensor made from host data (a copy to the device)"


def test_a_tensor_gate_without_its_host_value_is_read_once():
    """Eager mode: the gate is read once (validated and used), not once per check."""
    from fastlora.kernels import adapted_linear
    weight, a, b = torch.randn(7, 9), torch.randn(3, 9), torch.randn(7, 3)
    x = torch.randn(4, 9)
    with HostReads() as reads:
        adapted_linear(x, weight, None, a, b, gate=torch.tensor(0.7), backend="torch")
    assert reads.count == 1

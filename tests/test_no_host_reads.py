"""The fast path reads no tensor value on the host per call (on a GPU each read is a sync).

For every method, once an adapted layer has run (an adapter may read its state once, e.g.
Selective LoRA's gate or CURLoRA's index ranges), further training forwards + backwards and
eval forwards read nothing, until the adapter's tensors change.
"""
import pytest
import torch

from distributed_worker import METHODS
from fastlora import AdapterLinear
from host_reads import HostReads


@pytest.mark.parametrize("method", sorted(METHODS))
def test_repeated_calls_read_nothing_on_the_host(method):
    torch.manual_seed(0)
    layer = AdapterLinear(23, 17, config=METHODS[method][0])
    x = torch.randn(3, 5, 23, requires_grad=True)
    layer(x).sum().backward()
    with HostReads() as training:
        layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(x)
        with HostReads() as inference:
            layer(x)
    assert training.count == 0 and inference.count == 0

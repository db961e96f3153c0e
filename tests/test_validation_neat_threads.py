"""NEAT's eval cache is safe when threads with different grad and autocast states share one layer."""
import sys
import threading

import pytest
import torch
from torch import nn

from fastlora import AdapterLinear, NeatConfig
from fastlora.methods.neat import NeatAdapter


def _layer():
    torch.manual_seed(0)
    layer = AdapterLinear(48, 40, config=NeatConfig(r=6, depth=1, activation="gelu", backend="torch"))
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer.eval()


def _plain(layer, x):
    with torch.no_grad():
        return layer(x)


def _autocast(layer, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)


def _grad(layer, x):
    return layer(x).detach()  # grad enabled: recomputed, and the cache is dropped


def _expected(layer, x, modes):
    expected = {mode: mode(layer, x).float() for mode in modes}
    assert (expected[_autocast] - expected[_plain]).abs().max() > 1e-3  # a mix-up between them would show
    return expected


def _close(out, ref):
    return torch.allclose(out.float(), ref, rtol=1e-5, atol=1e-6)


def test_thread_preempted_after_storing_the_cache_gets_its_own_value(monkeypatch):
    """Thread A stores its projection and is preempted there; thread B (autocast) stores its own
    and returns. A must still return its own value, and the cache must not pair B's value with A's key."""
    layer = _layer()
    x = torch.randn(16, 48)
    expected = _expected(layer, x, [_plain, _autocast])
    layer.adapter.clear_cache()
    a_stored, b_done = threading.Event(), threading.Event()
    setattr_ = nn.Module.__setattr__

    def preempting_setattr(module, name, value):
        setattr_(module, name, value)
        if threading.current_thread().name == "A" and not a_stored.is_set():
            a_stored.set()
            assert b_done.wait(timeout=30)

    monkeypatch.setattr(NeatAdapter, "__setattr__", preempting_setattr)
    results = {}

    def run(mode):
        try:
            results[threading.current_thread().name] = mode(layer, x)
        except Exception as error:
            results[threading.current_thread().name] = error

    thread_a = threading.Thread(target=run, args=(_plain,), name="A")
    thread_a.start()
    assert a_stored.wait(timeout=30)
    run(_autocast)  # this thread is B
    b_done.set()
    thread_a.join()
    assert _close(results["MainThread"], expected[_autocast])
    assert isinstance(results["A"], torch.Tensor) and _close(results["A"], expected[_plain])
    assert _close(_plain(layer, x), expected[_plain]) and _close(_autocast(layer, x), expected[_autocast])


@pytest.fixture
def fast_switching():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_threads_hammering_a_shared_layer_each_get_their_own_result(fast_switching):
    layer = _layer()
    x = torch.randn(16, 48)
    modes = [_plain, _autocast, _grad, _plain, _autocast]
    expected = _expected(layer, x, modes)
    errors = []
    start = threading.Barrier(len(modes))

    def work(mode):
        start.wait()
        try:
            for _ in range(100):
                out = mode(layer, x)
                if not _close(out, expected[mode]):
                    errors.append((mode.__name__, float((out.float() - expected[mode]).abs().max())))
        except Exception as error:
            errors.append((mode.__name__, repr(error)))

    threads = [threading.Thread(target=work, args=(mode,)) for mode in modes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

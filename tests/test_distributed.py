"""Data-parallel training gives the adapter gradients of one process on the whole batch.

torchrun starts 2 CPU ranks (gloo) running tests/distributed_worker.py: each trains on its
half of a fixed batch under DDP (find_unused_parameters=False) and under FSDP2
(fully_shard), three SGD steps with the training hooks. Every registered method is checked
against the single-process run in float64: the gradients of every step and the parameters
after them (so post-step rules, gated-off blocks and pruned ranks run under the wrapper).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

import distributed_worker as worker
from utils import rel

WORLD_SIZE = 2
TOLERANCE = 1e-10  # float64; the sharded mean only reorders the reductions


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Per rank: {(wrapper, method): result} from one torchrun launch."""
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               os.path.join(os.path.dirname(__file__), "distributed_worker.py"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(WORLD_SIZE)]


def _assert_close(result: dict, reference: dict, where: str) -> None:
    for step, (grads, ref_grads) in enumerate(zip(result["grads"], reference["grads"])):
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            err = rel(grads[name], ref, zero_ref_ok=True)
            assert err < TOLERANCE, f"{where}: step {step + 1} grad of {name}: rel err {err:.2e}"
    for name, ref in reference["params"].items():
        err = rel(result["params"][name], ref, zero_ref_ok=True)
        assert err < TOLERANCE, f"{where}: {name} after {worker.STEPS} steps: rel err {err:.2e}"


def _cases():
    for method in worker.METHODS:
        yield pytest.param(method, "ddp", id=f"{method}-ddp")
        yield pytest.param(method, "fsdp2", id=f"{method}-fsdp2")


@pytest.mark.parametrize("method, wrapper", list(_cases()))
def test_data_parallel_matches_single_process(rank_results, wrapper, method):
    if method not in worker.registered_methods():
        pytest.skip(f"{method}: no adapter registered in fastlora.methods.ADAPTER_TYPES")
    reference = worker.run_single(method)
    for rank, results in enumerate(rank_results):
        result = results[wrapper, method]
        if "unavailable" in result:
            pytest.skip(f"FSDP2 cannot run: {result['unavailable']}")
        assert "error" not in result, f"{wrapper}/{method} failed on rank {rank}:\n{result['error']}"
        _assert_close(result, reference, f"{wrapper}/{method} rank {rank}")


@pytest.mark.parametrize("method", list(worker.METHODS))
def test_an_adapter_saved_and_loaded_under_fsdp2_is_the_one_process_trained(rank_results, method):
    """save_adapter on every rank gathers the shards (rank 0 writes), load_adapter gives each rank its part:
    the fresh sharded model then holds what one process trained (LoRASC: W with its stages replayed)."""
    if method not in worker.registered_methods():
        pytest.skip(f"{method}: no adapter registered in fastlora.methods.ADAPTER_TYPES")
    reference = worker.build_model(method)
    worker.train(reference, reference, *worker.full_batch())
    for rank, results in enumerate(rank_results):
        result = results.get(("fsdp2_saved_and_loaded", method))
        if result is None:
            pytest.skip("FSDP2 cannot run here")
        assert "error" not in result, f"{method} failed on rank {rank}:\n{result['error']}"
        want = reference.state_dict()
        assert result["state"].keys() == want.keys()
        for name, value in want.items():
            if value.is_floating_point():
                err = rel(result["state"][name], value, zero_ref_ok=True)
                assert err < TOLERANCE, f"{method} rank {rank}: {name} after the load: rel err {err:.2e}"
            else:
                assert torch.equal(result["state"][name], value), f"{method} rank {rank}: {name}"


def test_lorasc_under_fsdp2_without_hooks_refuses_to_lose_its_noise(rank_results):
    """Without the hooks a stage's noise would go into FSDP2's gathered copy of W (discarded after the
    forward): the forward refuses, naming the hooks; start_training() outside the forward puts the same
    noise into the shards as one process puts into W."""
    if "cascade_lora" not in worker.registered_methods():
        pytest.skip("cascade_lora: no adapter registered")
    reference = worker.build_model("cascade_lora")
    pretrained = [layer.weight.detach().clone() for layer in (reference[0], reference[2])]
    for layer in (reference[0], reference[2]):
        layer.adapter.start_training()
    for rank, results in enumerate(rank_results):
        result = results.get(("fsdp2_without_hooks", "cascade_lora"))
        if result is None:
            pytest.skip("FSDP2 cannot run here")
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
        assert result["refusal"] is not None and "attach_training_hooks" in result["refusal"], result["refusal"]
        for layer, weight, before in zip((reference[0], reference[2]), result["weights"], pretrained):
            assert rel(weight, layer.weight.detach()) < TOLERANCE, f"rank {rank}: W differs from one process's"
            assert rel(weight, before) > 1e-3, f"rank {rank}: no noise reached W"


def test_reference_gates_off_and_prunes_after_step_one():
    """The configs really exercise the switched-off paths the data-parallel test relies on."""
    for method, check in (("selective_lora", lambda a: not a.active),
                          ("rank_selective_lora", lambda a: a.active_index.numel() == 0)):
        if method not in worker.registered_methods():
            continue
        model = worker.build_model(method)
        result = worker.train(model, model, *worker.full_batch())
        assert check(model[2].adapter), f"{method}: layer 2 is still on after the steps"
        for step, grads in enumerate(result["grads"][1:], start=2):
            for name in ("2.adapter.lora_A", "2.adapter.lora_B"):
                assert torch.count_nonzero(grads[name]) == 0, f"{method}: step {step} {name} grad nonzero while off"

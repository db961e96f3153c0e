"""Worker of tests/test_distributed.py (not collected: no test_ prefix).

Each method trains a small seeded float64 model with two adapted layers for STEPS = 3 SGD
steps (training hooks attached, regulariser in the loss; under DDP a forward after a backward
that left a parameter out of the graph fails). Under torchrun (gloo, CPU) every rank
trains on its half of one fixed batch inside DDP (find_unused_parameters=False) or FSDP2
(``fully_shard`` on each adapted layer, then the root); the test imports this module for
the single-process run on the full batch. A rank writes, per wrapper and method,

    {"grads": [{name: grad} per step], "params": {name: value after the steps}}

or {"error": traceback} to ``<out>/rank<k>.pt``, under ("fsdp2_saved_and_loaded", method) what
``saved_and_loaded`` returns, and under ("fsdp2_without_hooks", "cascade_lora") what ``cascade_without_hooks``
returns. Adapters are built before wrapping.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import (
    AdapterLinear,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.methods import ADAPTER_TYPES

D_IN, D_HIDDEN, D_OUT, BATCH, SEQ = 37, 29, 11, 6, 5
LEARNING_RATE = 0.1
STEPS = 3

# One config per adapted layer. The second layer is driven off during step 1 where a method
# can switch parts off, so steps 2 and 3 run with gated-off or pruned adapters (zero grads, not None).
METHODS = {
    "lora": (LoraConfig(r=4, alpha=6.0), LoraConfig(r=3, alpha=2.0)),
    # score 0.15 >= threshold 0.1; the penalty's step lr * 50 = 5 pushes it far below
    "selective_lora": (SelectiveLoraConfig(r=4, alpha=6.0),
                       SelectiveLoraConfig(r=4, alpha=6.0, score_init=0.15, sparsity_weight=50.0)),
    # no dense phase, one threshold level: kappa = kappa_max from step 1; 100 prunes every rank of layer 2
    "rank_selective_lora": (RankSelectiveLoraConfig(r=4, alpha=6.0, total_steps=STEPS, dense_fraction=0.0,
                                                    threshold_levels=1, kappa_max=0.05),
                            RankSelectiveLoraConfig(r=4, alpha=6.0, total_steps=STEPS, dense_fraction=0.0,
                                                    threshold_levels=1, kappa_max=100.0)),
    "curlora": (CurLoraConfig(r=4, alpha=1.5, seed=3), CurLoraConfig(r=3, alpha=0.5, seed=3)),
    "neat": (NeatConfig(r=4, depth=1, scale=0.7), NeatConfig(r=3, activation="gelu", scale=1.3)),
    # a cascade step (fold + noisy fresh pair) after every step
    "cascade_lora": (CascadeLoraConfig(r=4, cascade_interval=1, noise_intensity=0.05),
                     CascadeLoraConfig(r=3, cascade_interval=1, slow_momentum=0.5)),
}


def registered_methods() -> list[str]:
    """The METHODS whose config type has an adapter in ADAPTER_TYPES."""
    return [name for name, configs in METHODS.items() if type(configs[0]) in ADAPTER_TYPES]


def build_model(method: str, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Seeded Linear(37, 29) -> tanh -> Linear(29, 11) with adapters on both Linears;
    zero-initialised adapter tensors are filled with noise so every factor matters."""
    torch.manual_seed(0)
    first, second = METHODS[method]
    model = nn.Sequential(nn.Linear(D_IN, D_HIDDEN, dtype=dtype), nn.Tanh(),
                          nn.Linear(D_HIDDEN, D_OUT, dtype=dtype))
    model[0] = AdapterLinear.from_linear(model[0], first, layer_index=0)
    model[2] = AdapterLinear.from_linear(model[2], second, layer_index=1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and not param.any():
                param.normal_(0.0, 0.5)
    return model


def full_batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed inputs (6, 5, 37) and targets (6, 5, 11), drawn from their own generator."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, SEQ, D_IN, generator=generator, dtype=dtype)
    target = torch.randn(BATCH, SEQ, D_OUT, generator=generator, dtype=dtype)
    return x, target


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2's DTensor shards gathered (a collective: every rank calls it)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.clone()).detach()


def train(model: nn.Module, wrapped: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    """STEPS SGD steps of mse(wrapped(x), target) + regularization_loss(model); ``model`` is the
    unwrapped module (names, hooks), ``wrapped`` the one called. Returns grads and params."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in trainable], lr=LEARNING_RATE)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    grads = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(wrapped(x), target) + fastlora.regularization_loss(model)
        loss.backward()
        missing = [n for n, p in trainable if p.grad is None]
        if missing:
            raise RuntimeError(f"no gradient (None) for {missing}")
        grads.append({n: _full(p.grad) for n, p in trainable})
        optimizer.step()
    hooks.remove()
    return {"grads": grads, "params": {n: _full(p) for n, p in trainable}}


def run_single(method: str) -> dict:
    """The reference: one process, the full batch, no wrapper."""
    model = build_model(method)
    return train(model, model, *full_batch())


def _wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    from torch.distributed.fsdp import fully_shard
    for module in model:
        if isinstance(module, AdapterLinear):
            fully_shard(module)
    return fully_shard(model)


def fsdp2_unavailable() -> str | None:
    """Why FSDP2 cannot run here, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard ({error})"
    return None


def run_rank(method: str, wrapper: str) -> dict:
    """This rank's run: its half of the batch, the model wrapped after the adapters are built."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, target = full_batch()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model = build_model(method)
    return train(model, _wrap(model, wrapper), x[shard], target[shard])


def saved_and_loaded(method: str, out: str) -> dict:
    """Under FSDP2: this rank's run, ``save_adapter`` on every rank, then ``load_adapter`` on every rank into a
    fresh sharded model; that model's whole state dict (W, bias, adapter tensors) after the load."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, target = full_batch()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    model = build_model(method)
    wrapped = _wrap(model, "fsdp2")
    train(model, wrapped, x[shard], target[shard])
    path = os.path.join(out, f"fsdp2_{method}")
    fastlora.save_adapter(wrapped, path)
    fresh = build_model(method)
    fastlora.load_adapter(_wrap(fresh, "fsdp2"), path)
    return {"state": {name: _full(tensor) for name, tensor in fresh.state_dict().items()}}


def cascade_without_hooks() -> dict:
    """LoRASC under FSDP2 without the training hooks: {"refusal": the error of a training forward with the
    stage's noise pending (None: it ran), "weights": both layers' whole W after ``start_training()`` called
    outside the forward of a fresh model (each rank adds its shard of the noise), which then trains}."""
    x, _ = full_batch()
    model = build_model("cascade_lora")
    wrapped = _wrap(model, "fsdp2")
    try:
        wrapped(x)
        refusal = None
    except RuntimeError as error:
        refusal = str(error)
    model = build_model("cascade_lora")  # FSDP2 is left mid-forward by the refusal: a fresh one
    wrapped = _wrap(model, "fsdp2")
    for layer in (model[0], model[2]):
        layer.adapter.start_training()
    weights = [_full(layer.weight) for layer in (model[0], model[2])]
    wrapped(x).sum().backward()
    return {"refusal": refusal, "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    results: dict = {}
    wrappers = {"ddp": None, "fsdp2": fsdp2_unavailable()}
    for wrapper, unavailable in wrappers.items():
        for method in registered_methods():
            if unavailable:
                results[wrapper, method] = {"unavailable": unavailable}
                continue
            try:
                results[wrapper, method] = run_rank(method, wrapper)
            except Exception:  # reported per case by the test
                results[wrapper, method] = {"error": traceback.format_exc()}
    if wrappers["fsdp2"] is None:
        for method in registered_methods():
            try:
                results["fsdp2_saved_and_loaded", method] = saved_and_loaded(method, args.out)
            except Exception:  # reported per case by the test
                results["fsdp2_saved_and_loaded", method] = {"error": traceback.format_exc()}
        try:
            results["fsdp2_without_hooks", "cascade_lora"] = cascade_without_hooks()
        except Exception:  # reported by the test
            results["fsdp2_without_hooks", "cascade_lora"] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

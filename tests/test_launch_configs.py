"""GEMM tile list and its pruning (no GPU needed: the device's shared memory is injected)."""
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")
from fastlora.kernels.triton import launch_config  # noqa: E402


def fake_cuda_input(element_size=2):
    return SimpleNamespace(element_size=lambda: element_size, is_cuda=True, device=SimpleNamespace(index=0))


@pytest.fixture
def gpu_configs(monkeypatch):
    monkeypatch.setattr(launch_config, "INTERPRETED", False)
    return launch_config.gemm_configs()


def test_hopper_tiles_fit_hopper_and_are_dropped_on_smaller_devices(monkeypatch, gpu_configs):
    deep = [c for c in gpu_configs if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs[
        "BLOCK_K"] * 2 > 160 * 1024]
    assert deep, "the list has Hopper-sized pipelines"
    monkeypatch.setattr(launch_config, "shared_memory_limit", lambda index: 227 * 1024)  # H100 / H200
    hopper = launch_config.prune_gemm_configs(gpu_configs, {"x_ptr": fake_cuda_input(), "M_BUCKET": 8192})
    assert all(c in hopper for c in deep)
    monkeypatch.setattr(launch_config, "shared_memory_limit", lambda index: 99 * 1024)  # e.g. an sm_86 part
    small = launch_config.prune_gemm_configs(gpu_configs, {"x_ptr": fake_cuda_input(), "M_BUCKET": 8192})
    assert small and not any(c in small for c in deep)
    for c in small:
        assert c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * 2 <= 99 * 1024


def test_tall_tiles_are_dropped_for_few_tokens(monkeypatch, gpu_configs):
    monkeypatch.setattr(launch_config, "shared_memory_limit", lambda index: None)
    kept = launch_config.prune_gemm_configs(gpu_configs, {"x_ptr": fake_cuda_input(), "M_BUCKET": 16})
    assert kept and max(c.kwargs["BLOCK_M"] for c in kept) <= 32
    # nothing fits: the smallest tile is kept rather than none
    monkeypatch.setattr(launch_config, "shared_memory_limit", lambda index: 1)
    assert len(launch_config.prune_gemm_configs(gpu_configs, {"x_ptr": fake_cuda_input(), "M_BUCKET": 8192})) == 1


def test_every_plan_implements_the_plan_protocol():
    import inspect

    from fastlora.kernels.dispatch import PLANS, plan_implementation
    from fastlora.kernels.spec import Plan

    for name in PLANS:
        impl = plan_implementation(name)
        for method in ("forward", "backward", "neat_forward", "neat_backward"):
            want = [p for p in inspect.signature(getattr(Plan, method)).parameters if p != "self"]
            assert list(inspect.signature(getattr(impl, method)).parameters) == want, (name, method)


def test_launch_metadata_counts_flops_and_bytes():
    import torch

    from fastlora.kernels.triton import metadata

    bf16 = torch.empty(1, dtype=torch.bfloat16)
    meta = metadata.fused_linear(None, None, dict(M=8192, N=4096, K=4096, R=16, HAS_LOWRANK=True,
                                                  out_ptr=bf16))
    assert meta["flops16"] == 2 * 8192 * 4096 * (4096 + 16)
    assert meta["bytes"] == 2 * (8192 * 4096 * 2 + 4096 * 4096) + 4 * 8192 * 16 + 2 * 16 * 4096
    assert "M=8192 N=4096 K=4096 r=16" in meta["name"]


def test_dropout_gemm_tiles_keep_two_accumulators_within_the_register_budget(monkeypatch, gpu_configs):
    """With dropout the low-rank tile is a second fp32 accumulator: tiles that would hold two 128-register
    tiles per thread (they spill, compiled for sm_90) are dropped; without dropout every tile is kept."""
    monkeypatch.setattr(launch_config, "shared_memory_limit", lambda index: None)
    named = {"x_ptr": fake_cuda_input(), "M_BUCKET": 8192}

    def per_thread(c, tiles):
        return tiles * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)

    plain = launch_config.prune_gemm_configs(gpu_configs, named, HAS_LOWRANK=True, DROPOUT=False)
    assert plain == gpu_configs
    masked = launch_config.prune_gemm_configs(gpu_configs, named, HAS_LOWRANK=True, DROPOUT=True)
    assert masked == [c for c in gpu_configs if per_thread(c, 2) <= launch_config.ACCUMULATOR_REGISTERS]
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 256 for c in plain)
    assert not any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 256 for c in masked)
    assert any(c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 128 and c.num_warps == 8 for c in masked)
    # dropout without a low-rank term (the base GEMM alone) has one accumulator
    assert launch_config.prune_gemm_configs(gpu_configs, named, HAS_LOWRANK=False, DROPOUT=True) == gpu_configs


@pytest.mark.parametrize("gpus", [1, 2])
def test_launches_switch_device_only_with_several_gpus(gpus, monkeypatch):
    """Triton launches on the current CUDA device: with one visible GPU that is the input's device and no
    switch is entered (host time per launch); with several, the input's device is made current."""
    monkeypatch.setattr(launch_config.torch.cuda, "device_count", lambda: gpus)
    launch_config._one_visible_gpu.cache_clear()
    try:
        context = launch_config.launch_context(launch_config.torch.device("cuda", gpus - 1))
        if gpus == 1:
            assert context is launch_config._NO_SWITCH
        else:
            assert isinstance(context, launch_config.torch.cuda.device) and context.idx == 1
    finally:
        launch_config._one_visible_gpu.cache_clear()


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_fp32_skinny_tiles_without_tf32_reduce_over_32_columns(monkeypatch, tf32):
    """fp32 operands with TF32 off (torch's default) take IEEE dots, FMAs whose operand tiles sit in registers:
    the skinny kernels reduce over 32 columns (128 and 64 spilled, compiled for sm_90); with TF32 on, fp32
    takes the tiles of the tensor-core dots, as bf16 does at every setting."""
    import torch

    monkeypatch.setattr(launch_config, "INTERPRETED", False)
    previous = torch.backends.cuda.matmul.allow_tf32  # torch's switch (monkeypatch cannot read it back)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for r_pad in (16, 32, 64, 128):
            for dropout in (False, True):
                bf16 = launch_config.skinny_blocks(r_pad, launch_config.dot_precision(torch.bfloat16), dropout)
                fp32 = launch_config.skinny_blocks(r_pad, launch_config.dot_precision(torch.float32), dropout)
                assert bf16["BLOCK_M"] == 64 and bf16["BLOCK_K"] == (128 if r_pad <= 32 and not dropout else 64)
                assert fp32 == (bf16 if tf32 else {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

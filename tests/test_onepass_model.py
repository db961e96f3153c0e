"""The byte and FLOP model of the plans (benchmarks/byte_model.py) and the one-pass kernels' launch metadata."""
import pytest
import torch

from benchmarks import byte_model

SHAPE = byte_model.Shape(8192, 4096, 4096, 16)


def test_base_gemm_is_compute_bound_at_the_documented_numbers():
    base = byte_model.floors(SHAPE)["base"]
    assert base["fwd_mb"] == pytest.approx(2 * (2 * 8192 * 4096 + 4096 * 4096) / 1e6)  # x, y and W: ~168 MB
    assert base["fwd_gflop"] == pytest.approx(2 * 8192 * 4096 * 4096 / 1e9)
    assert base["fwd_us"] == pytest.approx(base["fwd_gflop"] * 1e9 / byte_model.PEAK_FLOPS * 1e6)
    assert base["step_us"] == pytest.approx(2 * base["fwd_us"])


def test_onepass_reads_x_and_dy_once_in_the_gemms():
    rows = byte_model.floors(SHAPE)
    x_bytes = 8192 * 4096 * 2 / 1e6
    # forward: only the factors and t on top of the base GEMM
    assert rows["onepass"]["fwd_mb"] - rows["base"]["fwd_mb"] < 0.01 * rows["base"]["fwd_mb"]
    # the two-pass plans read x again for the shrink; fwd + bwd they read x for dA (as onepass does) and dy again
    assert rows["triton"]["fwd_mb"] - rows["onepass"]["fwd_mb"] == pytest.approx(x_bytes, rel=0.02)
    assert rows["triton"]["step_mb"] - rows["onepass"]["step_mb"] > 2 * x_bytes


def test_redundant_side_products_cost_mma_in_proportion_to_the_padded_rank():
    for r, extra in ((16, 16 / 256), (64, 64 / 256)):
        rows = byte_model.floors(byte_model.Shape(8192, 4096, 4096, r))
        ratio = rows["onepass"]["fwd_gflop"] / rows["base"]["fwd_gflop"]
        assert ratio == pytest.approx(1 + extra + r / 4096, rel=1e-3)
        assert rows["onepass-persistent"]["fwd_us"] < rows["onepass"]["fwd_us"]


def test_table_lists_every_plan_for_every_shape():
    text = byte_model.table([SHAPE])
    assert text.count("\n") == 1 + 2 + len(byte_model.PLANS)
    for plan in byte_model.PLANS:
        assert f"| {plan} |" in text


def test_launch_metadata_of_the_one_pass_kernels():
    metadata = pytest.importorskip("fastlora.kernels.triton.metadata")
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    m, n, k, r = 8192, 4096, 4096, 16
    fwd = metadata.onepass_forward(None, None, dict(M=m, N=n, K=k, R=r, out_ptr=bf16))
    assert fwd["flops16"] == 2 * m * n * (k + r) + 2 * m * k * r
    assert fwd["bytes"] == 2 * (m * k + k * n + m * n + r * (k + n)) + 4 * m * r
    bwd = metadata.onepass_input_grad(None, None, dict(M=m, N=n, K=k, R=r, out_ptr=bf16, BLOCK_M=128,
                                                       COMPUTE_DB=True, COMPUTE_DBIAS=False))
    assert bwd["flops16"] == 2 * m * n * (k + r) + 4 * m * k * r
    assert bwd["bytes"] == 2 * (m * k + k * n + m * n + r * (k + n)) + 8 * m * r + 4 * (m // 128) * k * r
    assert "M=8192 N=4096 K=4096 r=16" in bwd["name"]

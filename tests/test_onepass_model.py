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


def test_side_products_cost_mma_in_proportion_to_the_padded_rank_and_the_programs_per_row_block():
    """The forward forms x A^T and the input gradient dy B once per program: 4 programs per row block at
    N = 8192, 4096 outputs, 128x256 tiles (runs of COLUMN_RUN = 4 of the 16 column tiles), not in every tile."""
    for r, pad in ((16, 16), (64, 64)):
        s = byte_model.Shape(8192, 4096, 4096, r)
        rows = byte_model.floors(s)
        assert byte_model.side_groups(64, 16) == 4
        assert rows["onepass"]["fwd_gflop"] / rows["base"]["fwd_gflop"] == pytest.approx(1 + r / 4096 + 4 * pad / 4096)
        backward = [k for k in byte_model.plan_kernels("onepass", s) if k.name.startswith("dy W")]
        assert len(backward) == 1
        db = 2 * 8192 * 4096 * r if r == 16 else 0  # dy^T v of the dB partials (r = 64: a GEMM of its own)
        assert backward[0].flops == pytest.approx(2 * 8192 * 4096 * (4096 + r) + 2 * 8192 * 4096 * pad * 4 + db)
    ratios = {r: byte_model.floors(byte_model.Shape(8192, 4096, 4096, r)) for r in (16, 64)}
    assert ratios[16]["onepass"]["step_us"] / ratios[16]["base"]["step_us"] == pytest.approx(1.047, abs=5e-4)
    assert ratios[64]["onepass"]["step_us"] / ratios[64]["base"]["step_us"] == pytest.approx(1.130, abs=5e-4)


def test_side_groups_are_the_kernels():
    """The model's programs per row block are those the one-pass kernels launch on a 132-SM GPU."""
    pytest.importorskip("triton")
    from types import SimpleNamespace
    from unittest import mock

    from fastlora.kernels.triton import onepass_tiles
    assert byte_model.COLUMN_RUN == onepass_tiles.COLUMN_RUN
    with mock.patch("torch.cuda.get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132)):
        for rows in (1, 2, 7, 33, 64, 200):
            for columns in (1, 3, 16, 43, 64):
                assert byte_model.side_groups(rows, columns, 132) == onepass_tiles.column_groups(
                    rows, columns, torch.device("cuda")), (rows, columns)


def test_table_lists_every_plan_for_every_shape():
    text = byte_model.table([SHAPE])
    assert text.count("\n") == 2 + len(byte_model.PLANS)
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

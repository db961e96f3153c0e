"""benchmarks/decisions.py on synthetic gpu_check reports: which settings a run supports, and why."""
import json

import pytest

pytest.importorskip("triton")

from benchmarks import decisions  # noqa: E402


def _crossover(rows, rule):
    return {"status": "ok", "size_rule": rule,
            "rows": [{"n": n, "d": d, "vs_peft": {"torch": torch_ratio, "cublas": 1.0}} for n, d, torch_ratio in rows]}


def _case(r, d_out, **ratios):
    names = ("shrink", "dy_pass", "down_grad", "shrink_dropout", "down_grad_dropout")
    return {"n": 8192, "d_in": 4096, "d_out": d_out, "r": r, "dy_read_twice": r > 32,
            "against_cublas": {name: {"triton": 1.0, "cublas": 1.0, "ratio": ratios.get(name, 1.0)} for name in names}}


def _report(crossover=None, cases=(), order=(), models=None):
    return {"sections": {"crossover": crossover or {"status": "skipped"}, "products": {"cases": list(cases)},
                         "order": {"shapes": list(order)}, "bench_model": {"models": models or {}}}}


def test_dy_is_read_twice_from_r_64_in_bf16_on_a_gpu(monkeypatch):
    """As the README says (and ``_case`` assumes): with the GPU's tiles, one pass over dy up to r = 32 in bf16,
    two from r = 64; the skinny section records it per case from the tiles it ran."""
    import torch

    from benchmarks.check_kernels import dy_read_twice
    from fastlora.kernels.triton import launch_config
    monkeypatch.setattr(launch_config, "INTERPRETED", False)
    assert [dy_read_twice(8192, d_out, r, torch.bfloat16) for r in (16, 32, 64) for d_out in (4096, 11008)] == \
        [False, False, False, False, True, True]


def test_size_rule_is_taken_when_the_torch_plan_keeps_up_with_peft_below_it():
    rule = 2048 * 1024 ** 2
    rows = [(512, 256, 0.97), (2048, 512, 1.02), (2048, 1024, 0.9), (8192, 4096, 1.3)]
    decision = decisions.size_rule(_report(_crossover(rows, rule)))
    assert decision["value"] == rule and "2 sizes" in decision["why"]
    slow = decisions.size_rule(_report(_crossover([(512, 256, 1.2), *rows[1:]], rule)))
    assert slow["value"] is None and "N=512 d=256 1.20x" in slow["why"]
    assert decisions.size_rule(_report(_crossover(rows, None)))["value"] is None
    assert decisions.size_rule(_report())["why"] == "section crossover did not run"


def test_dy_pass_by_gemms_only_where_dy_is_read_twice_and_the_kernels_are_slower_there():
    def dy_twice(*cases):
        return decisions.skinny_products(_report(cases=cases))[0]

    decided = dy_twice(_case(16, 4096, dy_pass=3.0), _case(64, 4096, dy_pass=1.2))
    assert decided["value"] == "cublas" and "r=16" not in decided["why"] and "r=64 dy_pass 1.20x" in decided["why"]
    assert dy_twice(_case(64, 4096, dy_pass=1.2), _case(64, 11008, dy_pass=1.03))["value"] == "triton"
    assert dy_twice(_case(16, 4096, dy_pass=3.0))["value"] == "triton"  # no case reads dy twice


def test_unmasked_products_by_gemms_only_where_both_kernels_are_slower_everywhere():
    def unmasked(*cases):
        return decisions.skinny_products(_report(cases=cases))[1]

    assert unmasked(_case(16, 4096, shrink=1.1, down_grad=1.3), _case(64, 4096, shrink=1.06, down_grad=1.1))[
        "value"] == "cublas"
    assert unmasked(_case(16, 4096, shrink=1.1, down_grad=1.3), _case(64, 4096, shrink=1.01, down_grad=1.1))[
        "value"] == "triton"
    assert unmasked()["value"] == "triton"


def test_cli_prints_every_decision_and_the_output_order(tmp_path, capsys):
    order = [{"n": 8192, "d_in": 4096, "d_out": 4096, "y": {"first_vs_after": 0.8, "expand_vs_addmm": 1.1},
              "dx": {"first_vs_after": 0.9, "expand_vs_addmm": 1.2}}]
    path = tmp_path / "gpu_check.json"
    models = {"bert": {"variants": {"peft_fp32": {"step_ms": 20.0, "host_ms": 12.0, "host_vs_step": 0.6},
                                    "accelerate_fp32": {"step_ms": 25.0, "host_ms": 24.5, "host_vs_step": 0.98}}}}
    path.write_text(json.dumps(_report(cases=[_case(64, 4096, dy_pass=1.5)], order=order, models=models)))
    result = decisions.main([str(path)])
    out = capsys.readouterr().out.splitlines()
    assert [d["setting"].rsplit(".", 1)[-1] for d in result["decisions"]] == ["SIZE_RULE", "DY_TWICE", "UNMASKED"]
    assert out[1].startswith("fastlora.kernels.triton.products.DY_TWICE = 'cublas': ")
    assert out[3] == "output order, N=8192 4096x4096 y: term first / after 0.80x, expand / addmm 1.10x"
    assert out[-2:] == ["host share, bert peft_fp32: host 12.0 ms of a 20.0 ms step (0.60)",
                        "host share, bert accelerate_fp32: host 24.5 ms of a 25.0 ms step (0.98); waits on the host"]


def test_adapter_work_is_what_a_variant_adds_to_the_frozen_step_against_its_floor():
    """PEFT's variants and the torch plan against PEFT's ops' floor, fastlora's others against the cublas
    plan's; a model without floors (a CPU run) or without the frozen step gives no line."""
    floors = {"peaks": "H100", "base": 6.0, "cublas": 8.0, "torch": 9.5}
    variants = {"base": {"step_ms": 30.0}, "peft_fp32": {"step_ms": 64.0}, "accelerate_fp32": {"step_ms": 36.0},
                "accelerate-torch_fp32": {"step_ms": 40.5}}
    models = {"llama": {"floors_ms": floors, "variants": variants},
              "bert": {"floors_ms": None, "variants": variants},
              "other": {"floors_ms": floors, "variants": {"peft_fp32": {"step_ms": 1.0}}}}
    assert decisions.adapter_work(_report(models=models)) == [
        "adapter work, llama peft_fp32: adds 34.00 ms to the frozen step, 9.7x its floor (3.50 ms, torch plan's "
        "kernels)",
        "adapter work, llama accelerate_fp32: adds 6.00 ms to the frozen step, 3.0x its floor (2.00 ms, cublas plan's "
        "kernels)",
        "adapter work, llama accelerate-torch_fp32: adds 10.50 ms to the frozen step, 3.0x its floor (3.50 ms, torch "
        "plan's kernels)"]

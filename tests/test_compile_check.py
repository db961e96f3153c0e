"""benchmarks/compile_check.py: the Triton kernels compiled for sm_90 without a GPU (Triton's own ptxas)."""
import time

import pytest
import torch

pytest.importorskip("triton")
from benchmarks import compile_check, offline_triton  # noqa: E402

NEAT_ITEM = (("neat",), (torch.float16,), ("triton",), ("relu",))


def test_neat_kernels_compile_for_sm90_with_their_resource_usage():
    results, skipped = compile_check.compile_all(90, NEAT_ITEM, jobs=1)
    assert skipped == [] and len(results) == 1
    (item,) = results
    assert (item["kind"], item["act"], item["dtype"], item["plan"]) == ("neat", "relu", "float16", "triton")
    assert item["error"] is None
    names = {k["kernel"] for k in item["compiled"]}
    assert names == {"_neat_forward_kernel", "_neat_backward_kernel"}
    for kernel in item["compiled"]:
        assert 16 <= kernel["registers"] <= 255 and kernel["stack_bytes"] >= 0 and kernel["seconds"] > 0
        assert kernel["constexprs"]["ACT"] == 1  # relu's code (neat_kernels.ACT_CODES)
    totals = compile_check.summary(results, 1.0, 1)
    assert totals["kernels_compiled"] == len(item["compiled"]) and totals["errors"] == 0
    assert totals["max_registers"] == max(k["registers"] for k in item["compiled"])


def test_batches_of_any_length_compile_each_default_kernel_once():
    """The cublas plan (auto's default) over batches of 64, 61, 1, 17 and 128 tokens: one compiled kernel each
    (the token count is not specialized on: a ragged last batch or dynamic padding recompiles nothing)."""
    from collections import Counter

    results, skipped = compile_check.compile_all(90, (("ragged",), (torch.float16,), ("cublas",)), jobs=1)
    assert skipped == [] and len(results) == 1 and results[0]["error"] is None, results
    names = Counter(k["kernel"] for k in results[0]["compiled"])
    assert set(names) == {"_shrink_kernel", "_dy_columns_kernel", "_down_grad_kernel", "_fused_linear_kernel"}
    assert set(names.values()) == {1}, names


def test_a_models_first_training_step_compiles_a_handful_of_default_kernels():
    """bench_model's Llama as accelerate(PEFT) with fp32 adapters under bf16 autocast, dropout 0.05, on the
    cublas plan: one step compiles the plan's four kernels, none autotuned, at most two specializations each
    (dP by the shrink or in the dy pass); the BERT model's step after it compiles nothing new."""
    from collections import Counter

    selection = (("model",), (torch.bfloat16,), ("cublas",), ("accelerate_fp32",))
    results, skipped = compile_check.compile_all(90, selection, jobs=1)
    assert skipped == [] and [r["case"] for r in results] == ["llama", "bert"], results
    assert all(r["error"] is None for r in results), [r["error"] for r in results]
    names = Counter(k["kernel"] for k in results[0]["compiled"])
    assert set(names) == {"_shrink_kernel", "_dy_columns_kernel", "_down_grad_kernel", "_fused_linear_kernel"}
    assert max(names.values()) <= 2 and results[1]["compiled"] == [], names


def test_items_compiled_by_two_processes_come_back_in_item_order():
    results, skipped = compile_check.compile_all(90, (("neat",), (torch.float16,), ("triton",)), jobs=2)
    assert skipped == [] and [(r["act"], r["index"]) for r in results] == [("relu", 0), ("gelu", 1)]
    assert all(r["error"] is None and r["compiled"] for r in results)


def test_a_passed_deadline_leaves_every_item_skipped():
    results, skipped = compile_check.compile_all(90, NEAT_ITEM, jobs=1, deadline=time.monotonic())
    assert results == [] and [s["act"] for s in skipped] == ["relu"]


def test_items_select_by_every_word():
    listed = [d for d, _ in compile_check.items(("op", "neat"), (torch.float16,), ("onepass", "triton"),
                                                ("dropout", "onepass"))]
    assert listed == [{"kind": "op", "case": "dropout", "dtype": "float16", "plan": "onepass"}]


def test_refuses_to_patch_an_interpreted_triton():
    from fastlora.kernels.triton import launch_config
    if not launch_config.INTERPRETED:
        pytest.skip("this process compiles kernels (TRITON_INTERPRET unset)")
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        offline_triton.install_offline_triton(90, [])


def test_gpu_check_section_reports_what_it_left_for_time():
    from types import SimpleNamespace
    ctx = SimpleNamespace(device=torch.device("cpu"), plans=("torch", "onepass"), deadline=time.monotonic())
    result = compile_check.section(ctx)
    assert result["totals"]["kernels_compiled"] == 0 and result["errors"] == [] and result["kernels"] == []
    assert result["skipped"] and {s["plan"] for s in result["skipped"]} == {"onepass"}
    assert {s["dtype"] for s in result["skipped"]} == {"bfloat16", "float16"}
    assert result["summary"].endswith(f"{len(result['skipped'])} items left for time")


def test_speed_items_cover_the_speed_sections_ranks_in_bf16_only():
    listed = [d for d, _ in compile_check.items(("speed",), (torch.bfloat16, torch.float16), ("triton",))]
    assert {d["dtype"] for d in listed} == {"bfloat16"}
    ops = {d["case"] for d in listed if "method" not in d}
    assert ops == {"plain r=64", "plain+dropout r=64", "plain r=32"}
    from benchmarks.bench_methods import METHODS
    assert {d["method"] for d in listed if "method" in d} == set(METHODS)


def test_a_kernel_compiled_by_one_process_and_loaded_by_another_counts_once():
    compiled = {"kernel": "_k", "hash": "h1", "seconds": 4.0, "registers": 200, "stack_bytes": 0}
    loaded = {**compiled, "seconds": 0.01}
    other = {**compiled, "hash": "h2", "seconds": 1.0, "stack_bytes": 8}
    results = [{"compiled": [loaded], "error": None}, {"compiled": [compiled, other], "error": None}]
    assert compile_check.unique_kernels(results) == [compiled, other]
    totals = compile_check.summary(results, 3.0, 2)
    assert totals["kernels_compiled"] == 2 and totals["compile_seconds"] == 5.0
    assert totals["kernels_with_stack"] == 1 and totals["max_stack_bytes"] == 8


def test_the_report_is_json_with_one_line_per_kernel():
    import json
    kernel = {"kernel": "_k", "hash": "h1", "seconds": 4.0, "registers": 200, "stack_bytes": 0}
    results = [{"kind": "op", "case": "plain", "dtype": "float16", "plan": "triton", "seconds": 5.0,
                "compiled": [kernel], "error": None}]
    written = {"arch": 90, **compile_check.report(results, 5.0, 1)}
    text = compile_check.report_json(written)
    assert json.loads(text) == written
    assert written["kernels"] == [{**kernel, "item": "op plain float16 triton"}]
    assert written["items"][0]["kernels"] == 1 and written["errors"] == []
    assert sum(line.lstrip().startswith('{"kernel"') for line in text.splitlines()) == 1


def test_table_separates_the_odd_shapes_spills():
    def kernel(item, seconds, registers, stack):
        return {"kernel": "_k", "item": item, "seconds": seconds, "registers": registers, "stack_bytes": stack}

    kernels = [kernel("op plain bfloat16 triton", 2.0, 200, 0), kernel("op plain bfloat16 triton", 1.0, 255, 64),
               kernel("op odd bfloat16 triton", 3.0, 255, 900)]
    row = compile_check.table(kernels).splitlines()[-1]
    assert row == "| _k | 3 | 6 | 255 | 1 | 64 | 1 | 900 |"

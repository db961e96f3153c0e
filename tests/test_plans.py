"""backend="auto": plan choice by measurement, its memory and JSON cache, and forcing a plan.

Timing is injected (a timer that runs each candidate once and reports set times), so the
selection logic is checked on CPU; the real candidates still run (Triton under the interpreter).
"""
import json
import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch

from fastlora.kernels import adapted_linear, adapted_linear_reference, ops, plans
from fastlora.kernels.dispatch import ENV_VAR, select_plan
from fastlora.kernels.eligibility import triton_backend, triton_interpreter_on

TRITON_RUNS = triton_backend() is not None and (torch.cuda.is_available() or triton_interpreter_on())
KEY = plans.PlanKey("cpu", "float32", 64, 24, 20, 4, False, False)


class FakeTimer:
    """Runs each candidate once (it must work) and reports the next of ``seconds``."""

    def __init__(self, *seconds):
        self.seconds = list(seconds)
        self.calls = 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.seconds.pop(0)


@pytest.fixture
def cache(tmp_path):
    return plans.PlanCache(tmp_path / "plans.json")


ALL_PLANS = ("triton", "cublas", "torch", "onepass")


def test_fastest_candidate_wins_and_ties_go_first():
    ran = []
    best, seconds, errors = plans.measure_and_choose(KEY, ran.append, ALL_PLANS, timer=FakeTimer(3.0, 1.0, 2.0, 4.0))
    assert best == "cublas" and seconds == {"triton": 3.0, "cublas": 1.0, "torch": 2.0, "onepass": 4.0}
    assert ran == list(ALL_PLANS) and errors == {}
    best, _, _ = plans.measure_and_choose(KEY, lambda plan: None, ALL_PLANS, timer=FakeTimer(1.0, 1.0, 1.0, 1.0))
    assert best == "triton"


def test_auto_times_only_the_gpu_verified_candidates_by_default():
    ran = []
    best, seconds, _ = plans.measure_and_choose(KEY, ran.append, timer=FakeTimer(2.0, 1.0))
    assert ran == list(plans.AUTO_CANDIDATES) == ["cublas", "torch"] and best == "torch"


def test_without_tuning_auto_is_the_default_plan_and_times_nothing(cache, tmp_path, monkeypatch):
    monkeypatch.delenv(plans.TUNE_ENV_VAR, raising=False)
    plan = plans.choose(KEY, "sec", lambda plan: pytest.fail("nothing is timed"), measurable=True,
                        timer=FakeTimer(), cache=cache)
    assert plan == plans.DEFAULT_PLAN == "cublas"
    assert not (tmp_path / "plans.json").exists()


def test_the_size_rule_sends_layers_below_its_size_to_the_torch_plan(cache, monkeypatch):
    monkeypatch.delenv(plans.TUNE_ENV_VAR, raising=False)
    work = KEY.token_bucket * KEY.d_in * KEY.d_out
    for torch_below, expected in ((work, "cublas"), (work + 1, "torch")):
        monkeypatch.setattr(plans, "SIZE_RULE", plans.SizeRule(torch_below, "a committed run"))
        assert plans.default_plan(KEY) == expected
        assert plans.choose(KEY, "sec", lambda plan: pytest.fail("nothing is timed"), measurable=True,
                            timer=FakeTimer(), cache=cache) == expected
    monkeypatch.setattr(plans, "SIZE_RULE", None)
    assert plans.default_plan(KEY) == plans.DEFAULT_PLAN


def test_where_the_default_plan_failed_the_other_candidate_runs(cache, monkeypatch):
    monkeypatch.delenv(plans.TUNE_ENV_VAR, raising=False)
    run = lambda plan: pytest.fail("nothing is timed")  # noqa: E731
    cache.put("sec", KEY, None, ("cublas",))
    assert plans.choose(KEY, "sec", run, measurable=True, timer=FakeTimer(), cache=cache) == "torch"
    monkeypatch.setattr(plans, "SIZE_RULE", plans.SizeRule(1 << 62, "a committed run"))  # the rule says torch
    cache.put("sec", KEY, None, ("torch",))
    assert plans.choose(KEY, "sec", run, measurable=True, timer=FakeTimer(), cache=cache) == "cublas"
    cache.put("sec", KEY, None, ("cublas", "torch"))
    assert plans.choose(KEY, "sec", run, measurable=True, timer=FakeTimer(), cache=cache) == "torch"


def test_a_measured_winner_outranks_the_size_rule(cache, monkeypatch):
    monkeypatch.setattr(plans, "SIZE_RULE", plans.SizeRule(1 << 62, "a committed run"))
    cache.put("sec", KEY, "cublas")
    assert plans.choose(KEY, "sec", lambda plan: None, measurable=False, timer=FakeTimer(), cache=cache) == "cublas"


def test_tuned_choice_is_measured_once_then_recalled_from_memory_and_disk(cache, tmp_path):
    timer = FakeTimer(2.0, 1.0)
    lines = []
    with plans.tuning(lines.append):
        assert plans.choose(KEY, "sec", lambda plan: None, measurable=True, timer=timer, cache=cache) == "torch"
        assert timer.calls == 2 and lines == [f"fastlora: {KEY}: cublas 2000.000 ms, torch 1000.000 ms -> torch"]
        assert plans.choose(KEY, "sec", lambda plan: None, measurable=True, timer=FakeTimer(), cache=cache) == "torch"
    on_disk = json.loads((tmp_path / "plans.json").read_text())
    assert on_disk == {"sec": {str(KEY): {"plan": "torch", "failed": []}}}
    # another process (a fresh cache on the same file) recalls it, tuning on or not
    fresh = plans.PlanCache(tmp_path / "plans.json")
    assert plans.choose(KEY, "sec", lambda plan: None, measurable=True, timer=FakeTimer(), cache=fresh) == "torch"
    # another environment section (device, torch or Triton version) measures again
    with plans.tuning():
        other = plans.choose(KEY, "other", lambda plan: None, measurable=True, timer=FakeTimer(1.0, 2.0), cache=fresh)
    assert other == "cublas"
    assert set(json.loads((tmp_path / "plans.json").read_text())) == {"sec", "other"}


def test_the_environment_variable_switches_tuning_on(cache, monkeypatch):
    monkeypatch.setenv(plans.TUNE_ENV_VAR, "1")
    timer = FakeTimer(1.0, 2.0)
    assert plans.choose(KEY, "sec", lambda plan: None, measurable=True, timer=timer, cache=cache) == "cublas"
    assert timer.calls == 2


def test_a_plan_that_raises_while_timed_is_recorded_as_failed_and_never_tried_again(cache, tmp_path):
    def run(plan):
        if plan == "cublas":
            raise RuntimeError("out of resources: shared memory")

    timer = FakeTimer(1.0)
    lines = []
    with plans.tuning(lines.append):
        assert plans.choose(KEY, "sec", run, measurable=True, timer=timer, cache=cache) == "torch"
    assert "cublas failed (RuntimeError: out of resources: shared memory)" in lines[0]
    fresh = plans.PlanCache(tmp_path / "plans.json")
    assert fresh.record("sec", KEY) == plans.Record("torch", ("cublas",))
    # a new measurement for the key (its winner forgotten) leaves the failed plan out
    fresh.put("sec", KEY, None, ("cublas",))
    ran = []
    with plans.tuning():
        assert plans.choose(KEY, "sec", ran.append, measurable=True, timer=FakeTimer(1.0), cache=fresh) == "torch"
    assert ran == ["torch"]


def test_when_every_candidate_fails_the_torch_plan_runs_and_nothing_is_timed_again(cache):
    def run(plan):
        raise ValueError(f"{plan} broke")

    with plans.tuning():
        assert plans.choose(KEY, "sec", run, measurable=True, timer=FakeTimer(), cache=cache) == "torch"
        assert plans.choose(KEY, "sec", lambda p: pytest.fail("no retry"), measurable=True, timer=FakeTimer(),
                            cache=cache) == "torch"
    assert cache.record("sec", KEY) == plans.Record(None, ("cublas", "torch"))


def test_unmeasurable_calls_use_the_default_without_timing_or_recording(cache, tmp_path):
    with plans.tuning():
        plan = plans.choose(KEY, "sec", lambda plan: None, measurable=False, timer=FakeTimer(), cache=cache)
    assert plan == plans.DEFAULT_PLAN
    assert not (tmp_path / "plans.json").exists()


def test_corrupt_foreign_or_retired_cache_entries_are_ignored(tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable plan cache"):
        assert plans.PlanCache(path).get("sec", KEY) is None
    path.write_text(json.dumps({"sec": {str(KEY): "rm -rf"}, "bad": [1]}))
    assert plans.PlanCache(path).get("sec", KEY) is None
    # a plan recorded by an older version that auto no longer takes is measured again
    path.write_text(json.dumps({"sec": {str(KEY): "onepass"}}))
    assert plans.PlanCache(path).get("sec", KEY) is None
    path.write_text(json.dumps({"sec": {str(KEY): "torch"}}))  # the older format: a bare winner
    assert plans.PlanCache(path).get("sec", KEY) == "torch"


def test_two_caches_on_one_file_keep_each_others_records(tmp_path):
    path = tmp_path / "plans.json"
    first, second = plans.PlanCache(path), plans.PlanCache(path)
    other = KEY._replace(d_in=48)
    assert first.get("sec", KEY) is None and second.get("sec", other) is None  # both loaded before either writes
    first.put("sec", KEY, "torch")
    second.put("sec", other, "cublas")
    fresh = plans.PlanCache(path)
    assert fresh.get("sec", KEY) == "torch" and fresh.get("sec", other) == "cublas"
    assert first.get("sec", other) is None or first.get("sec", other) == "cublas"
    assert second.get("sec", KEY) == "torch"  # the write merged the file's records into memory


def _record_keys(path: str, worker: int, keys: int) -> None:
    cache = plans.PlanCache(Path(path))
    for i in range(keys):
        cache.put("sec", KEY._replace(d_in=1000 * worker + i), "torch")


def test_processes_writing_at_once_lose_no_record(tmp_path):
    path = tmp_path / "plans.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_record_keys, args=(str(path), w, 6)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    recorded = json.loads(path.read_text())["sec"]
    assert len(recorded) == 24


def test_auto_candidates_passed_a_committed_gpu_correctness_run():
    """Every plan auto may choose passed each correctness item it completed in a committed GPU run of
    gpu_check, and no item of it was the one that faulted first."""
    runs = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "results").glob("gpu_check_*.json"))
    runs = [json.loads(p.read_text()) for p in runs]
    runs = [r for r in runs if not r.get("quick") and "correctness" in r.get("sections", {})]
    assert runs, "no committed GPU run of benchmarks/gpu_check.py"
    for plan in plans.AUTO_CANDIDATES:
        verified = False
        for run in runs:
            items = run["sections"]["correctness"]["items"]
            mine = [i for i in items if i.get("plan") == plan and "max_error" in i]
            first_failure = next((i for i in items if not i.get("pass", True)), None)
            if mine and all(i["pass"] for i in mine) and (first_failure is None or first_failure["plan"] != plan):
                verified = True
        assert verified, f"auto candidate {plan!r} has no committed GPU correctness run"


def test_cache_directory_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "x"))
    assert plans.cache_directory() == tmp_path / "x"
    monkeypatch.delenv("FASTLORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert plans.cache_directory() == tmp_path / "xdg" / "fastlora"


def test_token_bucket_is_the_next_power_of_two():
    assert [plans.token_bucket(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]


def test_environment_variable_forces_a_plan(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_plan("auto", x, x.dtype, lambda: pytest.fail("auto must not measure")) == "torch"
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of"):
        select_plan("auto", x, x.dtype, lambda: "torch")
    # an explicit argument wins over the environment
    monkeypatch.setenv(ENV_VAR, "triton")
    assert select_plan("torch", x, x.dtype, lambda: "triton") == "torch"


def test_auto_on_cpu_is_the_torch_plan_without_measuring():
    x = torch.randn(3, 4)
    assert select_plan("auto", x, x.dtype, lambda: pytest.fail("no measurement on CPU")) == "torch"
    x64 = x.double()
    assert select_plan("auto", x64, x64.dtype, lambda: pytest.fail("no measurement for fp64")) == "torch"


def test_forced_triton_plans_refuse_what_they_cannot_run(monkeypatch):
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend='cublas' cannot run this call: dtype torch.float64"):
        select_plan("cublas", x.double(), torch.float64, lambda: "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="bf16 under the Triton interpreter"):
        select_plan("triton", x.bfloat16(), torch.bfloat16, lambda: "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        select_plan("triton", x, x.dtype, lambda: "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        select_plan("fused", x, x.dtype, lambda: "torch")


@pytest.mark.parametrize("gathered,dropout", [(False, False), (True, True)])
def test_tuning_times_every_candidate_on_the_call_shape(monkeypatch, cache, gathered, dropout):
    """_auto_plan times each candidate on random tensors of the key's shape and keeps the winner."""
    monkeypatch.setattr(plans, "CACHE", cache)
    candidates = plans.AUTO_CANDIDATES if TRITON_RUNS else ("torch",)
    monkeypatch.setattr(plans, "AUTO_CANDIDATES", candidates)
    timer = FakeTimer(*[5.0 - i for i in range(len(candidates))])
    monkeypatch.setattr(plans, "cuda_timer", timer)
    monkeypatch.setattr(plans, "device_section", lambda device: "test-section")
    x = torch.randn(5, 7, 24)  # 35 tokens -> bucket 64
    weight = torch.randn(20, 24)
    with plans.tuning():
        plan = ops._auto_plan(x, weight, None, 4, torch.float32, 0.1 if dropout else 0.0, gathered)
    assert plan == candidates[-1] and timer.calls == len(candidates)
    key = plans.PlanKey("cpu", "float32", 64, 24, 20, 4, dropout, gathered)
    assert cache.get("test-section", key) == plan
    assert plans.auto_choices() == {f"test-section|{key}": plan}
    # recalled: no more timing
    assert ops._auto_plan(x, weight, None, 4, torch.float32, 0.1 if dropout else 0.0, gathered) == plan
    assert timer.calls == len(candidates)


def test_tune_measures_each_layer_shape_of_a_model_once(monkeypatch, cache):
    """fastlora.tune runs the model once with timing on; auto then recalls the winners (CUDA's path forced
    on CPU: select_plan hands every auto call to the plan choice)."""
    import fastlora
    from fastlora.kernels import dispatch

    monkeypatch.setattr(plans, "CACHE", cache)
    monkeypatch.setattr(plans, "AUTO_CANDIDATES", ("torch",))
    monkeypatch.setattr(plans, "cuda_timer", FakeTimer(1.0, 1.0))
    monkeypatch.setattr(plans, "device_section", lambda device: "test-section")
    monkeypatch.setattr(dispatch, "select_plan",
                        lambda backend, x, dtype, choose: choose() if backend == "auto" else backend)
    model = fastlora.inject(torch.nn.Sequential(torch.nn.Linear(24, 20), torch.nn.Linear(20, 24),
                                                torch.nn.Linear(24, 20)), fastlora.LoraConfig(r=4))
    lines, batch = [], torch.randn(3, 24)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    chosen = fastlora.tune(model, batch, report=lines.append)
    assert len(lines) == 2 and len(chosen) == 2 and set(chosen.values()) == {"torch"}  # two distinct shapes
    assert torch.equal(torch.rand(2), expected)
    assert fastlora.tune(model, (torch.randn(3, 24),), report=lines.append) == chosen and len(lines) == 2


@pytest.mark.skipif(not TRITON_RUNS, reason="the Triton plans need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("plan", ALL_PLANS)
def test_every_plan_matches_the_float64_reference(plan):
    torch.manual_seed(3)
    f64 = torch.float64
    x, weight, bias = torch.randn(19, 24, dtype=f64), torch.randn(20, 24, dtype=f64), torch.randn(20, dtype=f64)
    a, b = torch.randn(4, 24, dtype=f64) / 5, torch.randn(20, 4, dtype=f64) / 2
    dtype = f64 if plan == "torch" else torch.float32
    leaves = [t.to(dtype).requires_grad_() for t in (x, a, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = adapted_linear(leaves[0], weight.to(dtype), bias.to(dtype), leaves[1], leaves[2], scale=0.5,
                           backend=plan)
    dy = torch.randn(y.shape, dtype=f64)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    refs = [t.clone().requires_grad_() for t in (x, a, b)]
    y_ref = adapted_linear_reference(refs[0], weight, bias, refs[1], refs[2], scale=0.5)
    ref_grads = torch.autograd.grad(y_ref, refs, dy)
    tol = 1e-12 if plan == "torch" else 1e-5
    assert ((y.double() - y_ref).norm() / y_ref.norm()) < tol
    for got, want in zip(grads, ref_grads):
        assert ((got.double() - want).norm() / want.norm()) < tol


def test_timing_leaves_the_random_stream_and_the_callers_modes_alone():
    run = ops._timing_step(plans.PlanKey("cpu", "float32", 8, 6, 5, 2, True, True), torch.device("cpu"),
                           torch.float32, True)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with torch.inference_mode():
        run("torch")
    with torch.no_grad():
        run("torch")
    assert torch.equal(torch.rand(3), expected)


def test_tune_forks_the_random_streams_of_the_models_cuda_devices_only():
    """tune leaves every random stream as it was: torch's CPU generator and those of the CUDA devices the
    model's parameters are on (a meta or CPU parameter has none to fork)."""
    from types import SimpleNamespace

    from fastlora.plan_tuning import _devices

    class Holder:
        def __init__(self, *devices):
            self.devices = devices

        def parameters(self):
            return (SimpleNamespace(device=torch.device(d)) for d in self.devices)

    assert _devices(Holder("cpu", "meta")) == []
    assert _devices(Holder("cuda:1", "cpu", "cuda:0", "cuda:1")) == [torch.device("cuda:0"), torch.device("cuda:1")]


def test_tunes_report_is_keyword_only():
    import fastlora

    with pytest.raises(TypeError):
        fastlora.tune(torch.nn.Linear(2, 2), torch.randn(1, 2), print)

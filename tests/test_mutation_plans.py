"""backend="auto" bookkeeping (kernels/src/plans.py) that the plan tests do not reach on CPU: the default cache
location, the cache section of a device, the CUDA timer's arithmetic (with stand-in CUDA events), PlanKey as
a value."""
import statistics
import sys
from pathlib import Path

import pytest
import torch

from fastlora.kernels import plans

KEY = plans.PlanKey("cpu", "float32", 64, 24, 20, 4, False, False)


def test_plan_key_is_an_immutable_hashable_value():
    same = plans.PlanKey("cpu", "float32", 64, 24, 20, 4, False, False)
    assert same == KEY and hash(same) == hash(KEY) and len({KEY, same}) == 1
    with pytest.raises(AttributeError):
        KEY.rank = 8
    assert str(KEY) == "cpu|float32|64|24|20|4|False|False"


def test_cache_directory_defaults_to_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLORA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert plans.cache_directory() == tmp_path / ".cache" / "fastlora"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty: as unset
    assert plans.cache_directory() == tmp_path / ".cache" / "fastlora"


def test_default_cache_file_is_plans_json_in_the_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path / "c"))
    assert plans.PlanCache().path == tmp_path / "c" / "plans.json"
    assert plans.PlanCache(Path("/elsewhere/p.json")).path == Path("/elsewhere/p.json")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_non_cuda_section_names_the_device_type_and_versions(device):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    section = plans.environment_section(torch.device(device))
    assert section == f"{device}|torch {torch.__version__}|triton {triton_version}"


class FakeEvent:
    """A CUDA event on a scripted clock (milliseconds): record() stamps the next time of ``CLOCK``."""

    CLOCK: list = []
    created: list = []

    def __init__(self, enable_timing=False):
        self.enable_timing = enable_timing
        self.time = None
        FakeEvent.created.append(self)

    def record(self):
        self.time = FakeEvent.CLOCK.pop(0)

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        assert self.enable_timing and end.enable_timing, "elapsed_time needs timing events"
        return end.time - self.time


def test_cuda_timer_is_the_median_in_seconds_after_warmup(monkeypatch):
    durations_ms = [4.0, 9.0, 1.5, 30.0, 2.5]
    FakeEvent.CLOCK = [t for i, d in enumerate(durations_ms) for t in (100.0 * i, 100.0 * i + d)]
    FakeEvent.created = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    calls = []
    seconds = plans.cuda_timer(lambda: calls.append(1), warmup=2, reps=5)
    assert seconds == pytest.approx(statistics.median(durations_ms) / 1000.0, rel=1e-12)  # 4 ms
    assert len(calls) == 2 + 5 and len(FakeEvent.created) == 2 * 5
    assert all(event.enable_timing for event in FakeEvent.created)


def test_cuda_section_names_the_gpu(monkeypatch):
    asked = []

    def device_name(device):
        asked.append(device)
        return "NVIDIA H200"

    monkeypatch.setattr(torch.cuda, "get_device_name", device_name)
    section = plans.environment_section(torch.device("cuda", 1))
    assert section.startswith(f"NVIDIA H200|torch {torch.__version__}|triton ")
    assert asked == [torch.device("cuda", 1)]


def test_section_without_triton_says_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    assert plans.environment_section(torch.device("cpu")) == f"cpu|torch {torch.__version__}|triton none"


def test_a_failed_write_warns_keeps_the_plan_in_memory_and_leaves_no_temp_file(monkeypatch, tmp_path):
    cache = plans.PlanCache(tmp_path / "plans.json")

    def refuse(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(plans.os, "replace", refuse)
    with pytest.warns(UserWarning, match="could not write the plan cache .*disk full"):
        cache.put("sec", KEY, "cublas")
    assert cache.get("sec", KEY) == "cublas"
    # the temp file was removed, no plans.json written (the lock file stays: it is only ever locked)
    assert [p.name for p in tmp_path.iterdir()] == [".plans.json.lock"]


def test_choose_takes_its_options_by_keyword_only(tmp_path):
    cache = plans.PlanCache(tmp_path / "plans.json")

    def run(plan):
        raise AssertionError("nothing is measured when not measurable")

    with pytest.raises(TypeError):
        plans.choose(KEY, "sec", run, False)
    assert plans.choose(key=KEY, section="sec", run=run, measurable=False, cache=cache) == plans.DEFAULT_PLAN


def test_token_bucket_of_an_empty_batch_is_one():
    assert [plans.token_bucket(n) for n in (0, 1, 2)] == [1, 1, 2]


def test_cuda_timer_defaults_are_three_warmups_and_ten_timed_calls(monkeypatch):
    FakeEvent.CLOCK = [t for i in range(10) for t in (10.0 * i, 10.0 * i + 1.0 + i)]  # 1, 2, ..., 10 ms
    FakeEvent.created = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    calls = []
    assert plans.cuda_timer(lambda: calls.append(1)) == pytest.approx(5.5e-3, rel=1e-12)
    assert len(calls) == 13 and len(FakeEvent.created) == 20


def test_the_cache_directory_is_created_with_its_parents(tmp_path):
    path = tmp_path / "a" / "b" / "plans.json"
    plans.PlanCache(path).put("sec", KEY, "torch")
    assert plans.PlanCache(path).get("sec", KEY) == "torch"


def test_cache_warnings_point_at_the_callers_line_not_into_the_library(monkeypatch, tmp_path):
    path = tmp_path / "plans.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable plan cache") as read_warning:
        plans.PlanCache(path).get("sec", KEY)

    def refuse(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(plans.os, "replace", refuse)
    with pytest.warns(UserWarning, match="could not write the plan cache") as write_warning:
        plans.PlanCache(tmp_path / "other.json").put("sec", KEY, "cublas")
    for record in (read_warning[0], write_warning[0]):
        assert record.filename == __file__


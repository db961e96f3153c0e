"""The CLI refuses bad numeric arguments with an argument error (exit 2, message), not a traceback."""
import pytest
from torch import nn

from fastlora import cli
from fastlora.demo import TARGETS, load_minilm
from fastlora.targets import matches_targets


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be an int >= 1, got 0"),
    (["--steps", "-1"], "argument --steps: must be an int >= 1, got -1"),
    (["--steps", "2.5"], "argument --steps: expected an int, got '2.5'"),
    (["--rank", "0"], f"argument --rank: must be an int in [1, {cli.MAX_DEMO_RANK}], got 0"),
    (["--rank", "-4"], "argument --rank: must be an int in [1, "),
    (["--rank", str(cli.MAX_DEMO_RANK + 1)],
     f"must be an int in [1, {cli.MAX_DEMO_RANK}], got {cli.MAX_DEMO_RANK + 1}"),
    (["--rank", "eight"], "argument --rank: expected an int, got 'eight'"),
])
def test_bad_numeric_arguments_are_argument_errors(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("fastlora.demo.run_demo", lambda *a: pytest.fail("the demo must not start"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.fixture
def demo_calls(monkeypatch):
    """The arguments of each run_demo call, the demo itself replaced (and its table)."""
    calls = []
    monkeypatch.setattr("fastlora.demo.run_demo", lambda *args: calls.append(args) or [])
    monkeypatch.setattr("fastlora.demo.format_table", lambda reports: "table")
    return calls


def test_good_arguments_reach_the_demo(demo_calls):
    assert cli.main(["demo", "--rank", str(cli.MAX_DEMO_RANK), "--steps", "1", "--methods", "lora"]) == 0
    assert demo_calls == [(["lora"], cli.MAX_DEMO_RANK, 1, "auto")]


def test_rank_bound_is_the_smallest_side_of_the_adapted_layers():
    model, _ = load_minilm()
    sides = [min(m.in_features, m.out_features) for n, m in model.named_modules()
             if type(m) is nn.Linear and matches_targets(n, TARGETS)]
    assert len(sides) == 37 and min(sides) == cli.MAX_DEMO_RANK


def test_without_arguments_the_demo_runs_with_its_documented_defaults(demo_calls):
    assert cli.main(["demo"]) == 0
    assert demo_calls == [(cli.METHODS, 8, 4, "auto")]


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2 and "the following arguments are required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_only_the_triton_backend_has_machine_requirements(backend, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.backend_problem(backend) is None


@pytest.mark.parametrize("triton,cuda,interpret,problem", [
    (False, True, "1", "needs the triton package"),
    (True, False, None, "needs a CUDA GPU"),
    (True, False, "0", "needs a CUDA GPU"),
    (True, False, "true", "needs a CUDA GPU"),  # only TRITON_INTERPRET=1 runs the kernels on CPU tensors here
    (True, False, "1", None),
    (True, True, None, None),
], ids=["no_triton", "no_gpu", "interpreter_off", "interpreter_true", "interpreter", "gpu"])
def test_the_triton_backend_needs_triton_and_a_gpu_or_the_interpreter(triton, cuda, interpret, problem, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name: find_spec(name) if triton else None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    got = cli.backend_problem("triton")
    assert got is None if problem is None else problem in got


def test_progress_lines_follow_the_current_stderr_and_leave_a_users_handler_alone(monkeypatch):
    import io
    import logging

    logger = logging.getLogger("fastlora.demo")
    monkeypatch.setattr(logger, "handlers", [])
    for _ in range(2):  # a second call in one process writes to the stderr of that time, once
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        cli._show_progress()
        logger.info("progress")
        assert stream.getvalue() == "progress\n" and len(logger.handlers) == 1
    users = logging.StreamHandler(io.StringIO())
    logger.handlers = [users]
    cli._show_progress()
    assert logger.handlers == [users]


def test_a_triton_backend_from_the_command_line_is_checked_before_the_demo_starts(monkeypatch, capsys):
    """argv's strings are built at run time (not the interned literal): the check compares values."""
    monkeypatch.setattr("fastlora.demo.run_demo", lambda *a: pytest.fail("the demo must not start"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--backend", "".join(["tri", "ton"])])
    assert exit_info.value.code == 2 and "--backend triton needs" in capsys.readouterr().err

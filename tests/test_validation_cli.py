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


def test_good_arguments_reach_the_demo(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("fastlora.demo.run_demo", lambda *args: calls.append(args) or [])
    monkeypatch.setattr("fastlora.demo.format_table", lambda reports: "table")
    assert cli.main(["demo", "--rank", str(cli.MAX_DEMO_RANK), "--steps", "1", "--methods", "lora"]) == 0
    assert calls == [(["lora"], cli.MAX_DEMO_RANK, 1, "auto")]


def test_rank_bound_is_the_smallest_side_of_the_adapted_layers():
    model, _ = load_minilm()
    sides = [min(m.in_features, m.out_features) for n, m in model.named_modules()
             if type(m) is nn.Linear and matches_targets(n, TARGETS)]
    assert len(sides) == 37 and min(sides) == cli.MAX_DEMO_RANK

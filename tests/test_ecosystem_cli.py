"""The command line: help with every option's meaning and default, --version, progress lines, the rich table
with its legend; and the distribution's name and version."""
import argparse
import time
from pathlib import Path

import pytest
import tomllib
import torch
from torch import nn

import fastlora
from fastlora import cli, demo

ROOT = Path(__file__).resolve().parents[1]


def demo_options():
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["demo"]._actions if a.option_strings and a.dest != "help"]


def test_demo_help_gives_every_option_its_meaning_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = demo_options()
    assert {o.dest for o in options} == {"methods", "rank", "steps", "backend"}
    for option in options:
        assert option.help and option.option_strings[0] in text
        assert f"(default: {option.default})" in text  # a list prints as a Python list
    for method, name in demo.METHOD_NAMES.items():
        assert f"{method} {name}" in text


def test_version_is_the_package_and_distribution_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"fastlora {fastlora.__version__}" == f"fastlora {project['version']}"
    assert project["name"] == "fastlora-fused"  # "fastlora" on PyPI is another project


def test_demo_prints_a_progress_line_per_method_and_the_table_with_its_legend(monkeypatch, capsys):
    def fake_tokenizer(sentences, **kwargs):
        return {"input_ids": torch.zeros(len(sentences), 3, dtype=torch.long)}

    def fake_run(name, config, base, batch, steps):
        assert config.r == 3 and steps == 2
        return demo.MethodReport(name, 1234, 0.0, 0.5, 1e-7, None, 2.5, "active=1.00/layer [x]")

    monkeypatch.setattr(demo, "load_minilm", lambda: (nn.Linear(2, 2), fake_tokenizer))
    monkeypatch.setattr(demo, "run_method", fake_run)
    assert cli.main(["demo", "--methods", "neat", "rank_selective_lora", "--rank", "3", "--steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in err.splitlines()] == ["[1/2] NEAT", "[1/2] NEAT", "[2/2] CoDyRA",
                                                                 "[2/2] CoDyRA"]
    assert "done in" in err.splitlines()[1]
    rows = [line for line in out.splitlines() if "1,234" in line]
    assert len(rows) == 2 and "NEAT [neat]" in rows[0] and "CoDyRA [rank_selective_lora]" in rows[1]
    assert "active=1.00/layer [x]" in rows[0] and "5.00e-01" in rows[0] and "2.5" in rows[0]
    legend = out[out.index(rows[-1]):]
    for column, meaning in demo.LEGEND:
        assert f"{column}: {meaning.split()[0]}" in legend
        assert column in out[:out.index(rows[0])]  # a header above the rows


def test_timing_leaves_out_the_warm_up_step(monkeypatch):
    """A first step of 0.6 s and fast later ones: a mean over all three steps would be >= 200 ms."""
    calls = []

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

    class Hooks:
        def remove(self):
            pass

    def loss(model, batch, half):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.6)
        return model.weight * 1

    monkeypatch.setattr(demo, "inject", lambda model, config: Model())
    monkeypatch.setattr(demo, "embed", lambda model, batch: torch.zeros(2, 1))
    monkeypatch.setattr(demo, "attach_training_hooks", lambda model, optimizer: Hooks())
    monkeypatch.setattr(demo, "regularization_loss", lambda model: 0)
    monkeypatch.setattr(demo, "_paraphrase_loss", loss)
    report = demo.run_method("curlora", fastlora.CurLoraConfig(r=1), nn.Linear(1, 1), {"input_ids": torch.zeros(2, 1)},
                             3)
    assert len(calls) == 3 and 0 < report.step_ms < 150

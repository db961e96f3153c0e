"""The library's warnings point at the user's line: the first frame outside fastlora, torch, transformers,
peft and accelerate, however deep inside them the warning arose (``fastlora.kernels.caller_warnings``).

The warnings each reach here through another library function than their own (load_adapter -> inject,
a module call -> a forward hook, a module call -> PEFT's forward); the other warnings' tests check the
same where they are raised (``record`` filenames).
"""
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoraConfig, RankSelectiveLoraConfig
from fastlora.kernels import caller_warnings
from fastlora.training import WATCHED_FORWARDS


class QuantLinear(nn.Linear):
    """An nn.Linear subclass (as a quantized layer): fastlora leaves it as it is, and says so."""


def _raised_here(record, text: str) -> list[tuple[str, int]]:
    return [(w.filename, w.lineno) for w in record if text in str(w.message)]


def test_a_warning_raised_under_torch_module_calls_points_at_the_line_that_called_the_model():
    module = nn.Module()
    module.forward = caller_warnings.warn_at_caller  # called by torch's Module.__call__ inside Sequential's forward
    with pytest.warns(UserWarning, match="from inside") as record:
        line = sys._getframe().f_lineno + 1
        nn.Sequential(module)("from inside")
    assert (record[0].filename, record[0].lineno) == (__file__, line)


@pytest.mark.parametrize("package", ["peft", "transformers", "kernels"])
def test_frames_of_the_libraries_that_call_fastlora_are_skipped_and_the_category_kept(package):
    """A frame whose code lies in peft's, transformers' or Hugging Face kernels' directory (a callback or
    a model's forward calling into fastlora) is passed over like fastlora's own."""
    __import__(package)
    if getattr(sys.modules[package], "__file__", None) is None:
        pytest.skip(f"{package} is not installed (only a namespace portion of that name is importable)")
    inside = Path(sys.modules[package].__file__).parent / "calls_fastlora.py"
    scope = {"warn": caller_warnings.warn_at_caller}
    exec(compile("def library_call(message, category):\n    warn(message, category)\n", str(inside), "exec"), scope)
    assert str(inside.parent.resolve()) + os.sep in caller_warnings.library_directories()
    with pytest.warns(RuntimeWarning, match="through a library") as record:
        line = sys._getframe().f_lineno + 1
        scope["library_call"]("through a library", RuntimeWarning)
    assert (record[0].filename, record[0].lineno) == (__file__, line)
    outside = {"warn": caller_warnings.warn_at_caller}  # the same code outside the libraries: its own line
    exec(compile("def user_call(message):\n    warn(message)\n", "user_code.py", "exec"), outside)
    with pytest.warns(UserWarning, match="user code") as record:
        outside["user_call"]("user code")
    assert (Path(record[0].filename).name, record[0].lineno) == ("user_code.py", 2)


def test_inject_warning_raised_inside_load_adapter_names_the_load_line(tmp_path):
    def model(quantized: bool) -> nn.Module:
        torch.manual_seed(0)
        root = nn.Module()
        root.a, root.b = nn.Module(), nn.Module()
        root.a.proj = nn.Linear(4, 4)
        root.b.proj = (QuantLinear if quantized else nn.Identity)(4, 4)
        return root

    fastlora.save_adapter(fastlora.inject(model(False), LoraConfig(r=2, target_modules=["proj"])), tmp_path)
    target = model(True)
    with pytest.warns(UserWarning, match=r"cannot adapt.*'b.proj \(QuantLinear\)'") as record:
        line = sys._getframe().f_lineno + 1
        fastlora.load_adapter(target, tmp_path)
    assert _raised_here(record, "cannot adapt") == [(__file__, line)]
    assert [n for n, _ in fastlora.adapter_layers(target)] == ["a.proj"]


def test_the_training_rule_warning_names_the_line_that_ran_the_model():
    torch.manual_seed(0)
    model = fastlora.inject(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
                            RankSelectiveLoraConfig(r=2, total_steps=10)).train()
    x = torch.randn(3, 6)
    with pytest.warns(UserWarning, match="forward passes without their post-step rule") as record:
        line = sys._getframe().f_lineno + 2
        for _ in range(WATCHED_FORWARDS):
            model(x).sum().backward()
    assert _raised_here(record, "post-step rule") == [(__file__, line)]


def test_the_trainer_callback_without_adapters_warns_at_its_caller():
    with pytest.warns(UserWarning, match="the model has no fastlora adapters; nothing to do") as record:
        line = sys._getframe().f_lineno + 1
        fastlora.FastLoraCallback().on_train_begin(None, None, None, model=nn.Linear(2, 2))
    assert _raised_here(record, "nothing to do") == [(__file__, line)]


def test_every_warning_of_the_library_goes_through_warn_at_caller():
    root = Path(__file__).resolve().parents[1]
    direct = [f"{path.relative_to(root)}:{number}" for folder in ("fastlora", "kernels/src")
              for path in sorted((root / folder).rglob("*.py")) if path.name != "caller_warnings.py"
              for number, line in enumerate(path.read_text().splitlines(), 1) if "warnings.warn(" in line]
    assert direct == []

"""FastLoraTrainer with torch_compile=True: Selective LoRA's gate statistics (counted on the device inside the
compiled forwards) are the eager run's, so FastLoraCallback's "no gate moved" warning comes exactly where it
comes in eager training. Backend "aot_eager" (Dynamo's trace and AOTAutograd's graph; inductor's C++ build is
beyond a CPU test's budget), a tiny BERT."""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import BertForSequenceClassification, TrainingArguments

import fastlora
from fastlora import FastLoraTrainer, SelectiveLoraConfig

from utils import TokenLabels, tiny_bert

TARGETS = ["query", "value"]
STEPS = 4
WARNING = "no Selective LoRA gate switched"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(tmp_path, compiled: bool, learning_rate: float) -> tuple[dict, list[str], list[float]]:
    """(adapter_stats after the run, the no-gate-moved warnings, the logged losses)."""
    torch.manual_seed(0)
    model = fastlora.inject(BertForSequenceClassification(tiny_bert(num_labels=2)),
                            SelectiveLoraConfig(r=2, target_modules=TARGETS))
    args = TrainingArguments(output_dir=str(tmp_path / f"compiled-{compiled}"), max_steps=STEPS,
                             per_device_train_batch_size=4, learning_rate=learning_rate, logging_steps=1,
                             save_strategy="no", use_cpu=True, report_to=[], seed=0, data_seed=0, disable_tqdm=True,
                             torch_compile=compiled, torch_compile_backend="aot_eager" if compiled else None)
    trainer = FastLoraTrainer(model=model, args=args, train_dataset=TokenLabels())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if WARNING in str(w.message)]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return fastlora.adapter_stats(model), messages, losses


@pytest.mark.parametrize("learning_rate, warned", [(5e-2, False), (1e-4, True)])
def test_compiled_trainer_run_counts_the_eager_gate_switches_and_warns_as_eager(tmp_path, learning_rate, warned):
    """At lr 5e-2 the penalty switches gates within the 4 steps (gate_changes > 0, no warning, compiled as in
    eager); at lr 1e-4 none moves and the compiled run warns too."""
    eager_stats, eager_messages, eager_losses = _train(tmp_path, False, learning_rate)
    counters.clear()
    stats, messages, losses = _train(tmp_path, True, learning_rate)
    assert counters["stats"]["unique_graphs"] >= 1  # Trainer ran the compiled model
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert stats == pytest.approx(eager_stats, rel=1e-5, abs=1e-7)
    changes = stats["fastlora/selective_lora/gate_changes"]
    if warned:
        assert changes == 0 and len(messages) == len(eager_messages) == 1
        assert f"run of {STEPS} optimizer steps" in messages[0]
    else:
        assert changes > 0 and messages == eager_messages == []

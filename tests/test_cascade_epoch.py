"""LoRASC's default stage is one epoch (cascade_interval "epoch"): the epoch's length in optimizer steps comes
from Trainer (FastLoraCallback: Trainer's steps per epoch, accumulation included) or from the loop
(attach_training_hooks(steps_per_epoch=N)), is refused when unknown, is saved with the adapter (a resumed run
keeps its stages), and checkpoints of earlier versions (cascade_interval 100, no epoch length) still load."""
import hashlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import fastlora
from fastlora import CascadeLoraConfig, FastLoraCallback
from fastlora.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from fastlora.trainer import trainer_steps_per_epoch

from utils import TokenLabels, tiny_bert

D = 6


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D, dtype=torch.float64), nn.Tanh(), nn.Linear(D, D, dtype=torch.float64))


def _model(**kwargs):
    return fastlora.inject(_base(), CascadeLoraConfig(r=2, noise_intensity=0.1, **kwargs))


def _layers(model):
    return [layer for _, layer in fastlora.adapter_layers(model)]


def _steps(model, count, first=1, **attach):
    """``count`` SGD steps (numbered from ``first``, each with its own seeded batch and fresh-pair draw) with the
    training hooks; returns the step numbers that ended a stage."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer, **attach)
    ends = []
    for step in range(first, first + count):
        generator = torch.Generator().manual_seed(step)
        x, target = (torch.randn(4, D, generator=generator, dtype=torch.float64) for _ in range(2))
        optimizer.zero_grad()
        F.mse_loss(model.train()(x), target).backward()
        before = model[0].adapter._cascades
        torch.manual_seed(step)  # a stage end draws the fresh A from the default generator
        optimizer.step()
        if model[0].adapter._cascades != before:
            ends.append(step)
    hooks.remove()
    return ends


def _same(a, b):
    return all(torch.equal(x.weight, y.weight) and x.adapter.state_dict().keys() == y.adapter.state_dict().keys()
               and all(torch.equal(t, y.adapter.state_dict()[k]) for k, t in x.adapter.state_dict().items())
               for x, y in zip(_layers(a), _layers(b)))


# ----------------------------------------------------------------------------- Trainer


class _StageLog(TrainerCallback):
    """The global steps that ended a LoRASC stage, and those that ended an epoch."""

    def __init__(self, model):
        self.layer = next(layer for _, layer in fastlora.adapter_layers(model))
        self.cascades, self.stage_ends, self.epoch_ends = 0, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.cascades = self.layer.adapter._cascades  # a resumed run's, loaded from its checkpoint

    def on_step_end(self, args, state, control, **kwargs):
        if self.layer.adapter._cascades != self.cascades:
            self.cascades = self.layer.adapter._cascades
            self.stage_ends.append(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_ends.append(state.global_step)


def _trainer_run(output_dir, **kwargs):
    """3 epochs of 5 batches with 2 accumulation steps: 3 optimizer steps per epoch (the last on one batch)."""
    torch.manual_seed(0)
    model = fastlora.inject(BertForSequenceClassification(tiny_bert(num_labels=2)),
                            CascadeLoraConfig(r=2, target_modules=["query", "value"]))
    log = _StageLog(model)
    args = TrainingArguments(output_dir=str(output_dir), num_train_epochs=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=5e-2, logging_steps=1, use_cpu=True,
                             report_to=[], seed=0, data_seed=0, disable_tqdm=True, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=TokenLabels(20),
                      callbacks=[FastLoraCallback(save_adapters=False), log])
    return model, trainer, log


def test_a_trainer_run_of_three_epochs_ends_a_stage_at_each_epoch_boundary_but_the_last(tmp_path):
    model, trainer, log = _trainer_run(tmp_path, save_strategy="no")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert log.epoch_ends == [3, 6, 9] and trainer.state.global_step == 9  # Trainer's own epochs
    assert log.stage_ends == [3, 6]  # not step 9, the run's final step
    for layer in _layers(model):
        adapter = layer.adapter
        assert (int(adapter.epoch_steps), int(adapter.run_steps), adapter._cascades) == (3, 9, 2)
        assert adapter.noise_stds.gt(0).all()  # each of the three stages trained, with its noise
        assert torch.count_nonzero(adapter.lora_B) > 0  # the third stage: still the fast pair
    assert not [w for w in caught if "fastlora" in str(w.message)]


def test_a_resumed_trainer_run_keeps_its_epoch_stages(tmp_path):
    whole, trainer, _ = _trainer_run(tmp_path / "whole", save_strategy="no")
    trainer.train()
    _, trainer, _ = _trainer_run(tmp_path / "run", save_strategy="steps", save_steps=4)
    trainer.train()
    resumed, trainer, log = _trainer_run(tmp_path / "run2", save_strategy="no")
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))  # mid-epoch 2
    assert log.stage_ends == [6]
    for a, b in zip(_layers(whole), _layers(resumed)):
        assert int(b.adapter.epoch_steps) == 3 and b.adapter._cascades == 2
        assert torch.allclose(a.weight, b.weight, atol=1e-6, rtol=0)
        assert torch.allclose(a.adapter.lora_B, b.adapter.lora_B, atol=1e-6, rtol=0)


class _Unsized:
    """A dataloader without a length (an iterable dataset's)."""

    def __iter__(self):
        return iter(())


@pytest.mark.parametrize("length, accumulation, expected", [
    (5, 2, 3),      # ceil(5 / 2): the last, one-batch accumulation steps too
    (4, 2, 2), (7, 1, 7), (1, 8, 1),
    (None, 2, None),  # no length (an IterableDataset): its epochs end where its data does, not known here
    (0, 2, None)])
def test_steps_per_epoch_as_trainer_counts_them(length, accumulation, expected):
    loader = _Unsized() if length is None else [None] * length
    assert trainer_steps_per_epoch(loader, accumulation) == expected


def test_the_callback_takes_the_epoch_length_from_the_dataloader_trainer_passes():
    class State:
        max_steps, global_step = 12, 0
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    args = type("Args", (), {"gradient_accumulation_steps": 2})()
    callback = FastLoraCallback(save_adapters=False)
    with pytest.raises(ValueError, match=r"the epoch's length is not known"):
        callback.on_train_begin(args, State(), None, model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match=r"FastLoraCallback: LoRASC ends a stage every epoch .* train dataloader "
                                         r"gives no length \(an IterableDataset\)"):  # was: max_steps as one epoch
        callback.on_train_begin(args, State(), None, model=model, optimizer=optimizer, train_dataloader=_Unsized())
    callback.on_train_begin(args, State(), None, model=model, optimizer=optimizer, train_dataloader=[None] * 8)
    assert [int(layer.adapter.epoch_steps) for layer in _layers(model)] == [4, 4]
    callback.hooks.remove()


# ----------------------------------------------------------------------------- hand-written loops


def test_a_hand_loop_gives_the_epoch_length_to_the_hooks():
    model = _model()
    assert _steps(model, 12, steps_per_epoch=4, total_steps=12) == [4, 8]  # not 12: the run's final step
    assert [int(layer.adapter.epoch_steps) for layer in _layers(model)] == [4, 4]
    assert _steps(_model(), 12, steps_per_epoch=4) == [4, 8, 12]  # run length unknown: every epoch's end
    assert _steps(_model(cascade_interval=5), 12, steps_per_epoch=4) == [5, 10]  # an int interval ignores it
    assert [int(layer.adapter.epoch_steps) for layer in _layers(_model(cascade_interval=5))] == [0, 0]


def test_an_epoch_stage_without_a_known_epoch_length_is_refused():
    model = _model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError) as error:
        fastlora.attach_training_hooks(model, optimizer, total_steps=12)
    message = str(error.value)
    assert message.startswith("cascade_lora layers end a stage every epoch (cascade_interval='epoch', the "
                              "default), and the epoch's length is not known: ")
    for way in ("attach_training_hooks(model, optimizer, steps_per_epoch=N)", "FastLoraTrainer / FastLoraCallback",
                "CascadeLoraConfig(cascade_interval=<steps per stage>)", "CascadeLoraConfig(stages_per_run=K)"):
        assert way in message
    assert fastlora.training.attached_hooks(model) is None
    with pytest.raises(ValueError, match=r"cascade_interval='epoch'\) needs the epoch's length: pass "
                                         r"attach_training_hooks"):
        model[0].adapter.after_optimizer_step(0.1)
    assert int(model[0].adapter.optimizer_steps) == 0  # refused before the step was counted
    for other in (_model(cascade_interval=3), _model(cascade_interval=None)):
        opt = torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=0.1)
        fastlora.attach_training_hooks(other, opt).remove()  # no epoch needed
    frozen = _model()
    for layer in _layers(frozen):
        layer.adapter.lora_A.requires_grad_(False)  # the rule parameter frozen: no rule, no length needed
    fastlora.attach_training_hooks(frozen, torch.optim.SGD([frozen[0].adapter.lora_B, frozen[2].adapter.lora_B],
                                                           lr=0.1)).remove()


@pytest.mark.parametrize("bad", [0, -1, 2**63, 10**30, 4.0, "4", True])
def test_steps_per_epoch_must_fit_an_int64_and_is_checked_before_anything_changes(bad):
    model = _model(stages_per_run=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match=rf"steps_per_epoch must be an int > 0 \(optimizer steps per epoch\) and "
                                         rf"below 2\*\*63 .*got {bad!r}"):
        fastlora.attach_training_hooks(model, optimizer, total_steps=12, steps_per_epoch=bad)
    assert all(int(layer.adapter.run_steps) == 0 == layer.adapter._run_steps for layer in _layers(model))
    with pytest.raises(ValueError, match="steps_per_epoch must be an int > 0"):
        fastlora.training.set_epoch_length(model, bad)
    longest = _model()
    fastlora.training.set_epoch_length(longest, 2**63 - 1)
    assert all(int(layer.adapter.epoch_steps) == 2**63 - 1 for layer in _layers(longest))


# ----------------------------------------------------------------------------- checkpoints


def test_a_resumed_loop_keeps_the_saved_epoch_length(tmp_path):
    whole = _model()
    assert _steps(whole, 12, steps_per_epoch=4, total_steps=12) == [4, 8]
    half = _model()
    assert _steps(half, 6, steps_per_epoch=4, total_steps=12) == [4]
    fastlora.save_adapter(half, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert saved["config"]["cascade_interval"] == "epoch"
    assert int(load_file(tmp_path / "ckpt" / WEIGHTS_FILE)["0.adapter.epoch_steps"]) == 4
    resumed = fastlora.load_adapter(_base(), tmp_path / "ckpt")
    assert _layers(resumed)[0].config == _layers(half)[0].config  # "epoch" round-trips through the JSON
    assert _steps(resumed, 6, first=7) == [8]  # no length given: the checkpoint's epoch and run
    assert _same(resumed, whole)
    again = fastlora.load_adapter(_base(), tmp_path / "ckpt")
    with pytest.warns(RuntimeWarning, match=r"have taken 6 optimizer steps with epochs of 4 steps; they keep those "
                                            r"stages, not steps_per_epoch=5"):
        assert _steps(again, 6, first=7, steps_per_epoch=5) == [8]
    assert _same(again, whole)


_NEWER_KEYS = ("epoch_steps", "run_steps", "run_start")


def test_an_earlier_versions_checkpoint_keeps_its_100_step_stages(tmp_path):
    """Written before the epoch default: adapter_config.json says cascade_interval 100, the weights hold no
    epoch_steps (nor run_steps, run_start). It loads (load_adapter and a strict load_state_dict alike), its layers end
    a stage every 100 steps, and no epoch length is asked for."""
    model = _model(cascade_interval=100)
    _steps(model, 3, total_steps=250)
    fastlora.save_adapter(model, tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    save_file({k: v for k, v in load_file(weights).items() if not k.endswith(_NEWER_KEYS)}, weights)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["config"]["cascade_interval"] == 100
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    old = fastlora.load_adapter(_base(), tmp_path)
    assert _layers(old)[0].config.cascade_interval == 100
    assert [(layer.adapter._steps, layer.adapter._run_steps, layer.adapter._epoch_steps) for layer in _layers(old)] \
        == [(3, 0, 0), (3, 0, 0)]
    assert _steps(old, 198, first=4) == [100, 200]
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(_NEWER_KEYS)}
    other = _model(cascade_interval=100)
    other.load_state_dict(state)  # strict: the missing keys keep the layer's own values
    for a, b in zip(_layers(model), _layers(other)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.adapter.lora_B, b.adapter.lora_B)
        assert (b.adapter._steps, b.adapter._run_steps, b.adapter._epoch_steps) == (3, 0, 0)

"""LoRASC counts its stages within a run: a second run on a trained adapter (Trainer's train() again, or a
hand loop attached again after its run of known length is over) places its stages as the first run did and
ends none on its own final step; a resumed run (Trainer's resume_from_checkpoint, a hand loop reloaded
mid-run) goes on counting from where its run began, which the checkpoint keeps (run_start)."""
import warnings

import pytest
import torch
from test_cascade_epoch import _base, _layers, _model, _same, _steps, _trainer_run
from transformers import TrainerCallback

import fastlora
from fastlora.training import set_run_length


def test_a_second_hand_loop_run_ends_no_stage_on_its_final_step():
    model = _model(cascade_interval=2)
    assert _steps(model, 4, total_steps=4) == [2]
    assert _steps(model, 4, first=5, total_steps=4) == [6]  # not 8: the second run's final step
    assert [layer.adapter.steps_in_run for layer in _layers(model)] == [4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new run takes its own length, with no "keeps that run" warning
        assert _steps(model, 6, first=9, total_steps=6) == [10, 12]
    assert [(int(layer.adapter.run_start), int(layer.adapter.run_steps)) for layer in _layers(model)] == [(8, 6)] * 2


def test_a_run_stopped_early_goes_on_when_attached_again():
    model = _model(cascade_interval=2)
    assert _steps(model, 3, total_steps=6) == [2]
    assert _steps(model, 3, first=4, total_steps=6) == [4]  # the same run: not over, so no new run begins
    assert int(_layers(model)[0].adapter.run_start) == 0


def test_stages_per_run_split_each_run():
    model = _model(stages_per_run=2)
    assert _steps(model, 4, total_steps=4) == [2]
    assert _steps(model, 6, first=5, total_steps=6) == [7]  # ceil(6 / 2) = 3 steps into the second run


def test_a_second_run_resumed_from_its_checkpoint_keeps_its_stages(tmp_path):
    whole = _model(cascade_interval=2)
    _steps(whole, 3, total_steps=3)
    assert _steps(whole, 5, first=4, total_steps=5) == [5, 7]
    half = _model(cascade_interval=2)
    _steps(half, 3, total_steps=3)
    assert _steps(half, 3, first=4, total_steps=5) == [5]
    fastlora.save_adapter(half, tmp_path)
    resumed = fastlora.load_adapter(_base(), tmp_path)
    assert int(_layers(resumed)[0].adapter.run_start) == 3
    assert _steps(resumed, 2, first=7, total_steps=5) == [7]  # step 4 of the second run, not 6 or 8
    assert _same(resumed, whole)


def test_a_second_trainer_run_places_its_epoch_stages_as_the_first(tmp_path):
    model, trainer, log = _trainer_run(tmp_path, save_strategy="no")
    trainer.train()
    assert log.stage_ends == [3, 6]
    log.stage_ends.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert log.stage_ends == [3, 6] and trainer.state.global_step == 9  # not step 9, the second run's final step
    assert not [w for w in caught if "fastlora" in str(w.message)]
    for layer in _layers(model):
        adapter = layer.adapter
        assert (int(adapter.run_start), adapter._steps, adapter._cascades) == (9, 18, 4)
        assert torch.count_nonzero(adapter.lora_B) > 0  # the second run's last stage: still the fast pair


@pytest.mark.parametrize("bad", [0, 1, "yes"])
def test_new_run_must_be_a_bool_and_is_checked_before_anything_changes(bad):
    model = _model(cascade_interval=2)
    with pytest.raises(TypeError, match=r"new_run must be a bool or None"):
        set_run_length(model, 4, new_run=bad)
    assert [int(layer.adapter.run_steps) for layer in _layers(model)] == [0, 0]


def test_a_hand_loop_attached_with_a_length_after_a_run_without_one_begins_a_new_run():
    """The earlier run had no length (its stages every 2 steps, any final step): the next attach with
    total_steps=4 begins a run of 4, which ends no stage on its final step (it went on counting, ending one)."""
    model = _model(cascade_interval=2)
    assert _steps(model, 4) == [2, 4]
    assert _steps(model, 4, first=5, total_steps=4) == [6]
    assert {(int(layer.adapter.run_start), layer.adapter.steps_in_run) for layer in _layers(model)} == {(4, 4)}


class _StopAt(TrainerCallback):
    """Stops the first run after ``step`` optimizer steps (an early stop: the run is not over)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            self.step = None


def test_a_trainer_run_after_an_early_stop_begins_a_new_run(tmp_path):
    model, trainer, log = _trainer_run(tmp_path, save_strategy="no")
    trainer.add_callback(_StopAt(4))
    trainer.train()
    assert log.stage_ends == [3] and trainer.state.global_step == 4
    log.stage_ends.clear()
    trainer.train()  # afresh (no resume): a new run of 9 steps, its stages at its epochs' ends
    assert log.stage_ends == [3, 6]
    assert {int(layer.adapter.run_start) for layer in _layers(model)} == {4}


def test_a_state_dict_without_run_start_counts_its_run_from_zero():
    """Checkpoints written before run_start counted a run's steps from 0: loaded into a layer that began a later
    run (run_start 4), a 3-step state of such a checkpoint takes run_start 0, not the layer's 4 (steps_in_run -1:
    a stage would end on the run's final step)."""
    saved = _model(cascade_interval=2)
    _steps(saved, 3, total_steps=4)
    state = {k: v for k, v in saved.state_dict().items() if not k.endswith("run_start")}
    model = _model(cascade_interval=2)
    _steps(model, 4, total_steps=4)
    _steps(model, 4, first=5, total_steps=4)
    assert {int(layer.adapter.run_start) for layer in _layers(model)} == {4}
    model.load_state_dict(state)
    assert {(int(layer.adapter.run_start), layer.adapter.steps_in_run) for layer in _layers(model)} == {(0, 3)}
    assert _steps(model, 1, first=4) == []  # step 4: the run's final one ends no stage
    _steps(model, 4, first=5, total_steps=4)
    model.load_state_dict({"2.bias": model[2].bias.detach().clone()}, strict=False)  # a partial load: no record
    assert {int(layer.adapter.run_start) for layer in _layers(model)} == {4}

"""transformers.Trainer with FastLoraTrainer / FastLoraCallback: every method trains, its rule runs through
accelerate's optimizer wrapper, stats are logged, adapter checkpoints sit in checkpoint-N and reload, and a
run resumed from a checkpoint ends where the uninterrupted run ends."""
import warnings

import pytest
import torch
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

import fastlora
from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    FastLoraCallback,
    FastLoraTrainer,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)

from utils import TokenLabels, tiny_bert

TARGETS = ["query", "value"]
CONFIGS = {
    "lora": LoraConfig(r=2, alpha=4.0, target_modules=TARGETS),
    "selective": SelectiveLoraConfig(r=2, target_modules=TARGETS, sparsity_weight=0.5),
    "codyra": RankSelectiveLoraConfig(r=3, target_modules=TARGETS, total_steps=4, dense_fraction=0.0,
                                      threshold_levels=1, kappa_max=10.0),
    "curlora": CurLoraConfig(r=2, target_modules=TARGETS),
    "neat": NeatConfig(r=2, depth=1, target_modules=TARGETS),
    "cascade": CascadeLoraConfig(r=2, target_modules=TARGETS, cascade_interval=2),
}
STEPS = 4


def model_with(config):
    torch.manual_seed(0)
    return fastlora.inject(BertForSequenceClassification(tiny_bert(num_labels=2)), config)


def arguments(output_dir, **kwargs):
    fields = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-2,
                  save_steps=2, logging_steps=1, use_cpu=True, report_to=[], seed=0, data_seed=0,
                  disable_tqdm=True)
    return TrainingArguments(**{**fields, **kwargs})


def adapter_tensors(model):
    return {k: v.clone() for k, v in fastlora.checkpoint.adapter_state_dict(model).items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_trains_resumes_and_reloads_every_method(name, tmp_path):
    config = CONFIGS[name]
    model = model_with(config)
    before = adapter_tensors(model)
    trainer = FastLoraTrainer(model=model, args=arguments(tmp_path / "run"), train_dataset=TokenLabels())
    trainer.train()
    trained = adapter_tensors(model)
    assert any(not torch.equal(trained[k], before[k]) for k in before)

    history = trainer.state.log_history
    method = config.method
    logged = [h for h in history if f"fastlora/{method}/layers" in h]
    assert len(logged) >= STEPS and logged[0][f"fastlora/{method}/layers"] == 4.0
    if name == "codyra":  # kappa_max = 10 after every step: the proximal step pruned every rank
        assert logged[-1][f"fastlora/{method}/active_ranks"] == 0.0
    if name == "cascade":  # cascade_interval = 2 in a 4-step run: a stage ends at step 2, not at the final step
        assert logged[-1][f"fastlora/{method}/cascades"] == 1.0

    for step in (2, STEPS):
        assert (tmp_path / "run" / f"checkpoint-{step}" / "fastlora_adapter" / "adapter_config.json").is_file()
    reloaded = fastlora.load_adapter(model_with(config).float(), tmp_path / "run" / f"checkpoint-{STEPS}"
                                     / "fastlora_adapter")
    ids = TokenLabels().ids[:5]
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, want, atol=1e-6)

    resumed_model = model_with(config)
    resumed = FastLoraTrainer(model=resumed_model, args=arguments(tmp_path / "run2"), train_dataset=TokenLabels())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for key, tensor in adapter_tensors(resumed_model).items():
        assert torch.allclose(tensor, trained[key], atol=1e-6), key


def test_regularization_joins_the_training_loss_only(tmp_path):
    model = model_with(CONFIGS["selective"])
    trainer = FastLoraTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenLabels())
    batch = {k: v[:4] for k, v in {"input_ids": TokenLabels().ids, "labels": TokenLabels().labels}.items()}
    plain = Trainer(model=model, args=arguments(tmp_path), train_dataset=TokenLabels())
    model.train()
    penalty = fastlora.regularization_loss(model).item()
    assert penalty > 0
    with torch.no_grad():
        assert trainer.compute_loss(model, batch).item() == pytest.approx(plain.compute_loss(model, batch).item()
                                                                          + penalty, rel=1e-6)
        model.eval()
        assert trainer.compute_loss(model, batch).item() == pytest.approx(plain.compute_loss(model, batch).item())


def test_plain_trainer_with_the_callback_runs_rules(tmp_path):
    model = model_with(CONFIGS["codyra"])
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=TokenLabels(),
                      callbacks=[FastLoraCallback(save_adapters=False)])
    trainer.train()
    stats = fastlora.adapter_stats(model)
    assert stats["fastlora/rank_selective_lora/active_ranks"] == 0.0
    assert stats["fastlora/rank_selective_lora/optimizer_steps"] == STEPS
    assert not list(tmp_path.glob("checkpoint-*/fastlora_adapter"))
    assert any("fastlora/rank_selective_lora/kappa" in h for h in trainer.state.log_history)


@pytest.mark.parametrize("total_steps, effect", [
    (500, "it ends in the dense phase (steps 1-250): no rank is pruned"),
    (6, "it stops at kappa=0.0017 of kappa_max=0.005, pruning less"),  # 3 dense steps, level ceil(50 / 3) = 17
    (2, None),  # a longer run: the pruned set is final after step 2, the kept ranks train on (nothing to warn)
    (STEPS, None)])
def test_a_codyra_schedule_longer_than_the_run_warns_at_train_begin(total_steps, effect, tmp_path):
    model = model_with(RankSelectiveLoraConfig(r=3, target_modules=TARGETS, total_steps=total_steps))
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=TokenLabels(),
                      callbacks=[FastLoraCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "FastLoraCallback" in str(w.message)]
    assert all(w.filename == __file__ for w in caught if "FastLoraCallback" in str(w.message))  # trainer.train()
    if effect is None:
        assert messages == []
    else:
        assert messages == [f"FastLoraCallback: the CoDyRA threshold schedule spans total_steps={total_steps} "
                            f"optimizer steps, but this run has max_steps={STEPS}: {effect}; set "
                            f"RankSelectiveLoraConfig(total_steps={STEPS})"]


@pytest.mark.parametrize("learning_rate, warned", [(1e-4, True), (5e-2, False)])
def test_a_run_in_which_no_selective_gate_moved_warns_at_train_end(learning_rate, warned, tmp_path):
    """At lr 1e-4 four AdamW steps move a score by ~4e-4, far from the 0.05 that switches a gate off;
    at lr 5e-2 the penalty switches gates within the run (counted in the logged gate_changes)."""
    model = model_with(SelectiveLoraConfig(r=2, target_modules=TARGETS))
    trainer = FastLoraTrainer(model=model, args=arguments(tmp_path, save_strategy="no", learning_rate=learning_rate),
                              train_dataset=TokenLabels())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    messages = [str(w.message) for w in caught if "no Selective LoRA gate switched" in str(w.message)]
    assert all(w.filename == __file__ for w in caught if "no Selective LoRA gate switched" in str(w.message))
    changes = fastlora.adapter_stats(model)["fastlora/selective_lora/gate_changes"]
    if warned:
        assert changes == 0 and len(messages) == 1
        rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
        mean = sum(rates) / len(rates)  # the linear decay's: below the peak 1e-4
        assert len(rates) == STEPS and mean < 0.9 * learning_rate
        assert f"run of {STEPS} optimizer steps" in messages[0]
        assert f"about {0.05 / mean:.0f} steps at this run's mean lr {mean:g}" in messages[0]
    else:
        assert changes > 0 and messages == []


@pytest.mark.parametrize("accepts_loss_kwargs, num_items, loss_func, scaled", [
    (True, 8, None, True),      # the model normalised over the accumulated batch: Trainer does not divide
    (True, None, None, False),  # no item count: Trainer divides the loss by the accumulation steps
    (False, 8, None, False),    # a model without loss kwargs: Trainer divides
    (False, None, len, True),   # a compute_loss_func normalises itself
])
def test_the_penalty_is_divided_for_accumulation_exactly_when_trainer_divides_the_loss(accepts_loss_kwargs, num_items,
                                                                                       loss_func, scaled):
    """FastLoraTrainer adds the penalty once per optimizer step: divided by the accumulation steps where
    Trainer.training_step divides the loss, not where the loss comes normalised over the whole batch."""
    trainer = FastLoraTrainer.__new__(FastLoraTrainer)  # the rule only: no model, no arguments
    trainer.model_accepts_loss_kwargs, trainer.compute_loss_func = accepts_loss_kwargs, loss_func
    assert trainer._loss_scaled_for_accumulation(num_items) is scaled
    trainer.loss_is_scaled_for_ga = not scaled  # a Trainer that states it (transformers' attribute) is believed
    assert trainer._loss_scaled_for_accumulation(num_items) is (not scaled)


def test_the_no_gate_moved_warning_states_the_margin_and_the_steps_it_needs():
    model = model_with(SelectiveLoraConfig(r=2, target_modules=TARGETS, score_init=1.0, threshold=0.3))
    with pytest.warns(UserWarning, match=r"no Selective LoRA gate switched in this run of 4 optimizer steps.*"
                                         r"score_init - threshold = 0\.7,.*about 700 steps at this run's mean lr "
                                         r"0\.001"):
        fastlora.trainer.warn_if_no_gate_moved(model, 4, 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlora.trainer.warn_if_no_gate_moved(model, 0, 1e-3)  # no step taken: nothing to say
        fastlora.trainer.warn_if_no_gate_moved(model_with(LoraConfig(r=2, target_modules=TARGETS)), 4, 1e-3)


def test_compute_loss_adds_the_penalty_once_per_optimizer_step(tmp_path):
    """With 2 accumulation steps the penalty is halved where Trainer leaves the loss undivided (it then
    enters both micro-batches' gradients at half weight) and added whole where Trainer divides the loss."""
    model = model_with(SelectiveLoraConfig(r=2, target_modules=TARGETS, sparsity_weight=0.5)).train()
    trainer = FastLoraTrainer(model=model, args=arguments(tmp_path, gradient_accumulation_steps=2),
                              train_dataset=TokenLabels())
    trainer.current_gradient_accumulation_steps = 2
    data = TokenLabels()
    batch = {key: torch.stack([data[i][key] for i in range(4)]) for key in ("input_ids", "labels")}
    penalty = fastlora.regularization_loss(model).item()
    assert penalty > 0
    for accepts, num_items, share in ((True, 4, 0.5), (False, 4, 1.0), (False, None, 1.0)):
        trainer.model_accepts_loss_kwargs = accepts
        plain = Trainer.compute_loss(trainer, model, batch, num_items_in_batch=num_items).item()
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items).item()
        assert loss == pytest.approx(plain + share * penalty, rel=1e-6), (accepts, num_items)
    model.eval()
    evaluated = Trainer.compute_loss(trainer, model, batch).item()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(evaluated)  # no penalty outside training


@pytest.mark.parametrize("steps, gate_changes, warned", [(1, 0, True), (4, 1, False), (4, 0, True), (0, 0, False)])
def test_the_no_gate_moved_warning_comes_only_after_steps_that_switched_no_gate(steps, gate_changes, warned,
                                                                              monkeypatch):
    model = model_with(SelectiveLoraConfig(r=2, target_modules=TARGETS))
    stats = fastlora.adapter_stats(model)
    monkeypatch.setattr(fastlora.trainer, "adapter_stats",
                        lambda m: {**stats, "fastlora/selective_lora/gate_changes": float(gate_changes)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastlora.trainer.warn_if_no_gate_moved(model, steps, 1e-3)
    assert len([w for w in caught if "no Selective LoRA gate switched" in str(w.message)]) == int(warned)


def test_on_log_adds_the_stats_to_the_logs_and_to_this_steps_history_entry_only():
    from transformers import TrainerControl, TrainerState
    model = model_with(SelectiveLoraConfig(r=2, target_modules=TARGETS))
    callback, state = FastLoraCallback(), TrainerState()
    state.global_step = 3
    logs = {"loss": 1.0}
    callback.on_log(None, state, TrainerControl(), logs=logs, model=model)  # no history yet: the logs only
    assert logs["fastlora/selective_lora/gate_changes"] == 0.0 and state.log_history == []
    state.log_history = [{"loss": 2.0, "step": 2}]  # another step's entry stays as it is
    callback.on_log(None, state, TrainerControl(), logs={}, model=model)
    assert state.log_history == [{"loss": 2.0, "step": 2}]
    state.log_history.append({"loss": 1.0, "step": 3})
    callback.on_log(None, state, TrainerControl(), logs={}, model=model)
    assert state.log_history[-1]["fastlora/selective_lora/gate_changes"] == 0.0


@pytest.mark.parametrize("name", ["lora", "codyra"])
def test_a_train_after_next_task_trains_the_new_adapters(name, tmp_path):
    """Trainer builds its optimizer once; after next_task its second train() would step the old adapters'
    tensors (the new ones flat, silently): FastLoraTrainer builds it again for the new ones."""
    model = model_with(CONFIGS[name])
    trainer = FastLoraTrainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=TokenLabels())
    trainer.train()
    first = trainer.optimizer
    fastlora.next_task(model)
    fresh = adapter_tensors(model)
    trainer.train()
    assert trainer.optimizer is not first
    trained = adapter_tensors(model)
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh if k.endswith(("lora_A", "lora_B")))


def test_a_given_optimizer_that_holds_no_adapter_is_refused_naming_the_fix(tmp_path):
    base = BertForSequenceClassification(tiny_bert(num_labels=2))
    stale = torch.optim.AdamW(base.parameters(), lr=1e-3)  # built before inject: W's, frozen now
    model = fastlora.inject(base, CONFIGS["lora"])
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=TokenLabels(),
                      optimizers=(stale, None), callbacks=[FastLoraCallback(save_adapters=False)])
    with pytest.raises(ValueError, match=r"FastLoraCallback: the optimizer holds none of the adapters' \d+ trainable "
                                         r"parameters .* set trainer.optimizer = None before train\(\)"):
        trainer.train()


def test_a_trainer_optimizer_holding_a_head_but_not_the_new_adapters_is_refused(tmp_path):
    """After next_task a plain Trainer keeps its first optimizer: it still holds the trained-in-full head, not
    the new adapters, which would not train (silently)."""
    model = model_with(LoraConfig(r=2, alpha=4.0, target_modules=TARGETS, modules_to_save=["classifier"]))
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=TokenLabels(),
                      callbacks=[FastLoraCallback(save_adapters=False)])
    trainer.train()
    fastlora.next_task(model)
    with pytest.raises(ValueError, match=r"holds none of the adapters' \d+ trainable parameters"):
        trainer.train()
    trainer.optimizer = None
    trainer.train()


def test_fast_lora_trainer_takes_the_model_argument_of_delayed_optimizer_creation(tmp_path):
    """Trainer calls create_optimizer(model) where it delays the optimizer (FSDP, SageMaker MP)."""
    model = model_with(CONFIGS["lora"])
    trainer = FastLoraTrainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=TokenLabels())
    optimizer = trainer.create_optimizer(model)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} >= \
        {id(p) for p in model.parameters() if p.requires_grad}


def test_a_trainer_optimizer_leaving_some_trainable_parameters_out_warns(tmp_path):
    model = model_with(CONFIGS["lora"])
    first = next(layer for _, layer in fastlora.adapter_layers(model))
    partial = torch.optim.AdamW(first.adapter.parameters(), lr=1e-3)
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no", max_steps=1),
                      train_dataset=TokenLabels(), optimizers=(partial, None),
                      callbacks=[FastLoraCallback(save_adapters=False)])
    with pytest.warns(RuntimeWarning, match=r"FastLoraCallback: \d+ trainable parameters are in none of the "
                                            r"optimizers .* so they will not train"):
        trainer.train()

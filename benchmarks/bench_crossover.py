"""Where the cublas plan starts to pay: one adapted layer's training calls run back to back over a
ladder of widths and token counts, PEFT against fastlora on the cublas and on the torch plan.

    python -m benchmarks.bench_crossover [--device cuda|cpu] [--quick] [--out PATH] [--budget-s S]

Setup of a training run with PEFT's defaults (as bench_model's): a d -> d layer of bf16 weights with
fp32 adapters, r = 16, dropout 0.05, under bf16 autocast (on the CPU: fp32, the torch plan only, a
check of the script). A call is the forward plus ``torch.autograd.grad`` of x and the factors.
Variants: ``peft`` (PEFT's lora.Linear), ``cublas`` and ``torch`` (``fastlora.accelerate`` over the
same PEFT layer, the plan forced by FASTLORA_BACKEND).

Timing: ``CALLS`` calls back to back, without a synchronize or a cache flush between them (as the
layers of a training step run), between two synchronizes: "ms" is that block's wall time per call,
the median over ``ROUNDS`` rounds in which the variants take turns (``host_instruments.time_blocks``,
garbage collection off). "host_us" is the time per call
the host spent before the block's final synchronize: when it is close to "ms", the device waited
for the host, and the variant with less host work per call wins whatever its bytes. The sweep shows
from which size (tokens x d x d) the cublas plan's fewer bytes pay for its longer host path, against
PEFT and against the torch plan, and "size_rule": the size below which ``auto`` should take the torch
plan (``size_rule``; it goes into ``fastlora.kernels.plans.SIZE_RULE`` with the committed JSON as its
source). JSON: benchmarks/results/crossover_<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from .bench_adapted_linear import RESULTS, device_name, peft_layer, pick_device, slug
from .bench_host import compared_plans
from .host_instruments import forced_plan, time_blocks
from .isolated import run_child, write_json
from .train_step import synchronize

WIDTHS = (256, 512, 768, 1024, 2048, 4096)
TOKENS = (512, 2048, 8192)
QUICK_WIDTHS, QUICK_TOKENS = (32, 64), (16,)
R, SCALE, DROPOUT = 16, 2.0, 0.05
WARMUP, ROUNDS, CALLS = 3, 5, 20
QUICK_REPEATS = (1, 2, 3)
#: seconds that must be left to start gpu_check's child process (imports, first compiles)
RESERVE_S = {"cuda": 20.0, "cpu": 5.0}
#: seconds of the section's time kept back from the sweep for the child's exit and its JSON
EXIT_MARGIN_S = 3.0


def _layers(n: int, d: int, device: torch.device, plans: tuple[str, ...]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(variant -> layer, x, dy): PEFT's layer with fp32 adapters over a half-precision base on a GPU."""
    import fastlora

    gen = torch.Generator(device=device).manual_seed(d + n)
    rnd = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
    weight, a, b = rnd(d, d) * d ** -0.5, rnd(R, d) * d ** -0.5, rnd(d, R) * 0.02
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers = {}
    for name in ("peft", *plans):
        layer = peft_layer(weight, a, b, SCALE, DROPOUT)
        layer.base_layer.to(half)
        layers[name] = layer if name == "peft" else fastlora.accelerate(layer)
    return layers, rnd(n, d).to(half).requires_grad_(), rnd(n, d).to(half)


def _call(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    autocast = torch.autocast(x.device.type, dtype=x.dtype) if x.device.type == "cuda" else contextlib.nullcontext()

    def call():
        with autocast:
            y = layer(x)
        return torch.autograd.grad(y, params, dy)
    return call


def measure_shape(n: int, d: int, device: torch.device, repeats: tuple[int, int, int]) -> dict:
    """One shape's row: ms and host_us per variant, and the fastest variant."""
    layers, x, dy = _layers(n, d, device, compared_plans(device))
    runs = {name: _call(layer, x, dy) for name, layer in layers.items()}
    times = time_blocks(runs, *repeats, sync=functools.partial(synchronize, device), scope=forced)
    ms = {name: statistics.median(wall for wall, _ in rows) / 1e3 for name, rows in times.items()}
    host = {name: statistics.median(issued for _, issued in rows) for name, rows in times.items()}
    return {"n": n, "d": d, "gemm_gflop": 2 * 2 * n * d * d / 1e9, "ms": ms, "host_us": host,
            "vs_peft": {name: ms[name] / ms["peft"] for name in ms}, "fastest": min(ms, key=ms.__getitem__)}


def forced(name: str):
    """FASTLORA_BACKEND = ``name`` for a fastlora variant (accelerate's layers take ``auto``); PEFT's
    layer ignores it."""
    return forced_plan(name) if name != "peft" else contextlib.nullcontext()


def _keeps_winning_from(ladder: list[dict], versus: str) -> Optional[dict]:
    """The first row of ``ladder`` from which the cublas plan is faster than ``versus`` at every later
    row (None: the last row loses, or the ladder is empty)."""
    winning = [row["ms"]["cublas"] < row["ms"][versus] for row in ladder]
    return next((row for i, row in enumerate(ladder) if all(winning[i:])), None)


def crossover(rows: list[dict], versus: str) -> dict:
    """Per token count, the smallest width from which the cublas plan is faster than ``versus`` at every
    larger measured width (None: at none)."""
    out = {}
    for n in sorted({row["n"] for row in rows}):
        ladder = sorted((row for row in rows if row["n"] == n and "cublas" in row["ms"]), key=lambda row: row["d"])
        first = _keeps_winning_from(ladder, versus)
        out[str(n)] = first["d"] if first is not None else None
    return out


def _gemm_size(row: dict) -> int:
    """The row's base-GEMM size n x d x d (multiply-adds), as ``plans.SizeRule`` counts a layer."""
    return row["n"] * row["d"] ** 2


def size_rule(rows: list[dict]) -> Optional[int]:
    """``plans.SizeRule.torch_below`` read from the sweep: the smallest base-GEMM size n x d x d from which
    the cublas plan is faster than the torch plan at every larger measured size (the torch plan below it);
    None when the cublas plan is faster everywhere (no rule needed) or nowhere consistently."""
    ladder = sorted((row for row in rows if {"cublas", "torch"} <= set(row["ms"])), key=_gemm_size)
    first = _keeps_winning_from(ladder, "torch")
    return None if first is None or first is ladder[0] else _gemm_size(first)


def summary_of(report: dict) -> str:
    rows = report["rows"]
    failed = f"; {len(report['errors'])} shapes failed" if report.get("errors") else ""
    cut = f"; {report['cut']}" if "cut" in report else ""
    if not any("cublas" in row["ms"] for row in rows):
        return f"{len(rows)} shapes, torch plan vs PEFT " + ", ".join(
            f"N={row['n']} d={row['d']} {row['vs_peft']['torch']:.2f}x" for row in rows) + failed + cut
    return ("cublas faster than PEFT from d = " + ", ".join(f"{d} (N={n})" for n, d in report["vs_peft"].items())
            + "; than the torch plan from d = " + ", ".join(f"{d} (N={n})" for n, d in report["vs_torch"].items())
            + f"; size rule: torch_below = {report['size_rule']}" + failed + cut)


def shapes(quick: bool) -> list[tuple[int, int]]:
    """(tokens, width) of the sweep, smallest base GEMM first: a sweep cut for time keeps the small sizes, where
    the size rule is decided."""
    widths, tokens = (QUICK_WIDTHS, QUICK_TOKENS) if quick else (WIDTHS, TOKENS)
    return sorted(((n, d) for n in tokens for d in widths), key=lambda shape: (shape[0] * shape[1] ** 2, shape))


def _derive(report: dict, cuda: bool) -> None:
    """The sweep's conclusions from the rows so far (a sweep killed midway leaves them in its JSON)."""
    if cuda:
        report["vs_peft"], report["vs_torch"] = crossover(report["rows"], "peft"), crossover(report["rows"], "torch")
        report["size_rule"] = size_rule(report["rows"])
    report["summary"] = summary_of(report)


def run(device: torch.device, quick: bool, out: Path, budget_s: Optional[float] = None) -> dict:
    """The sweep, the JSON rewritten to ``out`` after every shape; with ``budget_s``, the shapes whose turn
    comes after that many seconds (counting the last shape's time as the next one's) are left out ("cut")."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    repeats = QUICK_REPEATS if quick else (WARMUP, ROUNDS, CALLS)
    report = {"device": device_name(device), "torch": torch.__version__, "plans": list(compared_plans(device)),
              "setup": {"r": R, "scale": SCALE, "dropout": DROPOUT, "weights": "bfloat16" if device.type == "cuda"
                        else "float32", "adapters": "float32", "repeats": dict(zip(("warmup", "rounds", "calls"),
                                                                                  repeats))},
              "rows": []}
    sweep, last_s = shapes(quick), 0.0
    for done, (n, d) in enumerate(sweep):
        if deadline is not None and time.monotonic() + last_s > deadline:
            report["cut"] = f"{done} of {len(sweep)} shapes run (time budget): up to N={sweep[done - 1][0]} " \
                            f"d={sweep[done - 1][1]}" if done else f"0 of {len(sweep)} shapes run (time budget)"
            print(report["cut"], flush=True)
            break
        began = time.monotonic()
        try:
            row = measure_shape(n, d, device, repeats)
        except Exception:  # noqa: BLE001 - one failing shape is recorded, the sweep goes on
            report.setdefault("errors", {})[f"N={n} d={d}"] = traceback.format_exc(limit=-8)
            print(f"N={n} d={d}: failed", flush=True)
        else:
            report["rows"].append(row)
            print(f"N={n} d={d}: " + ", ".join(f"{k} {v:.3f} ms ({row['host_us'][k]:.0f} us host)"
                                               for k, v in row["ms"].items()), flush=True)
        last_s = time.monotonic() - began
        _derive(report, device.type == "cuda")
        write_json(out, report)
    _derive(report, device.type == "cuda")
    write_json(out, report)
    return report


def section(ctx) -> dict:
    """gpu_check section "crossover": this sweep in a child process, given the section's time less
    ``EXIT_MARGIN_S``; a child killed at the deadline still gives the shapes it measured."""
    if not ctx.has(RESERVE_S[ctx.device.type]):
        return {"status": "skipped", "reason": "time budget", "summary": "skipped for time"}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fastlora_crossover_") as tmp:
        out = Path(tmp) / "crossover.json"
        args = ["--device", ctx.device.type, "--out", str(out), "--budget-s", f"{ctx.left() - EXIT_MARGIN_S:.1f}",
                *(["--quick"] if ctx.quick else [])]
        child = run_child("benchmarks.bench_crossover", args, out, timeout_s=ctx.left())
    report = child["result"]
    if report is not None and report["rows"] and (child["returncode"] == 0 or child["timed_out"]):
        if child["timed_out"]:
            report["cut"] = report.get("cut", "killed at the section's deadline")
            report["summary"] = summary_of(report)
        return {"status": "ok", **report}
    return {"status": "error", "partial": report, "summary": f"exit status {child['returncode']}",
            "output": child["output"]}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_crossover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--quick", action="store_true", help="two tiny shapes, few repetitions (a check of the script)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: see the module docstring)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="leave out the shapes whose turn comes after this many seconds (default: none left out)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    out = args.out or RESULTS / f"crossover_{slug(device_name(device))}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run(device, args.quick, out, args.budget_s)
    print(report["summary"])
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

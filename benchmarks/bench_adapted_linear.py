"""Speed and memory of one adapted Linear: frozen base, every fastlora plan, PEFT LoRA, every method.

    python -m benchmarks.bench_adapted_linear [--device cuda|cpu] [--quick] [--out PATH]

For each shape (N tokens, d_in -> d_out) and rank r: the median time of the forward
(no grad) and of forward + backward (input gradient, plus the adapter's factor
gradients, random dy), the peak memory of one forward + backward above what was
allocated before it, and the GPU launches of one forward + backward (see
benchmarks/timing.py). Raw-op variants (``adapted_linear`` on bare tensors, factors in
the compute dtype):

- ``base``: ``F.linear`` with the frozen weight (fwd+bwd = input gradient only);
- ``fastlora_<plan>``: ``adapted_linear`` forced to each execution plan the device runs
  ("triton", "cublas", "torch" on CUDA; "torch" on CPU), and ``fastlora_auto``;
- ``peft`` / ``peft_dropout``: ``peft.tuners.lora.Linear`` around an ``nn.Linear``
  (same W, A, B and scale; adapter kept in the compute dtype), when peft is installed;
- ``fastlora_auto_gate_off``: gate 0 (the low-rank path must cost nothing);
- ``fastlora_auto_half_masked``: half the ranks pruned; fastlora compacts masked ranks,
  so the user layer passes the active half (rank r/2);
- ``fastlora_auto_dropout``: dropout 0.1 on the adapter input (fastlora regenerates the
  mask from a seed, PEFT keeps the dropped copy of x for the backward).

Per-method cases (``AdapterLinear`` of each method with backend "auto", see
benchmarks/bench_methods.py) go under each case's "methods"; "auto_default" is the plan ``auto`` runs
on CUDA by rule, and "auto_choices" the measured winners recorded so far (empty unless the plan cache
holds tuned shapes: ``fastlora.tune``). Ratios (vs base, vs PEFT) come from the same run.

CUDA (default when available): bf16, ``triton.testing.do_bench`` medians. CPU (a smoke
check of the script, not a measurement): float32, ``time.perf_counter`` medians, peak
memory and launches null. JSON goes to benchmarks/results/<device-name-slug>[_quick].json
(CPU: cpu[_quick].json).
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import platform
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlora.kernels import PLANS, adapted_linear
from fastlora.kernels.plans import DEFAULT_PLAN, auto_choices

from .bench_methods import method_jobs
from .report_text import error_line
from .timing import measure

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}
FULL_SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008)]
FULL_RANKS = [16, 64]
QUICK_SHAPES = [(512, 256, 384)]
QUICK_RANKS = [8]
DROPOUT = 0.1
SCALE = 2.0  # alpha / r with alpha = 2 r
MEASURES = ("fwd_ms", "fwd_bwd_ms")
AUTO_VARIANTS = {"fastlora_auto": {}, "fastlora_auto_gate_off": {"gate": 0.0},
                 "fastlora_auto_half_masked": {"half": True}, "fastlora_auto_dropout": {"dropout": DROPOUT}}
PEFT_VARIANTS = ("peft", "peft_dropout")
METHOD = ("{timer}; fwd under no_grad (method layers in eval mode); fwd_bwd = forward + autograd.grad of y "
          "with a random dy w.r.t. x and the trainable factors (method layers in train mode); peak = max allocated "
          "during one fwd_bwd minus allocated before it (null on CPU); launches = GPU kernels, copies and memsets "
          "of one fwd_bwd (torch.profiler; null on CPU)")


def method_note(device: torch.device) -> str:
    """How the numbers of ``bench_case`` are measured on ``device``."""
    timer = "triton.testing.do_bench median" if device.type == "cuda" else "time.perf_counter median (CPU smoke check)"
    return METHOD.format(timer=timer)


def device_plans(device: torch.device) -> tuple[str, ...]:
    """The plans benchmarked on ``device``: every plan on CUDA, the torch plan on CPU."""
    return PLANS if device.type == "cuda" else ("torch",)


def peft_layer(weight: Tensor, a: Tensor, b: Tensor, scale: float, dropout: float) -> torch.nn.Module:
    """PEFT's LoRA layer y = x W^T + scale * (dropout(x) A^T) B^T in train mode: weight
    (d_out, d_in) copied and frozen, A (r, d_in) and B (d_out, r) copied, in weight's
    dtype (PEFT keeps the adapter in the base dtype when injected this way)."""
    from peft import LoraConfig, inject_adapter_in_model

    d_out, d_in = weight.shape
    r = a.shape[0]
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(d_in, d_out, bias=False, device=weight.device, dtype=weight.dtype)
    config = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=dropout, target_modules=["lin"])
    layer = inject_adapter_in_model(config, model).lin.to(weight.device, weight.dtype)
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    layer.base_layer.weight.requires_grad_(False)
    return layer


def variant_names(plans: tuple[str, ...]) -> list[str]:
    """Names of the raw variants ``raw_variants`` builds for these plans (PEFT's when installed)."""
    peft = list(PEFT_VARIANTS) if version("peft") is not None else []
    return ["base", *(f"fastlora_{plan}" for plan in plans), *AUTO_VARIANTS, *peft]


def raw_variants(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, plans: tuple[str, ...]) -> dict:
    """name -> (forward, params) of the raw-op variants (see the module docstring)."""
    half = a.shape[0] // 2
    a_half = a.detach()[:half].clone().requires_grad_(True)
    b_half = b.detach()[:, :half].clone().requires_grad_(True)

    def fl(backend, gate=1.0, dropout=0.0, half=False):
        a_, b_ = (a_half, b_half) if half else (a, b)
        forward = lambda: adapted_linear(x, weight, None, a_, b_, scale=SCALE, gate=gate,  # noqa: E731
                                         dropout=dropout, dropout_seed=1 if dropout else None, backend=backend)
        return forward, [x, a_, b_]

    variants = {"base": (lambda: F.linear(x, weight), [x])}
    variants.update({f"fastlora_{plan}": fl(plan) for plan in plans})
    variants.update({name: fl("auto", **kwargs) for name, kwargs in AUTO_VARIANTS.items()})
    if version("peft") is not None:
        for name, p in zip(PEFT_VARIANTS, (0.0, DROPOUT)):
            layer = peft_layer(weight, a.detach(), b.detach(), SCALE, p)
            params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            variants[name] = ((lambda layer=layer: layer(x)), params)
    return variants


def case_tensors(n: int, d_in: int, d_out: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    """x (n, d_in) and factors A (r, d_in), B (d_out, r) requiring grad, frozen W (d_out, d_in),
    random dy (n, d_out), all in ``dtype`` from a fixed seed."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, s=1.0, grad=False):
        t = torch.randn(*shape, device=device, generator=gen, dtype=torch.float32) * s
        return t.to(dtype).requires_grad_(grad)

    return {"x": rnd(n, d_in, grad=True), "weight": rnd(d_out, d_in, s=d_in ** -0.5),
            "a": rnd(r, d_in, s=d_in ** -0.5, grad=True), "b": rnd(d_out, r, s=0.02, grad=True),
            "dy": rnd(n, d_out)}


def run_jobs(jobs: dict[str, Callable[[], dict]], keep_going: Callable[[], bool]) -> tuple[dict, list, dict]:
    """(results, names skipped once ``keep_going()`` said False, name -> traceback of the jobs that
    raised): one failing variant does not stop the others."""
    results, skipped, errors = {}, [], {}
    for name, job in jobs.items():
        if not keep_going():
            skipped.append(name)
            continue
        try:
            results[name] = job()
        except Exception:  # noqa: BLE001 - recorded in the report
            errors[name] = traceback.format_exc(limit=-10)
            print(f"  {name:38s} failed: {error_line(errors[name])}", flush=True)
            continue
        rank = f" (rank {results[name]['active_rank']})" if "active_rank" in results[name] else ""
        _print_row(name + rank, results[name])
    return results, skipped, errors


def bench_case(n: int, d_in: int, d_out: int, r: int, device: torch.device,
               keep_going: Callable[[], bool] = lambda: True, plans: Optional[tuple[str, ...]] = None) -> dict:
    """Every variant and method at one shape: x (n, d_in), W (d_out, d_in), rank r; a variant per plan
    of ``plans`` (default: every plan the device runs).

    keep_going: asked before each variant and method; once it says False the rest are
    listed under "skipped_for_time" (a time budget). Variants that raise are listed with
    their traceback under "errors".
    """
    dtype, plans = DTYPES[device.type], plans or device_plans(device)
    t = case_tensors(n, d_in, d_out, r, device, dtype)
    raw = {name: functools.partial(measure, forward, params, t["dy"], device)
           for name, (forward, params) in raw_variants(t["x"], t["weight"], t["a"], t["b"], plans).items()}
    results, skipped, errors = run_jobs(raw, keep_going)
    methods, skipped_methods, method_errors = run_jobs(method_jobs(t["x"], t["weight"], t["dy"], r, "auto"),
                                                       keep_going)
    base = results.get("base")
    return {"n": n, "d_in": d_in, "d_out": d_out, "r": r, "dtype": str(dtype).replace("torch.", ""),
            "results": results, "ratios": _ratios(results) if base else {},
            "methods": methods, "method_ratios": {name: _ratio_row(res, base, results.get("peft"))
                                                  for name, res in methods.items()} if base else {},
            "auto_default": DEFAULT_PLAN, "auto_choices": auto_choices(), "skipped_for_time": skipped + skipped_methods,
            "errors": {**errors, **{f"method {k}": v for k, v in method_errors.items()}}}


def _print_row(name: str, res: dict) -> None:
    peak = res["fwd_bwd_peak_mib"]
    peak = "n/a" if peak is None else f"{peak:9.1f} MiB"
    print(f"  {name:38s} fwd {res['fwd_ms']:8.3f} ms  fwd+bwd {res['fwd_bwd_ms']:8.3f} ms  peak {peak}", flush=True)


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """num / den, None when either is missing (peak memory on CPU) or den is not positive."""
    return num / den if num is not None and den is not None and den > 0 else None


def _ratio_row(res: dict, base: dict, peft: Optional[dict]) -> dict:
    """{m}_vs_base for the times m, and {m}_vs_peft for the times and peak memory (with PEFT)."""
    row = {f"{k}_vs_base": _ratio(res[k], base[k]) for k in MEASURES}
    if peft is not None:
        row.update({f"{k}_vs_peft": _ratio(res[k], peft[k]) for k in (*MEASURES, "fwd_bwd_peak_mib")})
    return row


def _ratios(results: dict) -> dict:
    """Per raw variant but base: ratios vs base and vs the PEFT variant of the same dropout
    setting (PEFT variants vs base only)."""
    out = {}
    for name, res in results.items():
        if name == "base":
            continue
        peft = None if name in PEFT_VARIANTS else results.get("peft_dropout" if name.endswith("dropout") else "peft")
        out[name] = _ratio_row(res, results["base"], peft)
    return out


def skipped_variants(device: torch.device) -> list[str]:
    """Raw variants left out on this device: plans it does not run, PEFT's without peft."""
    plans = device_plans(device)
    skipped = [f"fastlora_{plan}" for plan in PLANS if plan not in plans]
    return skipped + ([] if version("peft") is not None else list(PEFT_VARIANTS))


def version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pick_device(name: Optional[str]) -> torch.device:
    """The requested device (default cuda when available, else cpu); a clear error for a missing GPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_adapted_linear --device cuda needs a CUDA GPU; none found (use --device cpu for a smoke run).")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu (<processor>)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or 'unknown'})"


def slug(name: str) -> str:
    """``name`` as a file-name part: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_adapted_linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(DTYPES), default=None,
                        help="cuda (the measurement; default when available) or cpu (a smoke check)")
    parser.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES}, r={QUICK_RANKS}")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/<device>[_quick].json, cpu[_quick].json on CPU)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    is_cuda = device.type == "cuda"
    name = device_name(device)
    shapes, ranks = (QUICK_SHAPES, QUICK_RANKS) if args.quick else (FULL_SHAPES, FULL_RANKS)
    cases = []
    for n, d_in, d_out in shapes:
        for r in ranks:
            print(f"N={n} {d_in}->{d_out} r={r} {DTYPES[device.type]} on {name}", flush=True)
            cases.append(bench_case(n, d_in, d_out, r, device))
    report = {"device": name, "torch": torch.__version__, "triton": version("triton"),
              "peft": version("peft"), "quick": args.quick, "plans": list(device_plans(device)),
              "dropout": DROPOUT, "skipped": skipped_variants(device),
              "method": method_note(device),
              "cases": cases}
    out = args.out or RESULTS / f"{slug(name) if is_cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

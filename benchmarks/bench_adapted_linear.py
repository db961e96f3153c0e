"""Speed and memory of one adapted Linear: frozen base, fastlora (Triton, torch), PEFT LoRA, every method.

    python -m benchmarks.bench_adapted_linear [--device cuda|cpu] [--quick] [--out PATH]

For each shape (N tokens, d_in -> d_out) and rank r: the median time of the forward
(no grad) and of forward + backward (input gradient, plus the adapter's factor
gradients), and the peak memory of one forward + backward above what was allocated
before it (see benchmarks/timing.py). Raw-op variants (``adapted_linear`` on bare
tensors, factors in the compute dtype):

- ``base``: ``F.linear`` with the frozen weight (fwd+bwd = input gradient only);
- ``fastlora_triton`` / ``fastlora_torch``: ``adapted_linear`` on either backend;
- ``peft`` / ``peft_dropout``: ``peft.tuners.lora.Linear`` around an ``nn.Linear``
  (same W, A, B and scale; adapter kept in the compute dtype), when peft is installed;
- ``fastlora_<backend>_gate_off``: gate 0 (the low-rank path must cost nothing);
- ``fastlora_<backend>_half_masked``: half the ranks pruned; fastlora compacts masked
  ranks, so the user layer passes the active half (rank r/2);
- ``fastlora_<backend>_dropout``: dropout 0.1 on the adapter input (fastlora regenerates
  the mask from a seed, PEFT keeps the dropped copy of x for the backward).

Per-method cases (``AdapterLinear`` of each method, see benchmarks/bench_methods.py) go
under each case's "methods". Ratios (vs base, vs PEFT) come from the same run.

CUDA (default when available): bf16, backend "triton", ``triton.testing.do_bench``
medians. CPU (a smoke check of the script, not a measurement): float32, backend "torch"
(the Triton variants are listed under "skipped"), ``time.perf_counter`` medians, peak
memory null. JSON goes to benchmarks/results/<device-name-slug>[_quick].json (CPU:
cpu[_quick].json).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlora.kernels import adapted_linear

from .bench_methods import bench_methods
from .timing import measure

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}
BACKENDS = {"cuda": "triton", "cpu": "torch"}
FULL_SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008)]
FULL_RANKS = [16, 64]
QUICK_SHAPES = [(512, 256, 384)]
QUICK_RANKS = [8]
DROPOUT = 0.1
SCALE = 2.0  # alpha / r with alpha = 2 r
MEASURES = ("fwd_ms", "fwd_bwd_ms")
BACKEND_SUFFIXES = ("", "_gate_off", "_half_masked", "_dropout")
PEFT_VARIANTS = ("peft", "peft_dropout")


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


def _raw_variants(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, backend: str) -> dict:
    """name -> (forward, params) of the raw-op variants for ``backend`` (plus fastlora_torch and
    PEFT when available)."""
    half = a.shape[0] // 2
    a_half = a.detach()[:half].clone().requires_grad_(True)
    b_half = b.detach()[:, :half].clone().requires_grad_(True)

    def fl(backend_, a_=a, b_=b, gate=1.0, dropout=0.0):
        return lambda: adapted_linear(x, weight, None, a_, b_, scale=SCALE, gate=gate, dropout=dropout,
                                      dropout_seed=1 if dropout else None, backend=backend_)

    fast = f"fastlora_{backend}"
    variants = {
        "base": (lambda: F.linear(x, weight), [x]),
        fast: (fl(backend), [x, a, b]),
        "fastlora_torch": (fl("torch"), [x, a, b]),  # the entry above when backend is "torch"
        f"{fast}_gate_off": (fl(backend, gate=0.0), [x, a, b]),
        f"{fast}_half_masked": (fl(backend, a_half, b_half), [x, a_half, b_half]),
        f"{fast}_dropout": (fl(backend, dropout=DROPOUT), [x, a, b]),
    }
    if _version("peft") is not None:
        for name, p in zip(PEFT_VARIANTS, (0.0, DROPOUT)):
            layer = peft_layer(weight, a.detach(), b.detach(), SCALE, p)
            params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            variants[name] = ((lambda layer=layer: layer(x)), params)
    return variants


def bench_case(n: int, d_in: int, d_out: int, r: int, device: torch.device) -> dict:
    """Every variant and method at one shape: x (n, d_in), W (d_out, d_in), rank r."""
    dtype, backend = DTYPES[device.type], BACKENDS[device.type]
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, s=1.0, grad=False):
        t = torch.randn(*shape, device=device, generator=gen, dtype=torch.float32) * s
        return t.to(dtype).requires_grad_(grad)

    x = rnd(n, d_in, grad=True)
    weight = rnd(d_out, d_in, s=d_in ** -0.5)
    a = rnd(r, d_in, s=d_in ** -0.5, grad=True)
    b = rnd(d_out, r, s=0.02, grad=True)
    dy = torch.ones(n, d_out, device=device, dtype=dtype)  # gradient of sum(y)
    results = {}
    for name, (forward, params) in _raw_variants(x, weight, a, b, backend).items():
        results[name] = measure(forward, params, dy, device)
        _print_row(name, results[name])
    methods = bench_methods(x, weight, dy, r, backend)
    for name, res in methods.items():
        _print_row(f"method {name} (rank {res['active_rank']})", res)
    return {"n": n, "d_in": d_in, "d_out": d_out, "r": r, "dtype": str(dtype).replace("torch.", ""),
            "results": results, "ratios": _ratios(results),
            "methods": methods, "method_ratios": {name: _ratio_row(res, results["base"], results.get("peft"))
                                                  for name, res in methods.items()}}


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
    """Raw variants left out on this device: the Triton ones on CPU, PEFT's without peft."""
    skipped = [f"fastlora_triton{s}" for s in BACKEND_SUFFIXES] if BACKENDS[device.type] != "triton" else []
    return skipped + ([] if _version("peft") is not None else list(PEFT_VARIANTS))


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device(name: Optional[str]) -> torch.device:
    """The requested device (default cuda when available, else cpu); a clear error for a missing GPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_adapted_linear --device cuda needs a CUDA GPU; none found (use --device cpu for a smoke run).")
    return torch.device(name)


def _slug(name: str) -> str:
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
    device = _device(args.device)
    is_cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if is_cuda else f"cpu ({platform.processor() or 'unknown'})"
    shapes, ranks = (QUICK_SHAPES, QUICK_RANKS) if args.quick else (FULL_SHAPES, FULL_RANKS)
    cases = []
    for n, d_in, d_out in shapes:
        for r in ranks:
            print(f"N={n} {d_in}->{d_out} r={r} {DTYPES[device.type]} on {device_name}", flush=True)
            cases.append(bench_case(n, d_in, d_out, r, device))
    timer = "triton.testing.do_bench median" if is_cuda else "time.perf_counter median (CPU smoke check)"
    report = {"device": device_name, "torch": torch.__version__, "triton": _version("triton"),
              "peft": _version("peft"), "quick": args.quick, "backend": BACKENDS[device.type],
              "dropout": DROPOUT, "skipped": skipped_variants(device),
              "method": f"{timer}; fwd under no_grad (method layers in eval mode); fwd_bwd = forward + "
                        "autograd.grad of sum(y) w.r.t. x and the trainable factors (method layers in train "
                        "mode); peak = max allocated during one fwd_bwd minus allocated before it (null on CPU)",
              "cases": cases}
    out = args.out or RESULTS / f"{_slug(device_name) if is_cuda else 'cpu'}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

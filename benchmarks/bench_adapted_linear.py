"""Speed and memory of one adapted Linear on a GPU: frozen base, fastlora (Triton, torch), PEFT LoRA.

    python -m benchmarks.bench_adapted_linear [--quick] [--out PATH]

For each shape (N tokens, d_in -> d_out) and rank r, in bf16: the median time
(``triton.testing.do_bench``) of the forward (no grad) and of forward + backward
(input gradient, plus the adapter's factor gradients), and the peak memory of one
forward + backward above what was allocated before it. Variants:

- ``base``: ``F.linear`` with the frozen weight (fwd+bwd = input gradient only);
- ``fastlora_triton`` / ``fastlora_torch``: ``adapted_linear`` on either backend;
- ``peft``: ``peft.tuners.lora.Linear`` around an ``nn.Linear`` (when peft imports);
- ``fastlora_triton_gate_off``: gate 0 (the low-rank path must cost nothing);
- ``fastlora_triton_half_masked``: half the ranks pruned; fastlora compacts masked
  ranks, so the user layer passes the active half (rank r/2);
- ``*_dropout``: dropout 0.1 on the adapter input (fastlora regenerates the mask
  from a seed, PEFT keeps the dropped copy of x for the backward).

Ratios (vs base, vs PEFT) come from the same run. JSON goes to
benchmarks/results/<device-name-slug>[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE = torch.bfloat16
FULL_SHAPES = [(8192, 4096, 4096), (8192, 4096, 11008)]
FULL_RANKS = [16, 64]
QUICK_SHAPES = [(512, 256, 384)]
QUICK_RANKS = [8]
DROPOUT = 0.1


def _median_ms(fn) -> float:
    import triton.testing

    ms = triton.testing.do_bench(fn, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def _peak_mib(fn) -> float:
    """Peak memory (MiB) of one call of ``fn`` above the memory allocated before it."""
    fn()  # autotuning and caches first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _measure(forward, params) -> dict:
    """fwd (no grad), fwd+bwd (grads of ``params``) medians in ms, and fwd+bwd peak memory."""
    def fwd():
        with torch.no_grad():
            forward()

    def fwd_bwd():
        y = forward()
        torch.autograd.grad(y, params, torch.ones_like(y))

    return {"fwd_ms": _median_ms(fwd), "fwd_bwd_ms": _median_ms(fwd_bwd), "fwd_bwd_peak_mib": _peak_mib(fwd_bwd)}


def _peft_layer(weight, r, alpha, dropout):
    """PEFT's LoRA layer around an nn.Linear holding ``weight`` (frozen), B random; or None."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    d_out, d_in = weight.shape
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(d_in, d_out, bias=False, device=weight.device, dtype=weight.dtype)
    model.lin.weight.data.copy_(weight)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["lin"])
    layer = inject_adapter_in_model(config, model).lin.to(weight.device, weight.dtype)
    layer.base_layer.weight.requires_grad_(False)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def bench_case(n: int, d_in: int, d_out: int, r: int, dev: torch.device) -> dict:
    from fastlora.kernels import adapted_linear

    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, s=1.0, grad=False):
        return (torch.randn(*shape, device=dev, generator=gen, dtype=torch.float32) * s).to(DTYPE).requires_grad_(grad)

    x = rnd(n, d_in, grad=True)
    weight = rnd(d_out, d_in, s=d_in ** -0.5)
    a = rnd(r, d_in, s=d_in ** -0.5, grad=True)
    b = rnd(d_out, r, s=0.02, grad=True)
    half = r // 2
    a_half = a.detach()[:half].clone().requires_grad_(True)
    b_half = b.detach()[:, :half].clone().requires_grad_(True)
    scale = 2.0  # alpha / r with alpha = 2 r

    def fl(backend, a_=a, b_=b, gate=1.0, dropout=0.0):
        return lambda: adapted_linear(x, weight, None, a_, b_, scale=scale, gate=gate, dropout=dropout,
                                      dropout_seed=1 if dropout else None, backend=backend)

    variants = {
        "base": (lambda: F.linear(x, weight), [x]),
        "fastlora_triton": (fl("triton"), [x, a, b]),
        "fastlora_torch": (fl("torch"), [x, a, b]),
        "fastlora_triton_gate_off": (fl("triton", gate=0.0), [x, a, b]),
        "fastlora_triton_half_masked": (fl("triton", a_half, b_half), [x, a_half, b_half]),
        "fastlora_triton_dropout": (fl("triton", dropout=DROPOUT), [x, a, b]),
    }
    for name, p in (("peft", 0.0), ("peft_dropout", DROPOUT)):
        layer = _peft_layer(weight, r, 2 * r, p)
        if layer is not None:
            layer.lora_A["default"].weight.data.copy_(a.detach())
            lora = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            variants[name] = ((lambda layer=layer: layer(x)), [x, *lora])
    results = {}
    for name, (forward, params) in variants.items():
        results[name] = _measure(forward, params)
        print(f"  {name:30s} fwd {results[name]['fwd_ms']:8.3f} ms  fwd+bwd {results[name]['fwd_bwd_ms']:8.3f} ms  "
              f"peak {results[name]['fwd_bwd_peak_mib']:9.1f} MiB", flush=True)
    return {"n": n, "d_in": d_in, "d_out": d_out, "r": r, "dtype": str(DTYPE).replace("torch.", ""),
            "results": results, "ratios": _ratios(results)}


def _ratios(results: dict) -> dict:
    """time / base time and time / PEFT time (same dropout setting), per variant and measure."""
    base = results["base"]
    out = {}
    for name, res in results.items():
        if name == "base":
            continue
        row = {f"{k}_vs_base": res[k] / base[k] for k in ("fwd_ms", "fwd_bwd_ms")}
        peft = results.get("peft_dropout" if name.endswith("dropout") else "peft")
        if peft is not None and not name.startswith("peft"):
            row.update({f"{k}_vs_peft": res[k] / peft[k] for k in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_peak_mib")
                        if peft[k] > 0})
        out[name] = row
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_adapted_linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES}, r={QUICK_RANKS}")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_adapted_linear needs a CUDA GPU (the Triton kernels are timed on the device); none found.")
    import triton

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    device_name = torch.cuda.get_device_name()
    shapes, ranks = (QUICK_SHAPES, QUICK_RANKS) if args.quick else (FULL_SHAPES, FULL_RANKS)
    cases = []
    for n, d_in, d_out in shapes:
        for r in ranks:
            print(f"N={n} {d_in}->{d_out} r={r} {DTYPE}", flush=True)
            cases.append(bench_case(n, d_in, d_out, r, torch.device("cuda")))
    report = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__, "peft": peft_version,
              "quick": args.quick, "dropout": DROPOUT,
              "method": "triton.testing.do_bench median; fwd under no_grad; fwd_bwd = forward + "
                        "autograd.grad of sum(y) w.r.t. x and the adapter factors; peak = max allocated "
                        "during one fwd_bwd minus allocated before it",
              "cases": cases}
    out = args.out or RESULTS / f"{_slug(device_name)}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

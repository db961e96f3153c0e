"""Byte and FLOP floors of one adapted Linear per execution plan (the model of docs/performance.md).

    python benchmarks/byte_model.py [--device H100] [--bandwidth 4.8e12] [--flops 989e12]

Each plan is the list of kernels it launches for plain LoRA (A and B trained, x needs its
gradient, no bias gradient, no dropout, no middle factor or rank weights). A kernel moves
``bytes`` (every operand read or written once: the minimum traffic; tile re-reads served by L2
are not counted) and runs ``flops`` (multiply-adds count two). Kernels run one after another,
so a plan's floor is the sum over its kernels of max(bytes / bandwidth, flops / peak).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

#: Documented peaks per GPU: (HBM bandwidth in bytes/s, dense bf16 tensor-core FLOP/s). Sources: the NVIDIA
#: H200 Tensor Core GPU datasheet (H200 SXM and NVL: 4.8 TB/s; BF16 1,979 and 1,671 TFLOPS with sparsity) and
#: the NVIDIA H100 Tensor Core GPU datasheet (SXM 3.35 TB/s, NVL 3.9 TB/s, PCIe 2 TB/s; BF16 1,979, 1,671 and
#: 1,513 TFLOPS with sparsity); dense is half the sparsity figure. Checked in this order (NVL and PCIe first).
DEVICE_PEAKS = {
    "H200 NVL": (4.8e12, 1671e12 / 2),
    "H200": (4.8e12, 1979e12 / 2),
    "H100 NVL": (3.9e12, 1671e12 / 2),
    "H100 PCIe": (2.0e12, 1513e12 / 2),
    "H100": (3.35e12, 1979e12 / 2),
}
BANDWIDTH, PEAK_FLOPS = DEVICE_PEAKS["H200"]
#: tiles assumed for the one-pass kernels (the large Hopper tiles) and the skinny kernels
BLOCK_M, BLOCK_N = 128, 256
#: SMs of an H100 SXM / H200 (the persistent one-pass kernels give each a program) and the longest run of
#: column tiles one of their programs walks (kernels/src/triton/onepass_tiles.py: COLUMN_RUN)
SMS, COLUMN_RUN = 132, 4
PLANS = ("torch", "cublas", "triton", "onepass")


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes: float
    flops: float


@dataclass(frozen=True)
class Shape:
    n: int       # tokens
    d_in: int
    d_out: int
    r: int
    elem: int = 2  # bytes per element of x, W, y and the factors (bf16)


def device_peaks(name: str) -> Optional[tuple[str, float, float]]:
    """(key, bandwidth, peak FLOP/s) of the first ``DEVICE_PEAKS`` key whose words all occur in the GPU
    name (case-insensitive: "NVIDIA H100 80GB HBM3" is "H100", "NVIDIA H100 PCIe" "H100 PCIe"); None
    for a device without documented peaks."""
    words = set(name.upper().split())
    for key, (bandwidth, peak) in DEVICE_PEAKS.items():
        if set(key.upper().split()) <= words:
            return key, bandwidth, peak
    return None


def _rank_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def base_kernels(s: Shape, backward: bool) -> list[Kernel]:
    """The frozen layer: y = x W^T, and dx = dy W (W is frozen: no weight gradient)."""
    n, k, d, e = s.n, s.d_in, s.d_out, s.elem
    kernels = [Kernel("x W^T", e * (n * k + d * k + n * d), 2 * n * k * d)]
    if backward:
        kernels.append(Kernel("dy W", e * (n * d + d * k + n * k), 2 * n * k * d))
    return kernels


def _dy_pass(s: Shape) -> list[Kernel]:
    """skinny.dy_pass: dP and dB from one pass over dy when its dP partials (one (N, r) fp32 slice
    per 128- or 64-column block, written and read) cost less than a second read of dy, else two.
    (The tiles of tensor-core dots; fp32 with TF32 off reads 32-column blocks, not modelled here.)"""
    n, d, r, e = s.n, s.d_out, s.r, s.elem
    d_blocks = _cdiv(d, 128 if _rank_pad(r) <= 32 else 64)
    partials = 2 * d_blocks * n * r * 4
    columns = Kernel("dy pass (dB, dP partials)", e * (n * d + d * r) + 4 * n * r + partials, 4 * n * d * r)
    if partials <= n * d * e:
        return [columns]
    return [Kernel("dy B (shrink over dy)", e * (n * d + d * r) + 4 * n * r, 2 * n * d * r),
            Kernel("dy pass (dB)", e * (n * d + d * r) + 4 * n * r, 2 * n * d * r)]


def side_groups(rows: int, columns: int, sms: int = SMS) -> int:
    """Programs per row block of the persistent one-pass kernels over ``rows`` row blocks and
    ``columns`` column tiles (``onepass_tiles.column_groups``): enough for every SM, no run of
    column tiles longer than COLUMN_RUN, none empty. Each forms its row block's side product once."""
    run = _cdiv(columns, min(columns, max(_cdiv(sms, rows), _cdiv(columns, COLUMN_RUN))))
    return _cdiv(columns, run)


def plan_kernels(plan: str, s: Shape, backward: bool = True) -> list[Kernel]:
    """The kernels ``plan`` launches for one forward (and backward) of shape ``s``.

    onepass: the forward forms x A^T and the input gradient dy B once per program (``side_groups``
    programs per row block, over the column tiles of y and of dx).
    """
    n, k, d, r, e = s.n, s.d_in, s.d_out, s.r, s.elem
    pad = _rank_pad(r)
    shrink = Kernel("x A^T", e * (n * k + r * k) + 4 * n * r, 2 * n * k * r)
    down_grad = Kernel("dA = dt^T x", e * (n * k) + 4 * n * r + 4 * r * k, 2 * n * k * r)
    if plan == "torch":
        fwd = base_kernels(s, False) + [
            Kernel("x A^T", e * (n * k + r * k + n * r), 2 * n * k * r),
            Kernel("y += v B^T", e * (2 * n * d + n * r + d * r), 2 * n * d * r)]
        bwd = [base_kernels(s, True)[1],
               Kernel("dP = dy B", e * (n * d + d * r + n * r), 2 * n * d * r),
               Kernel("dB = dy^T v", e * (n * d + n * r + d * r), 2 * n * d * r),
               Kernel("dA = dt^T x", e * (n * k + n * r + r * k), 2 * n * k * r),
               Kernel("dt A", e * (n * r + r * k + n * k), 2 * n * k * r),
               Kernel("dx + dt A", 3 * e * n * k, n * k)]
    elif plan == "cublas":
        # the output starts as the low-rank term (one write); the base GEMM reads it back in its epilogue
        fwd = [shrink, Kernel("y = v B^T", e * (n * d + d * r) + 4 * n * r, 2 * n * d * r),
               Kernel("y += x W^T (beta 1)", e * (n * k + d * k + 2 * n * d), 2 * n * k * d)]
        bwd = _dy_pass(s) + [down_grad, Kernel("dx = dt A", e * (n * k + r * k) + 4 * n * r, 2 * n * k * r),
                             Kernel("dx += dy W (beta 1)", e * (n * d + d * k + 2 * n * k), 2 * n * k * d)]
    elif plan == "triton":
        fwd = [shrink, Kernel("x W^T + v B^T", e * (n * k + d * k + n * d + d * r) + 4 * n * r,
                              2 * n * d * (k + r))]
        bwd = _dy_pass(s) + [down_grad, Kernel("dy W + dt A", e * (n * d + d * k + n * k + r * k) + 4 * n * r,
                                               2 * n * k * (d + r))]
    elif plan == "onepass":
        # each program forms its row block's side product (R_PAD wide) over all of K once
        rows = _cdiv(n, BLOCK_M)
        fwd = [Kernel("x W^T, x A^T, v B^T", e * (n * k + d * k + n * d + r * k + d * r) + 4 * n * r,
                      2 * n * d * (k + r) + 2 * n * k * pad * side_groups(rows, _cdiv(d, BLOCK_N)))]
        partials = 2 * _cdiv(n, BLOCK_M) * d * r * 4
        db_in_kernel = partials <= n * d * e
        one = Kernel("dy W, dy B, dt A" + (", dB partials" if db_in_kernel else ""),
                     e * (n * d + d * k + n * k + d * r + r * k) + 4 * n * r * (2 if db_in_kernel else 1)
                     + (partials if db_in_kernel else 0),
                     2 * n * k * (d + r) + 2 * n * d * pad * side_groups(rows, _cdiv(k, BLOCK_N))
                     + (2 * n * d * r if db_in_kernel else 0))
        bwd = [one, down_grad] + ([] if db_in_kernel else [
            Kernel("dB = dy^T v", e * (n * d + n * r + d * r), 2 * n * d * r)])
    else:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    return fwd + (bwd if backward else [])


def floor_seconds(kernels: list[Kernel], bandwidth: float = BANDWIDTH, peak: float = PEAK_FLOPS) -> float:
    """Sum over the kernels of max(bytes / bandwidth, flops / peak)."""
    return sum(max(kernel.bytes / bandwidth, kernel.flops / peak) for kernel in kernels)


def floors(s: Shape, bandwidth: float = BANDWIDTH, peak: float = PEAK_FLOPS) -> dict[str, dict[str, float]]:
    """{plan: {"fwd_mb", "fwd_gflop", "fwd_us", "step_mb", "step_gflop", "step_us"}} for "base" and every plan."""
    out = {}
    for name in ("base", *PLANS):
        row = {}
        for label, backward in (("fwd", False), ("step", True)):
            kernels = base_kernels(s, backward) if name == "base" else plan_kernels(name, s, backward)
            row[f"{label}_mb"] = sum(k.bytes for k in kernels) / 1e6
            row[f"{label}_gflop"] = sum(k.flops for k in kernels) / 1e9
            row[f"{label}_us"] = floor_seconds(kernels, bandwidth, peak) * 1e6
        out[name] = row
    return out


def model_floors(shapes: list[Shape], bandwidth: float = BANDWIDTH, peak: float = PEAK_FLOPS) -> dict[str, float]:
    """{"base" and every plan: the forward + backward floor in ms, summed over ``shapes``} (one shape per
    adapted Linear that a training step runs): the frozen layers' floor, and each plan's for the same layers
    with their adapters (plain LoRA, no dropout)."""
    totals = dict.fromkeys(("base", *PLANS), 0.0)
    for s in shapes:
        for name, row in floors(s, bandwidth, peak).items():
            totals[name] += row["step_us"] / 1e3
    return totals


def table(shapes: list[Shape], bandwidth: float = BANDWIDTH, peak: float = PEAK_FLOPS) -> str:
    """A markdown table: per shape and plan, bytes, FLOPs, floor and ratio to the base, forward and fwd + bwd."""
    lines = ["| d_in x d_out | r | plan | fwd MB | fwd GFLOP | fwd floor us | x base | fwd+bwd MB | fwd+bwd GFLOP "
             "| fwd+bwd floor us | x base |", "|---" * 11 + "|"]
    for s in shapes:
        rows = floors(s, bandwidth, peak)
        base = rows["base"]
        for name, row in rows.items():
            lines.append(f"| {s.d_in}x{s.d_out} | {s.r} | {name} | {row['fwd_mb']:.0f} | {row['fwd_gflop']:.0f} "
                         f"| {row['fwd_us']:.0f} | {row['fwd_us'] / base['fwd_us']:.3f} | {row['step_mb']:.0f} "
                         f"| {row['step_gflop']:.0f} | {row['step_us']:.0f} | {row['step_us'] / base['step_us']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=list(DEVICE_PEAKS), default="H200", help="documented peaks")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s (default: the device's)")
    parser.add_argument("--flops", type=float, default=None, help="dense FLOP/s (default: the device's)")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    bandwidth, peak = DEVICE_PEAKS[args.device]
    shapes = [Shape(args.tokens, d_in, d_out, r) for d_in, d_out in ((4096, 4096), (4096, 11008), (11008, 4096))
              for r in (16, 64)]
    print(table(shapes, args.bandwidth or bandwidth, args.flops or peak))


if __name__ == "__main__":
    main()

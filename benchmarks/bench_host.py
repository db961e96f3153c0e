"""Host time of one adapted layer's call path: fastlora against PEFT on tiny tensors.

    python -m benchmarks.bench_host [--device cpu|cuda] [--plan torch|cublas] [--stack K] [--quick] [--out PATH]

At x (8, 64), 64 -> 64, r = 8, float32, one CPU thread, the arithmetic is negligible: what is
timed is the per-call work in Python, the dispatcher and autograd, which a GPU step pays
before every launch too. On a GPU (``--device cuda``) the kernels run for real: a call's
device work is a few microseconds, so the time per call is still the host's, now with every
launch's own cost (cuBLAS, torch's kernels, Triton's launcher). Variants, each in training mode:

- ``linear``: the frozen nn.Linear alone (the floor);
- ``peft``: PEFT's lora.Linear (benchmarks/bench_adapted_linear.py: ``peft_layer``);
- ``accelerate``: the same PEFT layer after ``fastlora.accelerate``;
- ``inject``: the AdapterLinear of ``fastlora.inject`` on a one-layer model (backend "torch");

the adapted ones without dropout, with dropout 0.05 (``_dropout``), with dropout 0.05 under
bfloat16 autocast (``_autocast``: the fp32 layer and adapters computed in bf16, PEFT's default
setup of a training run), and without dropout under ``torch.no_grad`` (``_no_grad``: evaluation
and generation). A call: the forward, then ``torch.autograd.grad`` of the output with a fixed dy
with respect to x and the trainable factors; under ``_no_grad`` the forward alone. ``--stack K``: each variant is K such
layers in an nn.Sequential and a call runs all K forward, then their backward, as a step runs a
model's layers ("us_per_layer" is the time per call over K). Repeating the same path K times keeps
its code warm, which favours the variant whose path is shorter: per layer, PEFT's time falls further
than fastlora's, so the stacked ratio is the better proxy of a model's step (one layer alone
understates the difference).

Timing: ``WARMUP`` calls per variant, then ``ROUNDS`` rounds; in each round every variant runs
``CALLS`` calls timed together with ``time.perf_counter`` (variants interleaved, so that drift of
the machine reaches them alike; garbage collection off while timing). Per call: the median over
the rounds of block time / CALLS (on a GPU the block ends with a synchronize); "vs_peft": that
median over PEFT's of the same suffix; "vs_peft_paired": the median over the rounds of the ratio of
each round's block to PEFT's block of the same round, with its quartiles ("vs_peft_quartiles"): the
blocks of a round run back to back, so a drift of a shared machine between rounds (which moves
"vs_peft" by up to 0.1 on the 2-core development machine) mostly cancels in it.
"aten_ops": the aten operators one call dispatches (forward and backward; a TorchDispatchMode
counting them), with their names; "triton_launches": the Triton launches of one call, by kernel;
"python_top": the Python functions with the most own time per call (cProfile over a block of calls;
its overhead inflates them, so read them relative to each other). JSON:
benchmarks/results/host_path_cpu[_quick].json; on a GPU host_path_<plan>_<gpu>[_quick].json.

``--plan cublas`` on the CPU times the GPU default plan's host path: fastlora's layers run the cublas
plan on CPU tensors with Triton's offline driver (``offline_triton``: each kernel compiled once for
sm_90 with Triton's own ptxas, in a process without TRITON_INTERPRET). Every launch then runs
Triton's own launch path (argument binding, specialization key, kernel-cache lookup) and stops
where the driver would launch: what is timed is the plan's Python, torch ops, autograd and Triton
dispatch work, all but the driver's launch call itself. The outputs are not computed values: this
mode measures time only. JSON: host_path_cublas_offline_cpu[_quick].json, with the compiled kernels
("compiled": name, registers, compile seconds).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .bench_adapted_linear import RESULTS, device_name, peft_layer, pick_device, slug, version
from .host_instruments import count_ops, counted_triton, forced_plan, python_top, quartiles, time_blocks
from .isolated import run_child, write_json
from .train_step import synchronize

TOKENS, D_IN, D_OUT, R = 8, 64, 64, 8
SCALE, DROPOUT = 2.0, 0.05


class Setting(NamedTuple):
    """How a variant's layer is called: its dropout, under autocast or not, forward + backward (grad) or the
    forward alone under torch.no_grad."""
    dropout: float
    autocast: bool
    grad: bool = True


#: variant suffix -> its setting
SETTINGS = {"": Setting(0.0, False), "_dropout": Setting(DROPOUT, False), "_autocast": Setting(DROPOUT, True),
            "_no_grad": Setting(0.0, False, grad=False)}
#: the compute dtype of the ``_autocast`` variants
AUTOCAST_DTYPE = torch.bfloat16
#: the GPU architecture the offline driver compiles for (``--plan cublas`` on the CPU): the H100's and H200's
OFFLINE_ARCH = 90
WARMUP, ROUNDS, CALLS = 200, 21, 200
QUICK = {"warmup": 20, "rounds": 5, "calls": 20}
#: the repetitions and the stack of gpu_check's section "host" (a few seconds per plan)
GPU_CHECK = {"warmup": 20, "rounds": 7, "calls": 20}
GPU_CHECK_STACK = 8
#: seconds that must be left to start a plan's process in that section (imports, first compiles), per device type
PLAN_RESERVE_S = {"cuda": 20.0, "cpu": 5.0}
#: what the figures are, per device type
NOTES = {"cpu": "host time per call on this CPU: Python, dispatcher and autograd work at a size where the arithmetic "
                "is negligible; not a GPU step time",
         "cuda": "time per call on this GPU at a size where the device work is negligible: the host's Python, "
                 "dispatcher, autograd and launch work"}


def host_tensors(gen: torch.Generator, device: torch.device = torch.device("cpu")) -> dict:
    """x (requires grad), weight, a, b and dy on ``device``, drawn from the CPU generator ``gen``."""
    t = {"x": torch.randn(TOKENS, D_IN, generator=gen),
         "weight": torch.randn(D_OUT, D_IN, generator=gen) * D_IN ** -0.5,
         "a": torch.randn(R, D_IN, generator=gen) * D_IN ** -0.5, "b": torch.randn(D_OUT, R, generator=gen) * 0.02,
         "dy": torch.randn(TOKENS, D_OUT, generator=gen)}
    t = {name: tensor.to(device) for name, tensor in t.items()}
    t["x"].requires_grad_(True)
    return t


def _stacked(build: Callable[[], nn.Module], stack: int) -> nn.Module:
    """One layer from ``build()``, or ``stack`` of them in an nn.Sequential."""
    return build() if stack == 1 else nn.Sequential(*(build() for _ in range(stack)))


def _injected(t: dict, dropout: float, plan: str) -> nn.Module:
    import fastlora

    model = nn.Sequential(nn.Linear(D_IN, D_OUT, bias=False, device=t["weight"].device))
    with torch.no_grad():
        model[0].weight.copy_(t["weight"])
    config = fastlora.LoraConfig(r=R, alpha=SCALE * R, dropout=dropout, target_modules=["0"], backend=plan)
    fastlora.inject(model, config)
    with torch.no_grad():
        model[0].adapter.lora_A.copy_(t["a"])
        model[0].adapter.lora_B.copy_(t["b"])
    return model[0]


def _frozen_linear(t: dict) -> nn.Module:
    linear = nn.Linear(D_IN, D_OUT, bias=False, device=t["weight"].device)
    with torch.no_grad():
        linear.weight.copy_(t["weight"])
    return linear.requires_grad_(False)


def layers(t: dict, plan: str = "torch", stack: int = 1) -> dict[str, nn.Module]:
    """name -> the layer of each variant (see the module docstring), or ``stack`` of them in an
    nn.Sequential, in training mode; fastlora's on ``plan`` (accelerate's through FASTLORA_BACKEND, which
    ``measure`` sets)."""
    import fastlora

    if stack > 1 and D_IN != D_OUT:
        raise ValueError(f"a stack of layers needs d_in == d_out, got {D_IN} -> {D_OUT}")
    out = {"linear": _stacked(lambda: _frozen_linear(t), stack)}
    for suffix, setting in SETTINGS.items():
        p = setting.dropout
        peft = lambda p=p: peft_layer(t["weight"], t["a"], t["b"], SCALE, p)  # noqa: E731
        out["peft" + suffix] = _stacked(peft, stack)
        out["accelerate" + suffix] = _stacked(lambda peft=peft: fastlora.accelerate(peft()), stack)
        out["inject" + suffix] = _stacked(lambda p=p: _injected(t, p, plan), stack)
    return {name: layer.train() for name, layer in out.items()}


def suffix_of(name: str) -> str:
    """The settings suffix of a variant name ("" for plain ones)."""
    return next((suffix for suffix in SETTINGS if suffix and name.endswith(suffix)), "")


def call_of(layer: nn.Module, t: dict, setting: Setting = SETTINGS[""]) -> Callable[[], object]:
    """One forward (under ``AUTOCAST_DTYPE``'s autocast when the setting says so) + backward of
    ``layer`` (gradients of x and its trainable parameters), or the forward alone under torch.no_grad."""
    if not setting.grad:
        def forward():
            with torch.no_grad():
                return layer(t["x"])
        return forward
    inputs = [t["x"], *(p for p in layer.parameters() if p.requires_grad)]
    if not setting.autocast:
        return lambda: torch.autograd.grad(layer(t["x"]), inputs, t["dy"])
    device_type = t["x"].device.type
    dy = t["dy"].to(AUTOCAST_DTYPE)

    def call():
        with torch.autocast(device_type, dtype=AUTOCAST_DTYPE):
            y = layer(t["x"])
        return torch.autograd.grad(y, inputs, dy)
    return call


def measure(settings: dict, plan: str = "torch", device: torch.device = torch.device("cpu"), stack: int = 1) -> dict:
    """Every variant's median host time per call (and per layer of a ``stack``), its ratio to PEFT's, its
    aten operators and its Triton launches per call (counted; on the CPU stopped before the driver's launch);
    ``settings``: warmup, rounds, calls."""
    torch.set_num_threads(1)
    t = host_tensors(torch.Generator().manual_seed(0), device)
    calls = {name: call_of(layer, t, SETTINGS[suffix_of(name)]) for name, layer in layers(t, plan, stack).items()}
    launches: Counter = Counter()  # of every Triton launch while the counter is in place
    autocast_dtype = str(AUTOCAST_DTYPE).removeprefix("torch.")
    sync = functools.partial(synchronize, device)
    with forced_plan(plan), counted_triton(launches) if plan != "torch" else contextlib.nullcontext():
        blocks = time_blocks(calls, settings["warmup"], settings["rounds"], settings["calls"], sync)
        times = {name: [wall for wall, _ in rows] for name, rows in blocks.items()}
        variants = {}
        for name, call in calls.items():
            launches.clear()
            ops = count_ops(call)  # one call: its aten operators and its launches
            per_call = Counter(launches)
            setting = SETTINGS[suffix_of(name)]
            variants[name] = {"dropout": setting.dropout, "grad": setting.grad,
                              "autocast": autocast_dtype if setting.autocast else None,
                              "us_per_call": statistics.median(times[name]), "us_rounds": times[name],
                              "us_per_layer": statistics.median(times[name]) / stack,
                              "aten_ops": sum(ops.values()), "ops": dict(ops.most_common()),
                              "triton_launches": sum(per_call.values()), "launches": dict(per_call.most_common()),
                              "python_top": python_top(call, settings["calls"])}
    for name, row in variants.items():
        peft = variants["peft" + suffix_of(name)]
        row["vs_peft"] = row["us_per_call"] / peft["us_per_call"]
        paired = [mine / theirs for mine, theirs in zip(row["us_rounds"], peft["us_rounds"])]
        row["vs_peft_paired"] = statistics.median(paired)
        row["vs_peft_quartiles"] = quartiles(paired)
    return {"settings": settings, "stack": stack, "variants": variants}


def render(report: dict) -> str:
    offline = report["plan"] != "torch" and not report["gpu"]
    lines = [f"bench_host on {report['device']}, fastlora on the {report['plan']} plan"
             f"{' (Triton offline: launches stop at the driver)' if offline else ''}: x ({TOKENS}, {D_IN}), "
             f"{D_IN} -> {D_OUT}, r = {R}, {report['stack']} layer(s) per call; {report['note']}",
             f"  {'variant':20s} {'dropout':>7s} {'autocast':>8s} {'us/call':>9s} {'us/layer':>9s} {'x PEFT':>7s} "
             f"{'paired (quartiles)':>19s} {'aten ops':>8s} {'launches':>8s}"]
    lines += [f"  {name:20s} {row['dropout']:7.2f} {row['autocast'] or '-':>8s} {row['us_per_call']:9.1f} "
              f"{row['us_per_layer']:9.1f} {row['vs_peft']:7.2f} {row['vs_peft_paired']:6.2f} "
              f"({row['vs_peft_quartiles'][0]:.2f}-{row['vs_peft_quartiles'][1]:.2f}) "
              f"{row['aten_ops']:8d} {row['triton_launches']:8d}"
              for name, row in report["variants"].items()]
    return "\n".join(lines)


def default_out(plan: str, device: torch.device, quick: bool, stack: int = 1) -> Path:
    """benchmarks/results/host_path_cpu.json (torch plan) or host_path_<plan>_offline_cpu.json on the CPU,
    host_path_<plan>_<gpu>.json on a GPU; ``_stack<K>`` then ``_quick`` before the suffix with --stack K
    (K > 1) and --quick."""
    if device.type == "cuda":
        stem = f"host_path_{plan}_{slug(device_name(device))}"
    else:
        stem = "host_path_cpu" if plan == "torch" else f"host_path_{plan}_offline_cpu"
    return RESULTS / f"{stem}{f'_stack{stack}' if stack > 1 else ''}{'_quick' if quick else ''}.json"


def summary_of(report: dict) -> str:
    """"cublas: inject 1.42x PEFT (210 us, 3 launches per layer), accelerate ...": inject, accelerate,
    inject_dropout and inject_autocast against PEFT (paired ratios)."""
    rows, stack = report["variants"], report["stack"]
    return f"{report['plan']}: " + ", ".join(
        f"{name} {rows[name]['vs_peft_paired']:.2f}x PEFT ({rows[name]['us_per_layer']:.0f} us, "
        f"{rows[name]['triton_launches'] // stack} launches per layer)"
        for name in ("inject", "accelerate", "inject_dropout", "inject_autocast") if name in rows)


def compared_plans(device: torch.device) -> tuple[str, ...]:
    """fastlora's plans a benchmark on ``device`` compares with PEFT: ``auto``'s candidates on a GPU (the
    cublas plan, the default, then the torch plan), the torch plan elsewhere."""
    from fastlora.kernels.plans import AUTO_CANDIDATES  # imports triton: not before main sets TRITON_INTERPRET

    return AUTO_CANDIDATES if device.type == "cuda" else ("torch",)


def section(ctx) -> dict:
    """gpu_check section "host": this benchmark in a child process per plan of ``compared_plans``, on
    stacks of ``GPU_CHECK_STACK`` layers (a step's conditions), ``GPU_CHECK`` repetitions (``--quick``:
    QUICK)."""
    plans = compared_plans(ctx.device)
    repeats = ",".join(str(v) for v in (QUICK if ctx.quick else GPU_CHECK).values())
    result, summaries = {"plans": {}, "skipped": []}, []
    with tempfile.TemporaryDirectory(prefix="fastlora_bench_host_") as tmp:
        for plan in plans:
            if not ctx.has(PLAN_RESERVE_S[ctx.device.type]):
                result["skipped"].append(plan)
                summaries.append(f"{plan}: skipped for time")
                continue
            out = Path(tmp) / f"host_{plan}.json"
            args = ["--device", ctx.device.type, "--plan", plan, "--repeats", repeats,
                    "--stack", str(GPU_CHECK_STACK), "--out", str(out)]
            child = run_child("benchmarks.bench_host", args, out, timeout_s=ctx.left())
            if child["result"] is None or child["returncode"] != 0:
                result["plans"][plan] = {"error": f"exit status {child['returncode']}: {child['output']}"}
                summaries.append(f"{plan}: failed")
                continue
            result["plans"][plan] = child["result"]
            summaries.append(summary_of(child["result"]))
            ctx.partial(result)
    ok = any("error" not in row for row in result["plans"].values())
    return {**result, "status": "ok" if ok else "error", "summary": "; ".join(summaries)}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (the default: the cublas plan's launches stop at the driver), or cuda (every "
                             "launch run)")
    parser.add_argument("--quick", action="store_true", help=f"fewer repetitions {QUICK} (a check of the script)")
    parser.add_argument("--repeats", default=None, metavar="WARMUP,ROUNDS,CALLS",
                        help=f"repetitions (default {WARMUP},{ROUNDS},{CALLS}; gpu_check: "
                             f"{','.join(map(str, GPU_CHECK.values()))})")
    parser.add_argument("--plan", choices=("torch", "cublas"), default="torch",
                        help="fastlora's plan: torch (the CPU path), or cublas (the GPU default)")
    parser.add_argument("--stack", type=int, default=1, metavar="K",
                        help="each variant as K layers in sequence, a call running them all (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: see ``default_out``)")
    args = parser.parse_args(argv)
    if args.stack < 1:
        parser.error(f"--stack must be at least 1, got {args.stack}")
    device = pick_device(args.device)
    compiled: list[dict] = []
    if device.type == "cpu" and args.plan != "torch":
        if os.environ.get("TRITON_INTERPRET") == "1":  # Triton reads it when it is imported: a process without it
            argv = sys.argv[1:] if argv is None else argv
            env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
            raise SystemExit(subprocess.run([sys.executable, "-m", "benchmarks.bench_host", *argv], env=env).returncode)
        from .offline_triton import install_offline_triton
        install_offline_triton(OFFLINE_ARCH, compiled)
    if args.repeats:
        settings = dict(zip(("warmup", "rounds", "calls"), map(int, args.repeats.split(","))))
    else:
        settings = QUICK if args.quick else {"warmup": WARMUP, "rounds": ROUNDS, "calls": CALLS}
    report = {"device": device_name(device), "gpu": device.type == "cuda", "torch": torch.__version__,
              "peft": version("peft"), "plan": args.plan,
              "shape": {"tokens": TOKENS, "d_in": D_IN, "d_out": D_OUT, "r": R, "dtype": "float32"},
              "note": NOTES[device.type], **measure(settings, args.plan, device, args.stack)}
    if compiled:
        report["compiled"] = compiled
    out = args.out or default_out(args.plan, device, args.quick, args.stack)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(render(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

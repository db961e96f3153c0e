"""Compile the Triton kernels of a GPU run for a GPU that is not there: does every kernel
compile on this Triton, what does each configuration hold in registers, spills and shared
memory, and how long does a cold run compile before it measures anything?

    python benchmarks/compile_check.py [--arch 90] [--jobs N] [--kinds op,method,layer,neat,speed,ragged,model]
                                       [--dtypes bfloat16,float16] [--plans triton,cublas,onepass]
                                       [--match WORD,...] [--out PATH] [--keep-cache]

It runs the items of gpu_check's correctness section (benchmarks/check_correctness.py: every
case, method and NEAT activation on every Triton plan, forward and backward) and the ranks of
its speed section that those do not cover (kind "speed": r = 64, 32) on CPU tensors, and, on
request (kind "ragged"), a plan's forward + backward with dropout over batches of varied length
(``RAGGED_TOKENS``: each kernel should compile once, whatever the token count) and (kind "model")
one training step of bench_model's models per fastlora variant, what a cold first step compiles
(their 2-layer, 64-wide configs: the same kernels as the full ones, though a choice that depends on
the width, dP by the shrink or in the dy pass, can add a specialization the full widths lack),
with Triton's driver replaced by an offline one: a kernel call compiles, for sm_<arch> with
Triton's own ptxas, every configuration its autotuner would try (as the cold GPU run does)
and launches nothing. Nothing runs, so the items' numbers are meaningless and not reported;
the layer items run once per plan, each of the plans ``auto`` would time.

Per compiled kernel: its constexprs, warps, stages, compile seconds, and the cubin's
registers, stack (spilled) bytes and shared memory (``cuobjdump --dump-resource-usage``).
By default it compiles into a fresh temporary Triton cache (cold times); ``--keep-cache``
uses Triton's configured cache instead. ``--jobs`` spreads the items over processes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script path: import from the repository root, not benchmarks/
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from benchmarks.offline_triton import install_offline_triton  # noqa: E402
from benchmarks.report_text import item_name  # noqa: E402

ARCH = 90  # H100 / H200
KINDS = ("op", "method", "layer", "neat", "speed", "ragged", "model")
#: the kinds of a run without --kinds: the GPU run's items ("ragged" and "model" only on request)
DEFAULT_KINDS = ("op", "method", "layer", "neat", "speed")
#: token counts of the "ragged" kind's batches (multiples of 16, other, 1) and its (d_in, d_out, r)
RAGGED_TOKENS = (64, 61, 1, 17, 128)
RAGGED_SHAPE = (96, 80, 8)
#: bench_model's fastlora variants whose first step the "model" kind compiles
MODEL_VARIANTS = ("accelerate_fp32", "inject_bf16")
#: the gpu_check section's order: the speed section runs first, then correctness (op items first)
SECTION_KINDS = ("speed", "op", "layer", "method", "neat")
#: (rank, features) of the speed section's raw ops past the correctness items' r = 16 (r = 64,
#: its dropout variant, its half-masked variant r = 32); its method layers run at r = 64 too
SPEED_OPS = ((64, frozenset()), (64, frozenset({"dropout"})), (32, frozenset()))
SPEED_RANK = 64
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TRITON_PLANS = ("triton", "cublas", "onepass")
def items(kinds: tuple[str, ...], dtypes: tuple[torch.dtype, ...], plans: tuple[str, ...],
          words: tuple[str, ...] = ()) -> Iterator[tuple[dict, Callable[[], object]]]:
    """(description, run) of every item whose description holds every one of ``words``: the
    correctness section's items, on CPU tensors."""
    for desc, run in _every_item(kinds, dtypes, plans):
        if all(word in desc.values() for word in words):
            yield desc, run


def _every_item(kinds: tuple[str, ...], dtypes: tuple[torch.dtype, ...],
                plans: tuple[str, ...]) -> Iterator[tuple[dict, Callable[[], object]]]:
    """Per dtype, the items of each kind in the order ``kinds`` lists them."""
    from benchmarks import check_correctness as cc
    from benchmarks.bench_methods import METHODS

    cpu = torch.device("cpu")
    shapes = {k: v for k, v in cc.SHAPES.items() if k != "bench"}  # "bench" specializes like "plain"

    def of_kind(kind: str, dtype: torch.dtype, name: str) -> Iterator[tuple[dict, Callable[[], object]]]:
        if kind == "op":
            for case in (c for c in cc.CASES if cc.CASES[c][0] in shapes):
                for plan in plans:
                    yield {"kind": "op", "case": case, "dtype": name, "plan": plan}, \
                        lambda c=case, d=dtype, p=plan: cc.op_check(c, d, shapes, cpu, p)
        for method in METHODS if kind == "method" else ():
            for plan in plans:
                yield {"kind": "method", "method": method, "dtype": name, "plan": plan}, \
                    lambda m=method, d=dtype, p=plan: cc.method_check(m, d, shapes["base"], cpu, p)
        for method in METHODS if kind == "layer" and dtype != torch.float32 else ():
            for plan in plans:
                yield {"kind": "layer", "method": method, "dtype": name, "plan": plan}, \
                    lambda m=method, d=dtype, p=plan: _forced(p, lambda: cc.layer_check(m, shapes["base"], d, cpu))
        for act in cc.NEAT_ACTS if kind == "neat" else ():
            for plan in plans:
                yield {"kind": "neat", "act": act, "dtype": name, "plan": plan}, \
                    lambda a=act, d=dtype, p=plan: cc.neat_check(a, shapes["base"], d, cpu, p)
        if kind == "speed" and dtype == torch.bfloat16:  # the speed section runs bf16 only
            yield from _speed_items(shapes["base"][:3], plans)
        for plan in plans if kind == "ragged" else ():
            yield {"kind": "ragged", "case": "tokens " + ",".join(map(str, RAGGED_TOKENS)), "dtype": name,
                   "plan": plan}, lambda d=dtype, p=plan: ragged_batches(d, p)
        yield from _model_items(plans) if kind == "model" and dtype == torch.bfloat16 else ()

    for dtype in dtypes:
        for kind in kinds:
            yield from of_kind(kind, dtype, str(dtype).replace("torch.", ""))


def _speed_items(size: tuple[int, int, int], plans: tuple[str, ...]) -> Iterator[tuple[dict, Callable[[], object]]]:
    """The speed section's specializations the correctness items do not compile: its ranks past 16."""
    from benchmarks import check_correctness as cc
    from benchmarks.bench_methods import METHODS

    cpu = torch.device("cpu")
    for r, features in SPEED_OPS:
        for plan in plans:
            case = "+".join(["plain", *sorted(features)]) + f" r={r}"
            yield {"kind": "speed", "case": case, "dtype": "bfloat16", "plan": plan}, \
                lambda f=features, r=r, p=plan: cc.features_check(set(f), (*size, r), torch.bfloat16, cpu, p)
    for method in METHODS:
        for plan in plans:
            yield {"kind": "speed", "method": method, "case": f"r={SPEED_RANK}", "dtype": "bfloat16", "plan": plan}, \
                lambda m=method, p=plan: _forced(p, lambda: cc.layer_check(m, (*size, SPEED_RANK), torch.bfloat16, cpu))


def ragged_batches(dtype: torch.dtype, plan: str) -> None:
    """Forward + backward of ``plan`` with dropout 0.1 and fp32 factors (PEFT's under autocast) over one
    batch of each of ``RAGGED_TOKENS`` token counts, at ``RAGGED_SHAPE``."""
    from fastlora.kernels import adapted_linear

    d_in, d_out, r = RAGGED_SHAPE
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=gen).to(dtype)
    a = torch.randn(r, d_in, generator=gen).requires_grad_(True)
    b = torch.randn(d_out, r, generator=gen).requires_grad_(True)
    for n in RAGGED_TOKENS:
        x = torch.randn(n, d_in, generator=gen).to(dtype).requires_grad_(True)
        adapted_linear(x, weight, None, a, b, scale=2.0, dropout=0.1, backend=plan).sum().backward()


def _model_items(plans: tuple[str, ...]) -> Iterator[tuple[dict, Callable[[], object]]]:
    """One training step of each bench_model model and fastlora variant per plan (bf16 models, autocast)."""
    from benchmarks.model_setups import MODELS

    for model in MODELS:
        for variant in MODEL_VARIANTS:
            for plan in plans:
                yield {"kind": "model", "case": model, "variant": variant, "dtype": "bfloat16", "plan": plan}, \
                    lambda m=model, v=variant, p=plan: _forced(p, lambda: model_step(m, v))


def model_step(model_name: str, variant: str) -> None:
    """bench_model's training step (``train_step.make_step``: bf16 autocast, dropout 0.05) of its 2-layer
    ``model_name`` as ``variant``, once, on the CPU."""
    from benchmarks.model_setups import DROPOUT, MODELS, adapt, build_model, make_batch
    from benchmarks.train_step import make_step

    cpu = torch.device("cpu")
    spec = MODELS[model_name]
    model = adapt(build_model(spec, True, cpu), variant, spec, DROPOUT)
    make_step(model, make_batch(spec, model, True, cpu), cpu)()


def _forced(plan: str, run: Callable[[], object]) -> object:
    """``run()`` with backend "auto" choosing ``plan`` wherever the Triton plans take the dtype (the
    float64 reference stays on torch), as ``fastlora.tune`` times the plans it may choose on a GPU."""
    from fastlora.kernels import dispatch, eligibility
    select = dispatch.select_plan

    def forced(backend: str, x: torch.Tensor, dtype: torch.dtype, choose: Callable[[], str]) -> str:
        return plan if backend == "auto" and dtype in eligibility.TRITON_DTYPES else select(backend, x, dtype, choose)

    dispatch.select_plan = forced
    try:
        return run()
    finally:
        dispatch.select_plan = select


_WORKER: dict = {}


def _start_worker(arch: int, selection: tuple) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels, not interpreted
    torch.set_num_threads(1)  # one process per core
    _WORKER["compiled"] = []
    install_offline_triton(arch, _WORKER["compiled"])
    _WORKER["items"] = list(items(*selection))


def _run_item(index: int) -> dict:
    """Compile what item ``index`` launches; its description, seconds, kernels compiled and any error."""
    desc, run = _WORKER["items"][index]
    compiled = _WORKER["compiled"]
    del compiled[:]
    start = time.perf_counter()
    try:
        run()
        error = None
    except Exception:  # noqa: BLE001 - a kernel that does not compile is this check's finding
        error = traceback.format_exc(limit=-6)
    return {**desc, "index": index, "seconds": round(time.perf_counter() - start, 3), "compiled": list(compiled),
            "error": error}


def compile_all(arch: int, selection: tuple, jobs: int, on_item: Callable[[dict], None] = lambda item: None,
                deadline: float = float("inf")) -> tuple[list[dict], list[dict]]:
    """(results, skipped): the result of every selected item (see ``_run_item``) that ``jobs``
    processes compiled, taken in item order and reported (``on_item``) as they finish, and the
    items not finished when time.monotonic() passed ``deadline``, both in item order.
    ``selection``: the arguments of ``items`` (kinds, dtypes, plans[, words])."""
    listed = [desc for desc, _ in items(*selection)]
    context = multiprocessing.get_context("spawn")
    results: list[dict] = []
    with context.Pool(jobs, initializer=_start_worker, initargs=(arch, selection)) as pool:
        pending = pool.imap_unordered(_run_item, range(len(listed)))
        while len(results) < len(listed):
            try:
                result = pending.next(timeout=None if deadline == float("inf") else
                                      max(deadline - time.monotonic(), 0.0))
            except multiprocessing.TimeoutError:
                break  # leaving the pool's context terminates the workers
            on_item(result)
            results.append(result)
    done = {r["index"] for r in results}
    return sorted(results, key=lambda r: r["index"]), [d for i, d in enumerate(listed) if i not in done]


def section(ctx) -> dict:
    """gpu_check section "compile" (before the speed and correctness sections): the Triton kernels of
    the speed section and then of the correctness items (``SECTION_KINDS`` order, bf16 then fp16)
    compiled for this GPU by one process per CPU core into Triton's cache, so that the sections
    after it load them instead of compiling each configuration in turn; the summary (compile
    seconds, registers, spills) and any kernel that does not compile. Not a check: the
    correctness section runs what compiled."""
    major, minor = torch.cuda.get_device_capability(ctx.device) if ctx.device.type == "cuda" else divmod(ARCH, 10)
    plans = tuple(p for p in ctx.plans if p in TRITON_PLANS)
    jobs = os.cpu_count() or 1
    start = time.perf_counter()
    results, skipped = compile_all(10 * major + minor, (SECTION_KINDS, (torch.bfloat16, torch.float16), plans), jobs,
                                   deadline=ctx.deadline - 2.0)
    result = report(results, time.perf_counter() - start, jobs)
    totals = result["summary"]
    return {**result, "totals": totals, "skipped": [{**desc, "reason": "time budget"} for desc in skipped],
            "summary": f"{totals['kernels_compiled']} kernels in {totals['wall_seconds']:.0f} s on {jobs} processes "
                       f"({totals['compile_seconds']:.0f} s of compilation), {totals['errors']} items failed, "
                       f"{totals['kernels_with_stack']} kernels with stack (max {totals['max_stack_bytes']} B), "
                       f"{len(skipped)} items left for time"}


def table(kernels: list[dict]) -> str:
    """Markdown table per kernel: configurations compiled, compile seconds, most registers, and how
    many hold a stack frame (spills), the largest, apart for the odd shapes (sizes not multiples of 16)."""
    rows: dict[str, list] = {}
    for k in kernels:
        row = rows.setdefault(k["kernel"], [0, 0.0, 0, 0, 0, 0, 0])
        odd = " odd" in k["item"]
        row[0] += 1
        row[1] += k["seconds"]
        row[2] = max(row[2], k["registers"])
        row[3 + 2 * odd] += k["stack_bytes"] > 0
        row[4 + 2 * odd] = max(row[4 + 2 * odd], k["stack_bytes"])
    lines = ["| kernel | compiled | compile s | max registers | with stack (aligned) | max stack B (aligned) "
             "| with stack (odd) | max stack B (odd) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {n} | {sec:.0f} | {reg} | {sa} | {ma} | {so} | {mo} |"
              for name, (n, sec, reg, sa, ma, so, mo) in sorted(rows.items(), key=lambda kv: -kv[1][1])]
    return "\n".join(lines)


def report_json(written: dict) -> str:
    """The report as JSON text, one line per kernel."""
    head = json.dumps({k: v for k, v in written.items() if k != "kernels"}, indent=1)
    kernels = ",\n  ".join(json.dumps(k) for k in written["kernels"])
    return f'{head[:-2]},\n "kernels": [\n  {kernels}\n ]\n}}\n'


def report(results: list[dict], wall_s: float, jobs: int) -> dict:
    """{"summary", "items" (each item's description, seconds, error, kernels it compiled or loaded),
    "kernels" (each compiled kernel once, with the item that compiled it), "errors" (the failed items)}."""
    named = [{**r, "compiled": [{**k, "item": item_name(r)} for k in r["compiled"]]} for r in results]
    items = [{**{k: v for k, v in r.items() if k != "compiled"}, "kernels": len(r["compiled"])} for r in results]
    return {"summary": summary(results, wall_s, jobs), "items": items, "kernels": unique_kernels(named),
            "errors": [item for item in items if item["error"]]}


def unique_kernels(results: list[dict]) -> list[dict]:
    """Each compiled kernel once: another process finds what one compiled in the shared cache (a
    load, timed as such), so the slowest record of a kernel is its compilation."""
    slowest: dict[str, dict] = {}
    for kernel in (k for r in results for k in r["compiled"]):
        if kernel["hash"] not in slowest or kernel["seconds"] > slowest[kernel["hash"]]["seconds"]:
            slowest[kernel["hash"]] = kernel
    return list(slowest.values())


def summary(results: list[dict], wall_s: float, jobs: int) -> dict:
    """Counts, compile seconds per kernel, the largest register and stack figures, the errors."""
    kernels = unique_kernels(results)
    per_kernel = Counter()
    for k in kernels:
        per_kernel[k["kernel"]] += k["seconds"]
    spilling = [k for k in kernels if k.get("stack_bytes", 0) > 0]
    return {
        "items": len(results), "errors": sum(r["error"] is not None for r in results),
        "kernels_compiled": len(kernels), "compile_seconds": round(sum(k["seconds"] for k in kernels), 1),
        "wall_seconds": round(wall_s, 1), "jobs": jobs,
        "compile_seconds_by_kernel": {k: round(v, 1) for k, v in per_kernel.most_common()},
        "max_registers": max((k.get("registers", 0) for k in kernels), default=0),
        "kernels_with_stack": len(spilling),
        "max_stack_bytes": max((k["stack_bytes"] for k in spilling), default=0),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/compile_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=ARCH, help="compute capability as an integer (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help=f"comma-separated subset of {list(KINDS)}")
    parser.add_argument("--dtypes", default="bfloat16,float16", help=f"comma-separated subset of {list(DTYPES)}")
    parser.add_argument("--plans", default=",".join(TRITON_PLANS), help=f"comma-separated subset of {TRITON_PLANS}")
    parser.add_argument("--match", default="", help="only items whose description holds each of these "
                                                   "comma-separated words, e.g. op,dropout,onepass")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report (default benchmarks/results/compile_sm<arch>_triton<version>.json)")
    parser.add_argument("--keep-cache", action="store_true", help="compile into Triton's configured cache")
    args = parser.parse_args(argv)
    kinds, plans = tuple(args.kinds.split(",")), tuple(args.plans.split(","))
    unknown = (set(kinds) - set(KINDS)) | (set(plans) - set(TRITON_PLANS)) | (set(args.dtypes.split(",")) - set(DTYPES))
    if unknown:
        parser.error(f"unknown kinds, plans or dtypes: {sorted(unknown)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("compile_check compiles for a GPU: unset TRITON_INTERPRET")
    dtypes = tuple(DTYPES[d] for d in args.dtypes.split(","))
    import triton
    out = args.out or ROOT / "benchmarks" / "results" / f"compile_sm{args.arch}_triton{triton.__version__}.json"
    with contextlib.ExitStack() as stack:
        if not args.keep_cache:
            os.environ["TRITON_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory())
        start = time.perf_counter()
        words = tuple(w for w in args.match.split(",") if w)
        results, _ = compile_all(args.arch, (kinds, dtypes, plans, words), max(args.jobs, 1), on_item=_print_item)
        wall = time.perf_counter() - start
    written = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
               **report(results, wall, args.jobs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report_json(written))
    print(json.dumps(written["summary"], indent=1))
    print(table(written["kernels"]))
    print(f"wrote {out}")
    return 1 if written["errors"] else 0


def _print_item(result: dict) -> None:
    status = "ERROR" if result["error"] else "ok"
    print(f"{item_name(result)}: {len(result['compiled'])} kernels in {result['seconds']:.1f} s {status}", flush=True)
    if result["error"]:
        print(result["error"], flush=True)


if __name__ == "__main__":
    sys.exit(main())

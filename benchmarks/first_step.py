"""The very first training step of a model variant, in a fresh process.

    python -m benchmarks.first_step --model llama --variant accelerate_fp32 [--device cuda|cpu] [--quick] --out PATH

The child builds the model and its variant (benchmarks/model_setups.py), then times its first
step and its second (benchmarks/train_step.py): what a user waits for before training runs at
speed (Triton compilation, plan selection, cuBLAS and allocator warm-up) and the step after it.
It writes {"import_s", "build_s", "first_step_s", "second_step_s"} to PATH.

``first_steps`` runs it twice with ``TRITON_CACHE_DIR`` and ``FASTLORA_CACHE_DIR`` pointing at
new empty folders (cold: nothing compiled or chosen yet), then again on the folders the first
child filled (warm: what a second run of the same training script pays).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .isolated import run_child, write_json

CACHE_VARS = ("TRITON_CACHE_DIR", "FASTLORA_CACHE_DIR")


def first_steps(model: str, variant: str, device: str, quick: bool, timeout_s: float) -> dict:
    """{"cold", "warm": the child's report}: cold on empty caches, then warm on the caches cold filled,
    both within ``timeout_s``; a child that failed or ran out of time says so under "error"."""
    deadline = time.monotonic() + timeout_s
    results = {}
    with tempfile.TemporaryDirectory(prefix="fastlora_first_step_") as tmp:
        caches = {var: Path(tmp) / var.lower() for var in CACHE_VARS}
        for path in caches.values():
            path.mkdir()
        for run in ("cold", "warm"):
            out = Path(tmp) / f"{run}.json"
            args = ["--model", model, "--variant", variant, "--device", device, "--out", str(out)]
            child = run_child("benchmarks.first_step", args + (["--quick"] if quick else []), out,
                              deadline - time.monotonic(), env=caches)
            result = child["result"] or {}
            if child["returncode"] != 0:
                why = "ran out of time" if child["timed_out"] else f"exit status {child['returncode']}"
                result = {**result, "error": f"{why}: {child['output'][-2000:]}"}
            results[run] = {**result, "process_s": child["seconds"]}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.first_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import torch

    from .model_setups import DROPOUT, MODELS, adapt, build_model, make_batch
    from .train_step import first_step_s, make_step, synchronize
    import_s = time.perf_counter() - start

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as benchmarks/bench_model.py
    spec = MODELS[args.model]
    start = time.perf_counter()
    model = adapt(build_model(spec, args.quick, device), args.variant, spec, DROPOUT)
    step = make_step(model, make_batch(spec, model, args.quick, device), device)
    synchronize(device)
    build_s = time.perf_counter() - start
    first = first_step_s(step, device)
    write_json(args.out, {"model": args.model, "variant": args.variant, "import_s": import_s, "build_s": build_s,
                          "first_step_s": first, "second_step_s": first_step_s(step, device)})


if __name__ == "__main__":
    main()

"""CLI: python -m benchmarks.continual [--quick] [--scenario NAME] [--seeds N] [--ablations]
[--steps N | --epochs N] [--out-dir DIR].

Writes continual_<scenario>[_ablations][_<N>steps][_quick].json and .png under --out-dir (default
benchmarks/results/); _<N>steps when the run length per task is not the scenario's default."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .data import SCENARIOS, load_scenario
from .methods import ABLATIONS, METHODS
from .report import format_table, save_json, save_plot
from .runner import run_benchmark
from .train import steps_per_epoch

RESULTS = Path(__file__).resolve().parent.parent / "results"
EPOCHS = {"split": 10, "permuted": 6}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__)
    parser.add_argument("--scenario", choices=SCENARIOS, default="split")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 3 epochs per task, each method's single quick lr")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs per task (default {EPOCHS}, quick 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per task (rounded to whole epochs; instead of --epochs)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=[m.name for m in METHODS + ABLATIONS], default=None)
    parser.add_argument("--ablations", action="store_true",
                        help="add the ablations (one knob of a method changed; see methods.ABLATIONS)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and (args.steps < 1 or args.epochs is not None):
        parser.error("--steps must be >= 1 and cannot be combined with --epochs")
    seeds = tuple(range(args.seeds or (1 if args.quick else 5)))
    per_epoch = steps_per_epoch(load_scenario(args.scenario, 0).tasks[1], 64)
    default = 3 if args.quick else EPOCHS[args.scenario]
    epochs = max(1, round(args.steps / per_epoch)) if args.steps else args.epochs or default
    start = time.perf_counter()
    result, runs = run_benchmark(args.scenario, seeds=seeds, epochs=epochs,
                                 pretrain_epochs=30 if args.quick else 60, rank=args.rank,
                                 quick_lr=args.quick, methods=args.methods, progress=not args.no_progress,
                                 ablations=args.ablations)
    result["total_seconds"] = time.perf_counter() - start
    name = (f"continual_{args.scenario}" + ("_ablations" if args.ablations else "")
            + ("" if epochs == default else f"_{epochs * per_epoch}steps") + ("_quick" if args.quick else ""))
    save_json(result, args.out_dir / f"{name}.json")
    save_plot(result, runs, args.out_dir / f"{name}.png")
    print(format_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    print("\nCompared with LoRA (computed from the numbers above):")
    for line in result["verdict"]:
        print(f"- {line}")
    if result["ablation_verdict"]:
        print("\nEach ablation compared with its method (computed from the numbers above):")
        for line in result["ablation_verdict"]:
            print(f"- {line}")
    print(f"\n{result['total_seconds']:.1f} s; wrote {args.out_dir / name}.json and .png")
    return result


if __name__ == "__main__":
    # The matmuls are tiny: one intra-op thread is fastest, and immune to contention from other
    # processes (two spinning threads on two busy cores ran ~10x slower).
    torch.set_num_threads(1)
    main()

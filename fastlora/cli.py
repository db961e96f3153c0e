"""Command line: ``python -m fastlora demo`` (also installed as ``fastlora``)."""
from __future__ import annotations

import argparse
import sys

METHODS = ["lora", "selective_lora", "rank_selective_lora", "curlora", "neat", "cascade_lora"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="inject every method into a pretrained MiniLM, check and time it")
    demo.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    demo.add_argument("--rank", type=int, default=8)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import format_table, run_demo
        reports = run_demo(args.methods, args.rank, args.steps, args.backend)
        print(format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())

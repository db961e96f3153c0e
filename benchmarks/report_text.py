"""Helpers of the benchmark reports: table cells, an item's name, the line that names an exception, what a
variant adds to the frozen model's step.

It imports neither fastlora nor Triton: compile_check's worker processes import it before they set Triton up."""
from __future__ import annotations

import re
from typing import Optional


def cell(value: Optional[float], fmt: str) -> str:
    """``value`` formatted, or a dash as wide as ``fmt``'s width."""
    width = int(fmt.split(".")[0].rstrip("df") or 0)
    return "-".rjust(width) if value is None else format(value, fmt)


EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b")


def error_line(text: str) -> str:
    """The line of a traceback that names the exception (CUDA errors are followed by advice lines), else
    its last line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    named = [line for line in lines if EXCEPTION_LINE.match(line)]
    return (named or lines or [""])[-1]


def item_name(item: dict) -> str:
    """"op plain bfloat16 triton": a correctness (or compile) item's description in one string."""
    return " ".join(str(item[k]) for k in ("kind", "case", "variant", "method", "act", "dtype", "plan") if k in item)


def added_over_base(variants: dict) -> dict[str, float]:
    """Adapted variant -> its step minus the frozen base's ("base"), in ms; empty without a "base" row."""
    if "base" not in variants:
        return {}
    base = variants["base"]["step_ms"]
    return {name: row["step_ms"] - base for name, row in variants.items() if name != "base"}

"""Regexes from configs, checked before they are matched against every module name of a model.

A pattern must compile and, so that matching cannot backtrack catastrophically, must not repeat a
group that itself holds a repetition or an alternation (``(a+)+``, ``(a|ab)*``; a repetition is ``*``,
``+`` or ``{m,n}`` with n > 1), and may hold at most ``MAX_REGEX_REPETITIONS`` repetitions in all.
"""
from __future__ import annotations

import math
import re

MAX_REGEX_REPETITIONS = 4
_COUNT = re.compile(r"\{(?!\})(\d*)(,?)(\d*)\}")  # {m}, {m,}, {,n}, {m,n}; "{}" is a literal


def check_regex(pattern: str, field: str = "target_modules") -> None:
    """Refuse a pattern that does not compile or could backtrack catastrophically (see the module docstring)."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{field} regex {pattern!r} is invalid: {error}") from None
    risky = [False]  # per open group: holds a repetition or an alternation
    after_risky_group = False
    repetitions = 0
    i = 0
    while i < len(pattern):
        char, repeat_max = pattern[i], None
        if char == "\\":
            i += 2
        elif char == "[":
            i = _class_end(pattern, i)
        elif pattern.startswith("(?#", i):
            i = pattern.index(")", i) + 1
        elif char == "(":
            risky.append(False)
            i += 2 if pattern.startswith("?", i + 1) else 1
        elif char == ")":
            inner = risky.pop()
            risky[-1] = risky[-1] or inner
            i += 1
            after_risky_group = inner
            continue
        elif char == "|":
            risky[-1] = True
            i += 1
        elif char in "*+?":
            repeat_max, i = (1 if char == "?" else math.inf), i + 1
        elif (count := _COUNT.match(pattern, i)) is not None:
            low, comma, high = count.groups()
            repeat_max = (int(high) if high else math.inf) if comma else int(low)
            i = count.end()
        else:
            i += 1
        if repeat_max is not None:
            i += pattern.startswith(("?", "+"), i)  # lazy or possessive modifier
            if repeat_max > 1:
                if after_risky_group:
                    raise ValueError(f"{field} regex {pattern!r} repeats a group that itself holds a "
                                     f"repetition or an alternation, which can backtrack catastrophically; "
                                     f"write it without nested repetition")
                repetitions += 1
                risky[-1] = True
        after_risky_group = False
    if repetitions > MAX_REGEX_REPETITIONS:
        raise ValueError(f"{field} regex {pattern!r} holds {repetitions} repetitions; at most "
                         f"{MAX_REGEX_REPETITIONS} are allowed (each one multiplies the matching time)")


def _class_end(pattern: str, start: int) -> int:
    """Index just past the character class opening at ``start``."""
    i = start + 1
    i += pattern.startswith("^", i)
    i += pattern.startswith("]", i)  # a leading ] is a literal
    while pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1

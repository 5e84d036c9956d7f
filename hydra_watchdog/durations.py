"""Durations as users write them: "500ms", "5s", "10m", "1h", "1d", or a plain number of seconds."""

from __future__ import annotations

import math
import re
from decimal import Decimal

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII only: Python's \d, int() and float() also take other scripts' digits ("١٢s" would be 12 s)
# and float() takes "1e3", "1_0" and "inf"; one explicit grammar decides what a duration is.
_PATTERN = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*", re.ASCII)

ACCEPTED = 'a duration like "500ms", "5s", "10m", "1h", "1d" or a number of seconds'


def parse_duration(value: object) -> float:
    """Seconds as a float; ValueError (saying what is accepted) for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected {ACCEPTED}, not a boolean")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float range
            raise ValueError(f"expected {ACCEPTED} (finite)") from None
    elif isinstance(value, str):
        match = _PATTERN.fullmatch(value)
        if match is None:
            raise ValueError(f"expected {ACCEPTED}")
        number, unit = float(match.group(1)), match.group(2) or "s"
        # Dividing is correctly rounded, so "700ms" is exactly the float 0.7 (700 * 0.001
        # is not), and every whole millisecond count formats back as itself.
        seconds = number / 1000 if unit == "ms" else number * _UNITS[unit]
    else:
        raise ValueError(f"expected {ACCEPTED}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected {ACCEPTED} (finite, not negative)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact rendering in the units parse_duration accepts.

    Exact means parse_duration(format_duration(x)) == x for every finite x >= 0: each candidate
    is checked by parsing it back, because a unit's size times a count can round (huge values).
    """
    if not math.isfinite(seconds):
        return f"{seconds}s"
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            text = f"{int(seconds // size)}{unit}"
            if parse_duration(text) == seconds:
                return text
    if 0 < seconds < 1:
        text = f"{round(seconds * 1000)}ms"
        if parse_duration(text) == seconds:
            return text
    # repr() gives the shortest digits that round-trip; Decimal spells them without an exponent,
    # which the duration grammar (and "1e-07s") would not accept.
    return f"{Decimal(repr(seconds)):f}s"

"""Durations as users write them: "500ms", "5s", "10m", "1h", "1d", or a plain number of seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")

ACCEPTED = 'a duration like "500ms", "5s", "10m", "1h", "1d" or a number of seconds'


def parse_duration(value: object) -> float:
    """Seconds as a float; ValueError (saying what is accepted) for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected {ACCEPTED}, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f"expected {ACCEPTED}") from None
        else:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"expected {ACCEPTED}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected {ACCEPTED} (finite, not negative)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact rendering in the units parse_duration accepts."""
    if seconds == 0:
        return "0s"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1 and round(seconds * 1000, 6).is_integer():
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"

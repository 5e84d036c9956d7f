"""Printed refusals read back as one message: the watchdog wraps each at 100 columns
(printable.wrapped), so a test looks for a phrase in the lines joined again."""

from __future__ import annotations


def unwrapped(text: str) -> str:
    """The lines of `text` joined by single spaces, their indents dropped."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())

"""What the command screens share (`status`, `check`, `verify`): one verdict line, then facts
under right-aligned labels, all within 100 columns; colour only on a terminal.

Colour follows https://no-color.org: none when NO_COLOR is set to anything but "", none when the
output is not a terminal (piped, redirected) or TERM is "dumb". Text from other processes is
escaped (printable) by the screens before it gets here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

WIDTH = 100
LABEL = 11  # label column, right-aligned: "  Findings: ..." (as `systemctl status` aligns)

# SGR codes: the verdicts' colours, and the tones the screens use for a word or two.
_TONES = {
    "OK": "32",
    "WARNING": "33",
    "CRITICAL": "31",
    "UNKNOWN": "35",
    "FAIL": "31",
    "SKIP": "33",
    "good": "32",
    "bad": "31",
    "warn": "33",
    "dim": "2",
    "bold": "1",
}


def wants_colour() -> bool:
    """Whether standard output gets colour (see the module's doc)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class Style:
    """Paints words when `colour`; otherwise leaves them as they are."""

    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def paint(self, text: str, tone: str) -> str:
        code = _TONES.get(tone)
        if not self.colour or code is None or not text:
            return text
        return f"\x1b[{code}m{text}\x1b[0m"


def wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken at spaces; a word longer than a
    line is cut into pieces (a path, a command line without spaces)."""
    words: list[str] = []
    for word in text.split(" "):
        words += [word[i : i + width] for i in range(0, len(word), width)] or [""]
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def hanging(text: str, first: int, indent: int) -> list[str]:
    """`text` wrapped, its first line within `first` columns, the lines after it indented by
    `indent` within WIDTH: a hanging indent, so a wrapped line never reads as the next entry."""
    head, *rest = wrap(text, first)
    if not rest:
        return [head]
    return [head, *(" " * indent + line for line in wrap(" ".join(rest), WIDTH - indent))]


def fact(label: str, values: str | Iterable[str], style: Style, tone: str = "") -> list[str]:
    """`label:` right-aligned in its column, then each value from the next column, wrapped with
    a hanging indent (so a wrapped value never reads as the next one); the label is painted in
    `tone` (the values carry their own colour, if any)."""
    out: list[str] = []
    head = f"{label}:" if label else ""
    for value in [values] if isinstance(values, str) else values:
        first, *rest = hanging(value, WIDTH - LABEL - 1, LABEL + 3)
        shown = style.paint(head, tone) if head else ""
        out.append(" " * (LABEL - len(head)) + shown + " " + first)
        out += rest
        head = ""
    return out


def emit(text: str) -> None:
    """Write a screen to standard output. A reader that went away (`status | head -c1`) ends the
    output quietly: the rest is dropped and the command still exits with its own code, never a
    traceback."""
    out = sys.stdout
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit and would report the broken pipe then: point the
        # descriptor at /dev/null so that last flush has somewhere to go.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, out.fileno())
        finally:
            os.close(devnull)

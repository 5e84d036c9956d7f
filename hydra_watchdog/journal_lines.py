"""Which lines of TabbyAPI's journal say why it exited (the journal finding, findings.py).

A crash loop leaves the same start-up lines once per start ("Uvicorn running on ..." three
times) and PID 1's lines about each exit, which the unit's Result= and exit status already say
(findings.unit_state). What explains an exit is an error: the last line of a Python traceback,
an ERROR or CRITICAL line, a kill, an out-of-memory. Those are quoted, each once with how often
it came; where there is none, the last distinct lines are.

The excerpt itself is two reads (adapters/systemd.py): TabbyAPI's own lines and PID 1's about
the unit, each its own `-n` window, joined here by time (`latest`). One read for both let PID 1's
notes on the unit's files crowd TabbyAPI's lines out of the window: systemd < 254 logs two of
them at every load of a unit whose drop-in sets RestartSteps=, and a stopped unit is unloaded and
loaded again by each read of its state, several times a cycle. Within a second of the watchdog's
restart-loop stop, the window held nothing but those notes, and the diagnosis named no error.
Pure: no I/O.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Sequence

PID1_MARK = " systemd[1]: "  # journalctl's short-iso: "<time> <host> systemd[1]: <message>"
# journalctl -o short-iso(-precise): "2026-12-01T19:19:02[.123456]+0000 host ident[pid]: message"
_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\S+ \S+ [^\s:]+: ")
# PID 1 on the unit's files ("/etc/.../10-hydra-watchdog.conf:28: Unknown key ..., ignoring"),
# logged again at every load of the unit: nothing about how TabbyAPI ran.
UNIT_FILE_NOTE = re.compile(r"systemd\[1\]: /\S+:\d+: ")
_ERROR = re.compile(
    r"\b(?:ERROR|CRITICAL|FATAL|Fatal|Killed|Aborted)\b|\b\w+(?:Error|Exception)\b|[Ee]rror:"
    r"|Segmentation fault|core dumped|out of memory"
)
# TabbyAPI's answer to one request ("Sent to request: No models are currently loaded."): an
# ERROR line, but nothing about why the process ended.
_REQUEST_ERROR = "Sent to request:"
KEEP = 3


def message(line: str) -> str:
    """The line's message, without journalctl's time, host and identifier."""
    return _PREFIX.sub("", line, count=1).rstrip()


def _explains(text: str) -> bool:
    # A traceback's frames are indented, and its header names no error: its last line does.
    return (
        bool(_ERROR.search(text))
        and not text[:1].isspace()
        and not text.startswith("Traceback")
        and _REQUEST_ERROR not in text
    )


def explaining(excerpt: Sequence[str], keep: int = KEEP) -> tuple[tuple[str, ...], bool]:
    """(the lines to quote, whether they are errors): TabbyAPI's own lines before PID 1's (the
    latter only when there is nothing else), its errors before anything else, each distinct
    line once, the last `keep` of them in order, a repeated one with its count. Without an
    error, no line that names one either (a request's ERROR line, a traceback's frame): what is
    quoted then is truly "none names an error"."""
    own = [line for line in excerpt if PID1_MARK not in line] or list(excerpt)
    texts = [message(line) for line in own]
    errors = [t for t in texts if _explains(t)]
    chosen = errors or [t for t in texts if t.strip() and not _names_error(t)]
    return _distinct_last(chosen, keep), bool(errors)


def request_errors(excerpt: Sequence[str]) -> int:
    """How many lines are TabbyAPI's ERROR answers to one request: while no model is loaded,
    each of the watchdog's own /v1/model polls writes one. They say nothing about an exit."""
    return sum(_REQUEST_ERROR in line for line in excerpt)


def _names_error(text: str) -> bool:
    return bool(_ERROR.search(text)) or "error" in text.lower()


def _distinct_last(texts: Sequence[str], keep: int) -> tuple[str, ...]:
    counts = Counter(texts)
    last: list[str] = []
    for text in reversed(texts):
        if text not in last:
            last.append(text)
            if len(last) == keep:
                break
    return tuple(f"{t} ({counts[t]}x)" if counts[t] > 1 else t for t in reversed(last))


def latest(own: Sequence[str], pid1: Sequence[str], keep: int) -> tuple[str, ...]:
    """The last `keep` lines of TabbyAPI's own and PID 1's (less its notes on the unit's files),
    oldest first. Each read is in journal order; they are joined by their timestamps, which
    journalctl wrote in one zone and to the microsecond (short-iso-precise, --utc), so comparing
    them as text orders them. At equal times TabbyAPI's line comes first. A message's indented
    continuation lines have no timestamp (""): the merge, which compares the next line of each
    read, takes them at once after the line they continue."""
    said = [line for line in pid1 if not UNIT_FILE_NOTE.search(line)]
    merged = list(heapq.merge(own, said, key=lambda line: line.split(" ", 1)[0]))
    return tuple(merged[-keep:]) if keep > 0 else ()

"""`hydra-watchdog incidents`: the incident records as an operator reads them, or as JSON.

Pure: the command (cli.py) reads the file and hands the incidents and the clock in.
"""

from __future__ import annotations

import time
from typing import Any

from hydra_watchdog.incidents import Incident
from hydra_watchdog.jsonable import to_jsonable
from hydra_watchdog.printable import WIDTH, printable
from hydra_watchdog.report.screen import hanging

_HANG = 12  # "  cause     ", "  21:03:52  ": a wrapped line goes on under the text


def _hanging(head: str, text: str) -> list[str]:
    """`head` and `text` within WIDTH columns, the lines after the first under the text (so a
    wrapped line never reads as the next entry); nothing cut."""
    return hanging(head + printable(text), WIDTH, _HANG)


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(incidents: list[Incident], *, now: float, since_text: str) -> list[str]:
    """One block per incident, oldest first; each line within WIDTH columns."""
    if not incidents:
        return [f"no incidents in the last {since_text}"]
    lines: list[str] = []
    for inc in incidents:
        day = time.strftime("%Y-%m-%d", time.localtime(inc.began))
        ttr = inc.time_to_recover()
        if ttr is None:
            state = f"OPEN for {_span(max(0.0, now - inc.began))}"
        else:
            state = f"recovered in {_span(ttr)} ({inc.outcome.value})"
        lines.append(f"#{inc.number} {inc.alert.value}: {state}")
        lines.append(
            f"  began     {day} {_clock(inc.began)}; detected {_clock(inc.detected)} "
            f"(+{_span(max(0.0, inc.detected - inc.began))})"
        )
        cause = inc.cause or "none found"
        if inc.cause_rule:
            cause = f"[{inc.cause_rule}] {cause}"
        lines += _hanging("  cause     ", cause)
        if inc.actions_dropped:
            lines.append(f"  ({inc.actions_dropped} earlier actions not kept)")
        for a in inc.actions:
            lines += _hanging(f"  {_clock(a.at)}  ", f"{a.action} {a.result}: {a.detail}")
        if not inc.actions and not inc.actions_dropped:
            lines.append("  no action taken")
        if inc.recovered is not None:
            canary = (
                f", canary passed {_clock(inc.canary_at)}"
                if inc.canary_at is not None
                else ", no canary since it began"
            )
            lines.append(f"  healthy   {_clock(inc.recovered)}{canary}")
        elif inc.human_needed:
            lines.append("  A HUMAN IS NEEDED: the watchdog cannot fix this cause")
        else:
            lines.append("  the watchdog is still working on it")
    return lines


def to_json(incidents: list[Incident]) -> list[dict[str, Any]]:
    """The records, with what the text derives (time to recover, outcome) spelled out."""
    out = []
    for inc in incidents:
        doc: dict[str, Any] = to_jsonable(inc)
        doc["open"] = inc.open
        doc["time_to_recover"] = inc.time_to_recover()
        doc["outcome"] = None if inc.open else inc.outcome.value
        out.append(doc)
    return out

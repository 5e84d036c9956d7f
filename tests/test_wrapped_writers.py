"""Issue 23 item 4: every writer keeps its lines within 100 columns, a long value wrapped with a
hanging indent (never cut, never at the margin where it would read as the next entry).

Long values are driven through each writer: the console's log records, the `incidents` view
and the `status` screen (its findings and its actions).
"""

from __future__ import annotations

import dataclasses
import io

from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.incidents import ActionNote, AlertClass, Incident
from hydra_watchdog.policy_state import Finding
from hydra_watchdog.report.incident_view import render as render_incidents
from hydra_watchdog.report.journal import configure_logging, log_event
from hydra_watchdog.report.log import HANGING
from hydra_watchdog.states import Phase, Rule, Severity
from tests.test_status_report import STATE, WALL, build, event, screen

# A path with no space to break at, longer than a line; and a rule's long reason.
PATH = "/srv/" + "/".join(f"very-long-directory-name-{i}" for i in range(6)) + "/main.py"
REASON = "orphan holds the port or VRAM: " + " ".join(f"word{i}" for i in range(40))


def _within(lines: list[str], indent: int) -> None:
    assert lines and max(len(line) for line in lines) <= 100, lines
    assert all(line.startswith(" " * indent) for line in lines[1:]), lines


def _whole(lines: list[str], value: str) -> None:
    """`value` is all there: the lines joined again, the indents and breaks taken out."""
    assert value.replace(" ", "") in "".join(line.strip() for line in lines).replace(" ", "")


def test_the_console_wraps_a_long_record_under_its_message() -> None:
    console = io.StringIO()
    configure_logging(journal=False, stream=console)
    message = f"kill orphan 3001 ({PATH} --port 57065): {REASON}"
    try:
        log_event(
            Event(
                wall=0.0,
                kind=EventKind.ACTION,
                severity=Severity.NOTICE,
                message=message,
                state=Phase.NO_MODEL,
                rule=Rule.ORPHAN_CLEANUP,
            )
        )
    finally:
        configure_logging(journal=False)
    lines = console.getvalue().splitlines()
    _within(lines, HANGING)
    _whole(lines, message)
    assert lines[0].split("] ", 1)[1].startswith("action          [orphan_cleanup] kill orphan")


def test_the_incidents_view_wraps_a_long_cause_and_action() -> None:
    incident = Incident(
        number=1,
        alert=AlertClass.DOWN,
        began=WALL - 60,
        detected=WALL - 55,
        actions=(ActionNote(WALL - 50, "kill_orphan", "ok", f"kill orphan 3001 ({PATH})"),),
        cause=REASON,
        cause_rule="orphan_cleanup",
    )
    lines = render_incidents([incident], now=WALL, since_text="24h")
    cause = next(i for i, line in enumerate(lines) if line.startswith("  cause     "))
    action = next(i for i, line in enumerate(lines) if "kill_orphan ok" in line)
    _within(lines[cause:action], 12)
    _whole(lines[cause:action], REASON)
    tail = [line for line in lines[action:] if line.startswith(" " * 12)]
    _within([lines[action], *tail], 12)
    _whole([lines[action], *tail], PATH)


def test_the_status_screen_wraps_long_findings_and_actions() -> None:
    state = dataclasses.replace(
        STATE, findings=(Finding(Rule.ORPHAN_CLEANUP, Severity.WARNING, f"{REASON} {PATH}"),)
    )
    kill = event(
        EventKind.ACTION,
        f"kill orphan 3001 ({PATH}): pid 3001 exited after SIGTERM",
        WALL - 90,
        rule=Rule.ORPHAN_CLEANUP,
        action="kill_orphan",
        reason=REASON,
    )
    lines = screen(build(state=state, recent=(kill,)), now=WALL).splitlines()
    assert max(len(line) for line in lines) <= 100, lines
    _whole(lines, PATH)

"""The daemon's logging (report/log.py): the console line, its colours, exception(), level
filtering, secrets scrubbed, the never-raise rule and the capture seam."""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from hydra_watchdog.actions import (
    ActionResult,
    KillOrphan,
    LoadModel,
    Reason,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.printable import printable
from hydra_watchdog.report import log
from hydra_watchdog.report.journal import configure_logging, event_fields, log_event
from hydra_watchdog.report.log import HANGING, capture_logs, get_logger
from hydra_watchdog.states import Rule, Severity
from tests.policy_kit import Run, obs
from tests.test_narration_voice import _story


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with capture_logs():  # puts the process's configuration back after the test
        yield


def _stamped(line: str) -> str:
    """The line less its local-time stamp, which must be a time within the last minute."""
    stamp, rest = line[:19], line[20:]
    assert abs(time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) - time.time()) < 60
    return rest


def unwrapped(text: str) -> list[str]:
    """The console's records, each on one line again (a wrapped one goes on indented)."""
    records: list[str] = []
    for line in text.splitlines():
        if line.startswith(" ") and records:
            records[-1] += " " + line.lstrip()
        else:
            records.append(line)
    return records


def test_console_line_shows_level_message_and_fields_quoted_and_escaped() -> None:
    console = io.StringIO()
    configure_logging(journal=False, stream=console)
    get_logger("test").warning(
        "restart tabbyapi.service\n[fake] ok",
        hydra_state="down",
        hydra_reason="3 probes refused in 15 s",
        command="nc\x1b[2J",
        attempt=2,
        message_id="c32d8ac185494636a75dd41c7d0e41cf",
        priority=5,
        skipped=None,
    )
    # A short message is padded, so the fields of successive lines start in one column.
    get_logger("test").info("started", pid=7)
    first, second = unwrapped(console.getvalue())
    assert _stamped(first) == (
        "[warning  ] restart tabbyapi.service\\n[fake] ok "
        "attempt=2 command='nc\\x1b[2J' hydra_reason='3 probes refused in 15 s' hydra_state=down"
    )
    assert _stamped(second) == f"[info     ] {'started':<30} pid=7"


def test_colours_on_a_terminal_and_none_under_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, follower = os.openpty()
    monkeypatch.delenv("NO_COLOR", raising=False)
    with os.fdopen(follower, "w") as terminal, os.fdopen(leader, "rb", buffering=0) as screen:
        configure_logging(journal=False, stream=terminal)
        get_logger("test").warning("coloured", attempt=2)
        shown = screen.read(4096).decode()
        assert "\x1b[" in shown and "coloured" in shown  # the level, the message, the field
        monkeypatch.setenv("NO_COLOR", "1")
        configure_logging(journal=False, stream=terminal)
        get_logger("test").warning("plain", attempt=2)
        shown = screen.read(4096).decode()
        assert "plain" in shown and "\x1b" not in shown
    monkeypatch.delenv("NO_COLOR")
    off_terminal = io.StringIO()
    configure_logging(journal=False, stream=off_terminal)
    get_logger("test").warning("to a file", attempt=2)
    assert "to a file" in off_terminal.getvalue() and "\x1b" not in off_terminal.getvalue()


def test_secrets_are_scrubbed_from_every_record() -> None:
    console = io.StringIO()
    configure_logging(journal=False, stream=console)
    get_logger("test").error(
        "load refused by http://tabby:hunter2@127.0.0.1:5000/v1/model/load",
        admin_key="k-admin-0001",
        authorization="Bearer k-admin-0002",
        detail="sent Authorization: Bearer k-admin-0003; got 401",
        url="http://user:k-admin-0004@127.0.0.1:5000/",
        gpu_index=0,
    )
    out = console.getvalue()
    for secret in ("hunter2", "k-admin-0001", "k-admin-0002", "k-admin-0003", "k-admin-0004"):
        assert secret not in out
    assert "http://[redacted]@127.0.0.1:5000/v1/model/load" in out
    assert "admin_key=[redacted]" in out and "Bearer [redacted]; got 401" in out
    assert "gpu_index=0" in out  # the rest as it was


def test_exception_prints_the_traceback_under_the_line() -> None:
    console = io.StringIO()
    configure_logging(journal=False, stream=console)
    try:
        empty: dict[str, int] = {}
        empty["missing\x1b[2J"]
    except KeyError:
        get_logger("test").exception("cycle failed", attempt=2)
    first, *trace = console.getvalue().splitlines()
    assert "[error    ] cycle failed" in first and first.endswith(" attempt=2")
    assert trace[0] == "Traceback (most recent call last):"
    assert trace[-1] == "KeyError: 'missing\\x1b[2J'"  # escaped: the text came from elsewhere
    assert "exception=" not in first


def test_exception_outside_a_handler_is_a_plain_error() -> None:
    with capture_logs() as records:
        get_logger("test").exception("no exception here")
    assert records == [{"event": "no exception here", "level": "error"}]


def test_level_filtering() -> None:
    console = io.StringIO()
    configure_logging(journal=False, stream=console, level=logging.WARNING)
    logger = get_logger("test")
    logger.debug("debug line")
    logger.info("info line")
    logger.warning("warning line")
    logger.critical("critical line")
    assert [line.split("] ")[1].strip() for line in console.getvalue().splitlines()] == [
        "warning line",
        "critical line",
    ]
    configure_logging(journal=False, stream=console, level=logging.DEBUG)
    logger.debug("now shown")
    assert "[debug    ] now shown" in console.getvalue()


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("repr failed")


class _BrokenLogger:
    def msg(self, _line: str) -> None:
        raise OSError("sink is gone")

    error = msg


def test_logging_never_raises_into_the_caller() -> None:
    log.configure(log.chain(*log.console_chain(io.StringIO())), _BrokenLogger(), logging.INFO)
    get_logger("test").error("lost, not raised")

    def broken(_logger: Any, _method: str, _event: structlog.typing.EventDict) -> Any:
        raise RuntimeError("a processor with a bug")

    log.configure(log.chain(broken), log.ConsoleLogger(io.StringIO()), logging.INFO)
    get_logger("test").error("lost, not raised")

    closed = io.StringIO()
    closed.close()
    configure_logging(journal=False, stream=closed)
    get_logger("test").info("lost, not raised")

    configure_logging(journal=False, stream=io.StringIO())
    get_logger("test").info("a value that cannot be shown", value=_Unprintable())


def test_capture_logs_records_event_dicts_and_restores_the_sink() -> None:
    console = io.StringIO()
    configure_logging(journal=False, stream=console)
    with capture_logs() as records:
        get_logger("test").warning("config file unreadable", path="/etc/x.toml")
    assert records == [
        {"event": "config file unreadable", "path": "/etc/x.toml", "level": "warning"}
    ]
    assert console.getvalue() == ""
    get_logger("test").info("back on the console")
    assert "back on the console" in console.getvalue()


# The console's level names: syslog's, spelled out where the console already spelled them.
_LEVEL_OF = {
    Severity.DEBUG: "debug",
    Severity.INFO: "info",
    Severity.NOTICE: "notice",
    Severity.WARNING: "warning",
    Severity.ERR: "error",
    Severity.CRIT: "critical",
}
_FIELD = re.compile(r" ([a-z_]+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S+)")


def _actions_events() -> list[Event]:
    """What narrate tells of actions beside the story's: their extra fields (pid, GPU, watts,
    result, error kind) and each result's kind."""
    run = Run()
    orphan = Reason(Rule.ORPHAN_CLEANUP, "orphan holds the port or VRAM: pid 4242 python main.py")
    hot = Reason(Rule.POWER_LIMIT, "gpu1 at 91 C")
    down = Reason(Rule.DOWN, "refused")
    kill = KillOrphan(4242, 77, ("python", "main.py"), 1000, orphan)
    limit = SetPowerLimit(1, 250.0, hot)
    restart = UnitCommand(UnitVerb.RESTART, "tabbyapi.service", down)
    load = LoadModel("M", 4 << 30, Reason(Rule.NO_MODEL, "healthy but no model loaded"))
    results = (
        ActionResult(kill, ResultStatus.OK, "gone after SIGTERM", 5.0),
        ActionResult(
            limit, ResultStatus.FAILED, "NVML: no permission", 5.0, ErrorKind.NO_PERMISSION
        ),
        ActionResult(restart, ResultStatus.REFUSED, "the unit's MainPID changed", 5.0),
    )
    failed = ActionResult(
        load, ResultStatus.FAILED, "out of memory on gpu0", 5.0, ErrorKind.LOAD_ERROR, duration_s=2
    )
    o = obs(5, results=(failed,))
    return list(narrate(run.state, run.state, (), results, o, config=run.cfg, wall=5.0))


def _console_records(events: list[Event]) -> list[str]:
    console = io.StringIO()
    configure_logging(journal=False, stream=console, level=logging.DEBUG)
    for event in events:
        log_event(event)
    lines = console.getvalue().splitlines()
    assert all(len(line) <= 100 for line in lines), [ln for ln in lines if len(ln) > 100]
    for line in lines:  # a wrapped record goes on under its message, never at the margin
        if line.startswith(" "):
            assert line.startswith(" " * HANGING) and line[HANGING] != " ", line
    return unwrapped(console.getvalue())


def test_the_console_says_an_event_as_the_demo_does_once_at_its_severity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Console lines (no journald: a terminal, a container) of the demo story and of action
    results: the [rule] before the message, the level the event's severity, and no field that
    repeats what the line says; journald's fields stay as they were."""
    monkeypatch.setenv("NO_COLOR", "1")
    events = [e for _, e in _story()] + _actions_events()
    assert {EventKind.ACTION_FAILED, EventKind.ACTION_REFUSED, EventKind.LOAD_FAILED} <= {
        e.kind for e in events
    }
    records = _console_records(events)
    assert len(records) == len(events)
    told = ""  # the messages of the records before: a field that repeats one says it twice
    for event, record in zip(events, records, strict=True):
        level, _, rest = _stamped(record).partition("] ")
        message = printable(event.message)
        said = f"[{event.rule.value}] {message}" if event.rule else message
        assert level == f"[{_LEVEL_OF[event.severity]:<9}", record
        assert rest.startswith(event.kind.value) and said in rest, record
        line = level + rest.split(message, 1)[0] + message  # what the line says before fields
        for key, value in _FIELD.findall(rest.split(message, 1)[1]):
            text = value[1:-1] if value[:1] in "'\"" else value
            assert text not in line, f"{key}={value} repeats {record!r}"
            assert text not in told, f"{key}={value} repeats a record before {record!r}"
        told += line + "\n"
        journald = dict(event_fields(event))  # every field still there for journalctl
        assert journald["HYDRA_EVENT"] == event.kind.value
        assert journald["HYDRA_SEVERITY"] == event.severity.value
        assert journald.get("HYDRA_REASON", "") == event.reason
        assert journald.get("HYDRA_RULE") == (event.rule.value if event.rule else None)

"""The daemon's logger (report/log.py): the console line, exception(), level filtering, the
never-raise rule, the capture seam, and that importing the daemon does not pull in asyncio."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hydra_watchdog.report import log
from hydra_watchdog.report.journal import configure_logging
from hydra_watchdog.report.log import LogConfig, capture_logs, console_line, get_logger

WHEN = 1_790_000_000.0


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with capture_logs():  # puts the process's configuration back after the test
        yield


def test_console_line_shows_level_message_and_fields_quoted_and_escaped() -> None:
    event = {
        "event": "restart tabbyapi.service\n[fake] ok",
        "level": "warning",
        "hydra_state": "down",
        "hydra_reason": "3 probes refused in 15 s",
        "command": "nc\x1b[2J",
        "attempt": 2,
        "message_id": "c32d8ac185494636a75dd41c7d0e41cf",
        "priority": 5,
        "skipped": None,
    }
    line = console_line(event, WHEN)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(WHEN))
    assert line == (
        f"{stamp} [warning  ] restart tabbyapi.service\\n[fake] ok "
        "attempt=2 command='nc\\x1b[2J' hydra_reason='3 probes refused in 15 s' hydra_state=down"
    )
    # A short message is padded, so the fields of successive lines start in one column.
    short = console_line({"event": "started", "level": "info", "pid": 7}, WHEN)
    assert short == f"{stamp} [info     ] {'started':<30} pid=7"


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


def test_logging_never_raises_into_the_caller() -> None:
    def broken(_event: log.EventDict) -> None:
        raise OSError("sink is gone")

    log.configure(LogConfig(broken))
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


def test_importing_the_daemon_does_not_import_asyncio() -> None:
    """The daemon is threaded and runs no event loop; structlog imported asyncio for it (issue 15:
    2.6 MB of the daemon's RSS with structlog, measured)."""
    probe = "import sys, hydra_watchdog.daemon; print('asyncio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "False"

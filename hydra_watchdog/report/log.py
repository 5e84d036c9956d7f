"""The daemon's logger: `get_logger(name).info("message", key=value)`, level filtering, one sink.

A call builds one event dict, `{"event": message, **fields, "level": "info"}` (plus `exception`,
the formatted traceback, from `exception()`), and hands it to the sink that configure_logging
(journal.py) installed: journald's native protocol under systemd, `console_sink` otherwise. The
configuration is process-wide, one frozen LogConfig swapped under a lock, so a thread that logs
while another reconfigures sees either the old sink or the new one, never half of each.

Our own rather than a logging library's: the daemon is threaded and runs no event loop, and the
library we used imported asyncio at start-up (2.6 MB of the daemon's RSS between them,
measured) for a front end this small. Logging never raises into the daemon: a sink or a value
that fails loses the record.

`capture_logs()` is the test seam: it records the event dicts instead of writing them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from hydra_watchdog.printable import printable

EventDict = dict[str, Any]
Sink = Callable[[EventDict], None]

# The stdlib's numbers, so configure_logging(level=logging.DEBUG) means what it says.
LEVELS: Mapping[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# Only journald reads these (journal.py's render_fields); the console shows the level instead.
_JOURNAL_ONLY = frozenset({"message_id", "priority"})
_LEVEL_WIDTH = 9  # "[info     ]": room for the longest name, as the console has always shown
_MESSAGE_WIDTH = 30


@dataclass(frozen=True)
class LogConfig:
    sink: Sink
    level: int = logging.INFO


def console_sink(stream: TextIO | None = None) -> Sink:
    """A sink that prints `console_line` (and a traceback under it) to `stream`, or to whatever
    sys.stderr is at the time of the call."""

    def write(event: EventDict) -> None:
        out = sys.stderr if stream is None else stream
        # Nowhere left to say it if the console fails too; logging must not crash the watchdog.
        with contextlib.suppress(OSError, ValueError):
            print(console_text(event, time.time()), file=out, flush=True)

    return write


_lock = threading.Lock()
_config = LogConfig(console_sink())


def configure(config: LogConfig) -> LogConfig:
    """Install `config` for every logger in the process; returns the one it replaces."""
    global _config  # process-wide by design: one daemon, one place its records go
    with _lock:
        old, _config = _config, config
    return old


class Logger:
    """What the daemon logs through; `name` says who, for a reader of the code."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, message: str, **fields: object) -> None:
        _emit("debug", message, fields, with_traceback=False)

    def info(self, message: str, **fields: object) -> None:
        _emit("info", message, fields, with_traceback=False)

    def warning(self, message: str, **fields: object) -> None:
        _emit("warning", message, fields, with_traceback=False)

    def error(self, message: str, **fields: object) -> None:
        _emit("error", message, fields, with_traceback=False)

    def critical(self, message: str, **fields: object) -> None:
        _emit("critical", message, fields, with_traceback=False)

    def exception(self, message: str, **fields: object) -> None:
        """An error with the exception being handled attached as `exception` (its traceback)."""
        _emit("error", message, fields, with_traceback=True)


def get_logger(name: str) -> Logger:
    return Logger(name)


def _emit(
    level: str,
    message: str,
    fields: Mapping[str, object],
    *,
    with_traceback: bool,
    trace: str = "",
) -> None:
    config = _config  # one read: the whole record goes to one configuration
    if LEVELS[level] < config.level:
        return
    # A record that cannot be told (a sink or a value's str() that fails) is lost, not raised.
    with contextlib.suppress(Exception):
        event: EventDict = {"event": message, **fields, "level": level}
        if with_traceback and sys.exc_info()[0] is not None:
            trace = traceback.format_exc()
        if trace:
            event["exception"] = trace.rstrip("\n")
        config.sink(event)


# --- the package's stdlib loggers ------------------------------------------------------------

STDLIB_ROOT = "hydra_watchdog"  # statefile.py, control.py: logging.getLogger(__name__)


def _level_name(levelno: int) -> str:
    return next((name for name, no in reversed(list(LEVELS.items())) if levelno >= no), "debug")


class _StdlibBridge(logging.Handler):
    """The package's own stdlib `logging` records into the same sink, at their level. Without
    it they reach stderr through logging's last-resort handler as bare text, which journald
    files at its default priority (info), a warning about a corrupt state file included."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a call whose arguments do not fit its format: say the format
            message = str(record.msg)
        trace = ""
        if record.exc_info and record.exc_info[0] is not None:
            trace = "".join(traceback.format_exception(*record.exc_info))
        # journald's own names for where a record comes from (CODE_FILE=, CODE_LINE=, CODE_FUNC=)
        fields = {
            "code_file": record.pathname,
            "code_line": record.lineno,
            "code_func": record.funcName,
        }
        _emit(_level_name(record.levelno), message, fields, with_traceback=False, trace=trace)


_bridge = _StdlibBridge()


def bridge_stdlib(level: int) -> None:
    """Send the package's stdlib loggers (STDLIB_ROOT and below) to this module's sink from
    `level` up; other libraries' loggers (httpx logs every request at INFO) are left alone."""
    logger = logging.getLogger(STDLIB_ROOT)
    if _bridge not in logger.handlers:
        logger.addHandler(_bridge)
    logger.setLevel(level)


# --- the console (pure) -------------------------------------------------------------------------


def pair(key: str, value: object) -> str:
    """`key=value`, the value quoted the way repr() does when it holds a space, is empty or holds
    a character printable() would escape; so one value never reads as two, nor breaks the line."""
    text = value if isinstance(value, str) else repr(value)
    if not text or " " in text or printable(text) != text:
        return f"{key}={text!r}"
    return f"{key}={text}"


def console_line(event: Mapping[str, Any], when: float) -> str:
    """`2026-12-01 18:10:31 [info     ] message                        key=value ...`: local time,
    the level, the message escaped by printable(), then the fields by name (the traceback and
    journald's own fields left out)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    level = f"[{event.get('level', 'info')!s:<{_LEVEL_WIDTH}}]"
    message = printable(str(event.get("event", "")))
    rest = " ".join(
        pair(key, event[key])
        for key in sorted(event)
        if key not in ("event", "level", "exception", *_JOURNAL_ONLY) and event[key] is not None
    )
    return f"{stamp} {level} {message:<{_MESSAGE_WIDTH}} {rest}".rstrip()


def console_text(event: Mapping[str, Any], when: float) -> str:
    """console_line, and the traceback, if there is one, on the lines under it (each line
    escaped: an exception's text can come from another process)."""
    line = console_line(event, when)
    trace = event.get("exception")
    if not isinstance(trace, str) or not trace:
        return line
    return "\n".join([line, *(printable(row) for row in trace.split("\n"))])


@contextlib.contextmanager
def capture_logs(level: int = logging.DEBUG) -> Iterator[list[EventDict]]:
    """Record every event dict at `level` or above, in order, instead of writing it; the previous
    configuration comes back on exit. For tests."""
    records: list[EventDict] = []
    old = configure(LogConfig(records.append, level))
    try:
        yield records
    finally:
        configure(old)

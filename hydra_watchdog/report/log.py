"""The daemon's logging: structlog, its processors in front, journald or the console behind.

`get_logger(name).info("message", key=value)`; also debug, warning, error, critical, and
exception (an error with the traceback being handled). Every record runs through one processor
chain (`chain`):

1. structlog's add_log_level and format_exc_info: `level` ("exception" logs as "error") and
   `exception`, the formatted traceback;
2. the sink's expanders (journal.py's add_event_fields: an Event's HYDRA_* fields; on the
   console add_console_fields: its kind, [rule] and message at its severity, as the demo
   prints it, with only the fields that line does not say);
3. scrub_secrets: a value under a key that names a secret, URL credentials and bearer tokens in
   any text become "[redacted]";
4. escape_controls: the message and each row of the traceback escaped by printable(), so one
   record stays one line (a row each for the traceback) whatever another process wrote;
5. the sink's renderer: journal.py's (native-protocol fields), or `console_chain`'s
   TimeStamper and ConsoleRenderer (colours on a terminal, none under NO_COLOR).

The configuration is process-wide (structlog.configure); configure_logging (journal.py) sets it
once at start, before the threads. Logging never raises into the daemon: a record that fails
anywhere in the chain, its renderer or its output is lost (Logger, the wrapper class).

`capture_logs()` is the test seam: it records the event dicts instead of writing them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO, cast

import structlog
from structlog.dev import Column, ConsoleRenderer, KeyValueColumnFormatter, LogLevelColumnFormatter
from structlog.typing import EventDict, Processor, WrappedLogger

from hydra_watchdog.printable import printable

STDLIB_ROOT = "hydra_watchdog"  # statefile.py, control.py: logging.getLogger(__name__)
REDACTED = "[redacted]"
_MESSAGE_WIDTH = 30  # the message column: the fields of successive lines start together
# Only journald reads these (journal.py); the console shows the level instead.
_JOURNAL_ONLY = ("message_id", "priority")

# --- the front: the wrapper class ---------------------------------------------------------------


class Logger(structlog.BoundLoggerBase):
    """structlog's wrapper class for the daemon: records below the configured level are skipped,
    and whatever fails on a record's way out is swallowed with it."""

    min_level = logging.INFO  # set by configure(), with the chain it goes with

    def _log(self, level: int, method: str, message: str, fields: dict[str, Any]) -> None:
        if level < Logger.min_level:
            return
        # Nowhere left to say it; logging must not crash the watchdog (a value whose repr()
        # raises, a console that is gone).
        with contextlib.suppress(Exception):
            self._proxy_to_logger(method, message, **fields)

    def debug(self, message: str, **fields: Any) -> None:
        self._log(logging.DEBUG, "debug", message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self._log(logging.INFO, "info", message, fields)

    def warning(self, message: str, **fields: Any) -> None:
        self._log(logging.WARNING, "warning", message, fields)

    def error(self, message: str, **fields: Any) -> None:
        self._log(logging.ERROR, "error", message, fields)

    def critical(self, message: str, **fields: Any) -> None:
        self._log(logging.CRITICAL, "critical", message, fields)

    def exception(self, message: str, **fields: Any) -> None:
        """An error with the exception being handled attached as `exception` (its traceback)."""
        fields.setdefault("exc_info", True)
        self._log(logging.ERROR, "error", message, fields)


def get_logger(name: str) -> Logger:
    """A logger for `name` (who logs, for a reader of the code); it follows configure()."""
    return cast(Logger, structlog.get_logger(name))


# --- the processors (pure) ----------------------------------------------------------------------

# Keys whose value is a secret whatever it holds (compared lower-case, "-" read as "_").
SECRET_KEYS = frozenset(
    {"admin_key", "api_key", "x_admin_key", "x_api_key", "authorization", "password", "secret"}
)
# Credentials inside text: a URL's user info (scheme://user:password@host) and a bearer token.
_URL_USER = re.compile(r"(?<=://)[^/@\s]+@")
_BEARER = re.compile(r"(?i)(?<=bearer )[^\s\"',;]+")


def redact_text(text: str) -> str:
    return _BEARER.sub(REDACTED, _URL_USER.sub(REDACTED + "@", text))


def scrub_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Secrets never reach a log: TabbyAPI's keys, a URL's user info, a bearer token."""
    for key, value in event_dict.items():
        if key.lower().replace("-", "_") in SECRET_KEYS and value is not None:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = redact_text(value)
    return event_dict


def escape_controls(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """The message on one line, the traceback a row per line, each escaped by printable(): a
    newline or an escape sequence that another process put in a command line or an error would
    forge or hide lines. (Other values: the console quotes them with repr(); journald keeps
    their bytes, length-prefixed.)"""
    event_dict["event"] = printable(str(event_dict.get("event", "")))
    trace = event_dict.get("exception")
    if isinstance(trace, str):
        event_dict["exception"] = "\n".join(printable(row) for row in trace.split("\n"))
    return event_dict


def chain(*sink: Processor, expand: Sequence[Processor] = ()) -> list[Processor]:
    """The processors of every record, in the order of the module docstring."""
    first: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    return [*first, *expand, scrub_secrets, escape_controls, *sink]


# --- the console --------------------------------------------------------------------------------


def console_value(value: object) -> str:
    """A field's value on the console, quoted the way repr() does when it holds a space, is empty
    or holds a character printable() would escape; so one value never reads as two, nor breaks
    the line."""
    text = value if isinstance(value, str) else repr(value)
    if not text or " " in text or printable(text) != text:
        return repr(text)
    return text


def pair(key: str, value: object) -> str:
    return f"{key}={console_value(value)}"


def _for_console(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key in [k for k, v in event_dict.items() if v is None or k in _JOURNAL_ONLY]:
        del event_dict[key]
    return event_dict


def colours_wanted(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Colours on a terminal, unless NO_COLOR is set to anything (no-color.org)."""
    if environ.get("NO_COLOR"):
        return False
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return bool(stream.isatty())
    return False


def console_renderer(colours: bool) -> ConsoleRenderer:
    """`2026-12-01 18:10:31 [info     ] message                        key=value ...`: local time,
    the level, the message (padded to a column), then the fields sorted by name; a traceback on
    the lines under it."""
    styles = ConsoleRenderer.get_default_column_styles(colours)
    levels = ConsoleRenderer.get_default_level_styles(colours)
    levels["notice"] = levels["info"]  # an event's severity (journal.py); the logger has none
    reset = styles.reset
    return ConsoleRenderer(
        columns=[
            Column("timestamp", KeyValueColumnFormatter(None, styles.timestamp, reset, str)),
            # Padded to the longest level name: "[info     ]".
            Column(
                "level",
                LogLevelColumnFormatter({k: v + styles.bright for k, v in levels.items()}, reset),
            ),
            Column(
                "event",
                KeyValueColumnFormatter(None, styles.bright, reset, str, width=_MESSAGE_WIDTH),
            ),
            Column(
                "", KeyValueColumnFormatter(styles.kv_key, styles.kv_value, reset, console_value)
            ),
        ]
    )


def console_chain(stream: TextIO, environ: Mapping[str, str] = os.environ) -> list[Processor]:
    return [
        _for_console,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        console_renderer(colours_wanted(stream, environ)),
    ]


_SGR = re.compile(r"\x1b\[[0-9;]*m")  # the renderer's colours: no width on the screen
# "2026-12-01 18:10:31 [warning  ] ": a wrapped record goes on under its message
HANGING = 32


def _visible(text: str) -> int:
    return len(_SGR.sub("", text))


def _pieces(word: str, width: int) -> list[str]:
    """`word` cut into pieces of at most `width` visible characters (a colour code stays whole
    in its piece)."""
    pieces, piece, seen = [], "", 0
    for part in re.split(f"({_SGR.pattern})", word):
        if _SGR.fullmatch(part):
            piece += part
            continue
        for ch in part:
            if seen == width:
                pieces.append(piece)
                piece, seen = "", 0
            piece += ch
            seen += 1
    return [*pieces, piece]


def wrap_record(line: str, width: int = 100, indent: int = HANGING) -> str:
    """A rendered record within `width` columns: broken at spaces, each line after the first
    indented under the message (so a wrapped record never reads as the next one)."""
    if _visible(line) <= width:
        return line
    room = width - indent
    out = [""]
    for word in line.split(" "):
        for piece in _pieces(word, room) if _visible(word) > room else [word]:
            if not out[-1] or _visible(out[-1]) + 1 + _visible(piece) <= width:
                out[-1] += (" " if out[-1] else "") + piece
            else:
                out.append(" " * indent + piece)
    return "\n".join(out)


class ConsoleLogger:
    """structlog's logger for the console: prints each rendered record to `stream`, or to
    whatever sys.stderr is at the time of the call; within `width` columns when given (a
    terminal or a file, not a journal stream, where each line is a record)."""

    def __init__(self, stream: TextIO | None = None, width: int | None = None) -> None:
        self._stream = stream
        self._width = width

    def msg(self, line: str) -> None:
        if self._width is not None:
            head, newline, trace = line.partition("\n")  # a traceback's rows stay as they are
            line = wrap_record(head, self._width) + newline + trace
        print(line, file=sys.stderr if self._stream is None else self._stream, flush=True)

    debug = info = warning = error = critical = msg


# --- the configuration ----------------------------------------------------------------------------


def configure(processors: Sequence[Processor], logger: WrappedLogger, level: int) -> None:
    """Install `processors` (see `chain`) and `logger` for every logger in the process."""
    # Process-wide by design: one daemon, one place its records go.
    structlog.configure(
        processors=list(processors),
        wrapper_class=Logger,
        logger_factory=lambda *_args: logger,
        cache_logger_on_first_use=False,  # a later configure() reaches every logger
    )
    Logger.min_level = level


configure(chain(*console_chain(sys.stderr)), ConsoleLogger(width=100), logging.INFO)


@contextlib.contextmanager
def capture_logs(level: int = logging.DEBUG) -> Iterator[list[EventDict]]:
    """Record every event dict at `level` or above, in order, instead of writing it; the previous
    configuration comes back on exit. For tests."""
    records: list[EventDict] = []

    def keep(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        records.append(event_dict)
        raise structlog.DropEvent

    old, old_level = structlog.get_config(), Logger.min_level
    configure(chain(keep), ConsoleLogger(), level)
    try:
        yield records
    finally:
        structlog.configure(**old)
        Logger.min_level = old_level


# --- the package's stdlib loggers ------------------------------------------------------------


def _method_of(levelno: int) -> str:
    levels = (("critical", 50), ("error", 40), ("warning", 30), ("info", 20))
    return next((name for name, no in levels if levelno >= no), "debug")


class _StdlibBridge(logging.Handler):
    """The package's own stdlib `logging` records into the same chain, at their level. Without
    it they reach stderr through logging's last-resort handler as bare text, which journald
    files at its default priority (info), a warning about a corrupt state file included."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a call whose arguments do not fit its format: say the format
            message = str(record.msg)
        fields: dict[str, Any] = {
            # journald's own names for where a record comes from
            "code_file": record.pathname,
            "code_line": record.lineno,
            "code_func": record.funcName,
        }
        if record.exc_info and record.exc_info[0] is not None:
            fields["exc_info"] = record.exc_info
        getattr(_bridged, _method_of(record.levelno))(message, **fields)


_bridge = _StdlibBridge()
_bridged = get_logger(STDLIB_ROOT)


def bridge_stdlib(level: int) -> None:
    """Send the package's stdlib loggers (STDLIB_ROOT and below) through the chain from `level`
    up; other libraries' loggers (httpx logs every request at INFO) are left alone."""
    logger = logging.getLogger(STDLIB_ROOT)
    if _bridge not in logger.handlers:
        logger.addHandler(_bridge)
    logger.setLevel(level)

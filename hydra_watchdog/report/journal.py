"""Logging to journald: its native protocol as a structlog renderer, and the wiring.

Under systemd the records go to journald as real fields (HYDRA_STATE, HYDRA_RULE, ...), not as
JSON inside MESSAGE: structlog has no journald writer of its own, so the chain (log.py) ends here
in `render_journal`, which turns the event dict into journald fields, and JournalWriter sends them
over the native protocol (systemd's JOURNAL_NATIVE_PROTOCOL.md, declared stable) with
logging-journald's transport, pure Python: one datagram of `KEY=value\\n` per record to
/run/systemd/journal/socket, a value holding a newline length-prefixed, a record too big for
one datagram in a sealed memfd. (systemd-python and cysystemd need libsystemd;
structlog-journald needs Python 3.12 and journald-send, a Rust extension: docs/dependencies.md.)

Each EventKind has a fixed MESSAGE_ID; systemd/hydra-watchdog.catalog explains every one of them
(`journalctl -x`). Records about TabbyAPI's unit carry OBJECT_SYSTEMD_UNIT, which puts them in
`journalctl -u tabbyapi` too.

Logging never raises into the daemon: without journald (or when a send fails) the record goes to
the console on stderr instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from logging_journald import JournaldTransport
from structlog.typing import EventDict, WrappedLogger

from hydra_watchdog.events import Event, EventKind, headline
from hydra_watchdog.printable import WIDTH, one_line, printable
from hydra_watchdog.report.log import (
    ConsoleLogger,
    bridge_stdlib,
    chain,
    configure,
    console_chain,
    get_logger,
    pair,
)
from hydra_watchdog.states import Severity

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "hydra-watchdog"

# Fixed forever: the catalog, saved journalctl queries and alerting key on them.
MESSAGE_IDS: Mapping[EventKind, str] = {
    EventKind.STARTED: "73d4f12165064e29bfa91d4a9b7f6386",
    EventKind.STOPPING: "df0d77a6e62c44f89ad673b833932e8e",
    EventKind.STATE_CHANGED: "b6f03d071414463e8a1bc9731d2854d7",
    EventKind.DIAGNOSIS: "eaf4e95abd3042408208c50a0398ca03",
    EventKind.ACTION: "c32d8ac185494636a75dd41c7d0e41cf",
    EventKind.ACTION_FAILED: "b55e3fd852ce4beaadb6c5c1d300b8a1",
    EventKind.ACTION_REFUSED: "a77ce888775642e09bb5534a0ecd0671",
    EventKind.RESTART_LOOP: "7a01b035dca1496d95cd584754b03efe",
    EventKind.ESCALATED: "b8f4c1c186e643a3b2cada233bb8323d",
    EventKind.RECOVERED: "8a4636d83e8c4e3081c7c72aa2b8f21d",
    EventKind.LOAD_PROGRESS: "99b279f192224dfba0f8a034cdcd3b54",
    EventKind.LOAD_FAILED: "344da944559344b39c790dd8ec2747d6",
    EventKind.MODEL_LOADED: "4a5aa72d9b7041bc9b24f32f0936b376",
    EventKind.ADMIN_KEY_REJECTED: "4f002e96e1fe45629a23743b3d52f145",
    EventKind.GENERATION_HANG: "cb6283e32f7144fdb6adc4cd6a4660a6",
    EventKind.PAUSED: "74e9b674ba9e4c4a9e1c1adc1640667c",
    EventKind.RESUMED: "d1271b7198ef4078881f0e95b2e02096",
    EventKind.CONFIG_RELOADED: "7d9b1bea45134c1eaf45dc0c995eba2d",
    EventKind.CONFIG_REJECTED: "935a9f45c03645b38089aada39e42637",
    EventKind.SYSTEM_SWITCHED: "91caf064b19b461b993d3c0d2f14f2d5",
}

# One value is capped so a runaway journal excerpt cannot balloon a record; journald itself
# accepts far more, but nobody reads a megabyte in `journalctl`.
MAX_VALUE_BYTES = 1024 * 1024
_TRUNCATED = b" [truncated]"
_SEND_TIMEOUT_S = 1.0  # a wedged journald must not stall the loop (and its WATCHDOG=1 pings)

_EVENT_KEY = "hydra"  # log_event's Event, which add_event_fields turns into fields
_LEVEL_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_SEVERITY_METHOD = {
    Severity.DEBUG: "debug",
    Severity.INFO: "info",
    Severity.NOTICE: "info",  # the logger has no notice; PRIORITY=5 still comes from the event
    Severity.WARNING: "warning",
    Severity.ERR: "error",
    Severity.CRIT: "critical",
}
# Renamed on the way to journald; anything else is upper-cased.
_RENAMES = {"event": "MESSAGE", "unit": "OBJECT_SYSTEMD_UNIT"}
_DROPPED = {"level", "timestamp", "logger"}  # journald stamps time and level itself


# --- the event dict as journald fields (pure) --------------------------------------------------


def field_name(key: str) -> str | None:
    """A journald field name for `key`: A-Z, 0-9 and _, not starting with _ or a digit (those
    are journald's trusted fields), at most 64 characters; None if nothing usable is left."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper())
    name = name.lstrip("_0123456789")[:64]
    return name or None


def field_value(value: object) -> str:
    """A value as journald text: valid UTF-8 (a lone surrogate becomes "?"), at most
    MAX_VALUE_BYTES, cut on a character boundary."""
    text = ("1" if value else "0") if isinstance(value, bool) else str(value)
    if text.isascii() and len(text) <= MAX_VALUE_BYTES:
        return text
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_VALUE_BYTES:
        # Drop a split UTF-8 sequence at the cut rather than emit a broken character.
        data = data[: MAX_VALUE_BYTES - len(_TRUNCATED)] + _TRUNCATED
    return data.decode("utf-8", "ignore")


def event_fields(event: Event) -> list[tuple[str, str]]:
    """The journald record of one Event (what log_event sends)."""
    return render_fields(event_dict_of(event))


def event_dict_of(event: Event) -> dict[str, Any]:
    """An Event's part of the event dict: its message as `event`, MESSAGE_ID, PRIORITY and the
    HYDRA_* fields."""
    kw: dict[str, Any] = {
        "event": event.message,
        "message_id": MESSAGE_IDS[event.kind],
        "priority": event.severity.priority,
        "hydra_event": event.kind.value,
        "hydra_state": event.state.value,
        "hydra_severity": event.severity.value,
    }
    if event.rule is not None:
        kw["hydra_rule"] = event.rule.value
    if event.action:
        kw["hydra_action"] = event.action
    if event.reason:
        kw["hydra_reason"] = event.reason
    if event.unit:
        kw["unit"] = event.unit
    for key, value in event.fields:
        kw.setdefault(key.lower(), value)
    return kw


def add_event_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """The processor that turns the Event log_event passes as `hydra=` into its fields."""
    event = event_dict.pop(_EVENT_KEY, None)
    if isinstance(event, Event):
        event_dict.update(event_dict_of(event))
    return event_dict


# --- the event dict on the console (pure) ------------------------------------------------------

# The console's level of each severity: the logger method's (_SEVERITY_METHOD), but notice, which
# has no method of its own and is shown as itself.
CONSOLE_LEVELS: Mapping[Severity, str] = {**_SEVERITY_METHOD, Severity.NOTICE: "notice"}
# Fields the console line already says. The kind and the [rule] lead its message and the
# severity is its level (headline); the phases are what the state_changed lines say, the unit
# what the watchdog_started line names; the action, its result, a load's duration and its
# percentage are in the message's words, and the error kind is the class of the error the
# message quotes (for queries and alerts). journald keeps them all.
_CONSOLE_SAID = frozenset(
    {
        "hydra_event", "hydra_rule", "hydra_severity", "hydra_state", "hydra_prev_state",
        "unit", "hydra_action", "hydra_verb", "hydra_result", "hydra_duration_s",
        "hydra_progress_pct", "hydra_error_kind",
    }
)  # fmt: skip
# Kinds whose evidence (HYDRA_REASON) is the decision's, told by a record before them (narrate
# says each text once): a state change by the record of the cycle that said it, or in its own
# message; an action and the end of a load by the diagnosis or state change that led to them;
# the loop and the escalation in their own words.
_EVIDENCE_TOLD = frozenset(
    {
        EventKind.STATE_CHANGED, EventKind.ACTION, EventKind.ACTION_FAILED,
        EventKind.ACTION_REFUSED, EventKind.MODEL_LOADED, EventKind.LOAD_FAILED,
        EventKind.RESTART_LOOP, EventKind.ESCALATED,
    }
)  # fmt: skip


def console_dict_of(event: Event) -> dict[str, Any]:
    """An Event's part of the event dict on the console (no journald: a terminal, a
    container): the line the demo prints (kind, [rule], message) at the level of its severity,
    and only the fields that say more than that line."""
    message = headline(event)
    kw: dict[str, Any] = {"event": message, "level": CONSOLE_LEVELS[event.severity]}
    for key, value in event_dict_of(event).items():
        if key in kw or key in _CONSOLE_SAID or key in ("message_id", "priority"):
            continue
        if key == "hydra_reason" and event.kind in _EVIDENCE_TOLD:
            continue
        if str(value) not in message:
            kw[key] = value
    return kw


def add_console_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """The console's add_event_fields: the Event passed as `hydra=` as console_dict_of says it."""
    event = event_dict.pop(_EVENT_KEY, None)
    if isinstance(event, Event):
        event_dict.update(console_dict_of(event))
    return event_dict


def render_fields(event_dict: Mapping[str, Any]) -> list[tuple[str, str]]:
    """An event dict as journald fields (MESSAGE first, PRIORITY from the level)."""
    # MESSAGE is what journalctl prints as the record's line: a newline in it would show as a
    # line of its own. Other fields travel length-prefixed and keep their raw bytes.
    fields = [("MESSAGE", field_value(printable(str(event_dict.get("event", "")))))]
    priority = event_dict.get("priority")
    if not isinstance(priority, int) or isinstance(priority, bool):
        priority = _LEVEL_PRIORITY.get(str(event_dict.get("level", "info")), 6)
    fields.append(("PRIORITY", str(priority)))
    seen = {"MESSAGE", "PRIORITY"}
    for key, value in event_dict.items():
        if key in _DROPPED or key in ("event", "priority") or value is None:
            continue
        name = _RENAMES.get(key) or field_name(key)
        if name is None or name in seen:
            continue
        seen.add(name)
        fields.append((name, field_value(value)))
    if "SYSLOG_IDENTIFIER" not in seen:
        fields.append(("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER))
    return fields


def render_journal(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> tuple[tuple[list[tuple[str, str]]], dict[str, Any]]:
    """The chain's renderer under journald: the fields, for JournalLogger.msg (a traceback is one
    multi-line EXCEPTION field)."""
    return (render_fields(event_dict),), {}


# --- the socket (imperative shell) --------------------------------------------------------------


class JournalWriter:
    """Sends records to journald's native socket; send() returns False instead of raising.

    logging-journald's transport, unconnected: each datagram is addressed to the path, as
    libsystemd does, so a journald that restarted (a new socket at the path) is found again."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.failure = ""  # why the last send failed ("" after one that went out)
        self._transport: JournaldTransport | None = None
        self._lock = threading.Lock()

    def available(self) -> bool:
        """Is someone listening on the socket? (A datagram connect fails when no one is.)"""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
                probe.connect(self.path)
        except OSError:
            return False
        return True

    def send(self, fields: Iterable[tuple[str, str]]) -> bool:
        with self._lock:
            try:
                if self._transport is None:
                    self._transport = JournaldTransport(self.path, connected=False)
                    self._transport.socket.settimeout(_SEND_TIMEOUT_S)
                self._transport.send(fields)
            except Exception as exc:
                # OSError (journald gone), ValueError, or what a transport of another
                # version raises (an older logging-journald takes no `connected`: TypeError).
                self._close_locked()
                self.failure = f"{type(exc).__name__}: {exc}"
                return False
            self.failure = ""
        return True

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.socket.close()
            self._transport = None


# --- the sinks and their wiring -------------------------------------------------------------------


def stderr_is_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """systemd sets $JOURNAL_STREAM=<dev>:<inode> when it connects stdout/stderr to journald;
    it only counts if that is still our stderr (a child may have inherited the variable)."""
    raw = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = raw.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def _console_line(fields: Sequence[tuple[str, str]]) -> str:
    # `<N>` first: when stderr is itself a journal stream, journald reads it as the PRIORITY.
    values = dict(fields)
    extras = " ".join(
        pair(k.lower(), v)
        for k, v in fields
        if k not in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "MESSAGE_ID")
    )
    message = printable(values.get("MESSAGE", ""))
    return f"<{values.get('PRIORITY', '6')}>{message}  {extras}".rstrip()


class JournalLogger:
    """structlog's logger under journald: sends each record's fields; when a send fails it writes
    the record to the console instead, and why once (again when the reason changes, or after
    journald took a record in between)."""

    def __init__(self, writer: JournalWriter, fallback: ConsoleLogger) -> None:
        self._writer = writer
        self._fallback = fallback
        self._said = ""  # the failure last said on the console

    def msg(self, fields: Sequence[tuple[str, str]]) -> None:
        if self._writer.send(fields):
            self._said = ""
            return
        why = self._writer.failure
        if why != self._said:
            self._said = why
            said = one_line(why, 48)  # the line within 100 columns
            self._fallback.msg(f"<4>cannot log to journald ({said}): records go to stderr")
        self._fallback.msg(_console_line(fields))

    debug = info = warning = error = critical = msg


_state_lock = threading.Lock()
_writer: JournalWriter | None = None


def configure_logging(
    *,
    journal: bool | None = None,
    socket_path: str = JOURNAL_SOCKET,
    stream: TextIO | None = None,
    level: int = logging.INFO,
) -> None:
    """Point the daemon's loggers (log.py), and the package's stdlib ones, at journald or the
    console, at `level` and above.

    journal=None decides by itself: journald when stderr is the journal ($JOURNAL_STREAM), the
    console otherwise. journal=True still falls back to the console when nobody listens on
    `socket_path`. `stream` is the console (default: stderr).
    """
    global _writer  # the configuration is process-wide by design
    out = sys.stderr if stream is None else stream
    if journal is None:
        journal = stderr_is_journal(os.environ, out)
    writer = JournalWriter(socket_path) if journal else None
    if writer is not None and not writer.available():
        writer = None
    console = ConsoleLogger(out)
    with _state_lock:
        old, _writer = _writer, writer
        if writer is None:
            wrapped = ConsoleLogger(out, width=WIDTH)  # not the journal's: wrapped for a reader
            configure(chain(*console_chain(out), expand=[add_console_fields]), wrapped, level)
        else:
            logger = JournalLogger(writer, console)
            configure(chain(render_journal, expand=[add_event_fields]), logger, level)
        bridge_stdlib(level)
    if old is not None:
        old.close()


_log = get_logger("hydra_watchdog")


def log_event(event: Event) -> None:
    """Log one Event: journald fields under systemd, a console line otherwise."""
    getattr(_log, _SEVERITY_METHOD[event.severity])(event.message, **{_EVENT_KEY: event})

"""The journald sink: wire format, the chain's wiring and fallbacks, the catalog.

Records are sent to a real AF_UNIX datagram socket the test binds, and parsed back with an
independent reader of the native protocol; the catalog goes through the real `journalctl`.
"""

from __future__ import annotations

import array
import fcntl
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from logging_journald import JournaldTransport

from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.report import journal
from hydra_watchdog.report.journal import (
    MESSAGE_IDS,
    JournalWriter,
    configure_logging,
    event_fields,
    field_name,
    log_event,
    render_fields,
)
from hydra_watchdog.report.log import capture_logs, get_logger
from hydra_watchdog.statefile import STATE_FILE, StateFile
from hydra_watchdog.states import Phase, Rule, Severity
from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]

CATALOG = Path(__file__).resolve().parent.parent / "systemd" / "hydra-watchdog.catalog"


def parse_native(data: bytes) -> list[tuple[str, bytes]]:
    """journald's side of the protocol, written from JOURNAL_NATIVE_PROTOCOL.md."""
    fields: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields.append((key.decode(), value))
            pos = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            fields.append((line.decode(), value))
            pos = nl + 10 + size
    return fields


def as_dict(fields: list[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode() for k, v in fields}


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # capture_logs puts the process's configuration back when it ends: a test's own
    # configure_logging (the journal socket of its tmp_path) does not outlive the test.
    with capture_logs():
        yield


def make_event(**overrides: Any) -> Event:
    base: dict[str, Any] = {
        "wall": 1_700_000_000.0,
        "kind": EventKind.ACTION,
        "severity": Severity.NOTICE,
        "message": "restart tabbyapi.service",
        "state": Phase.DOWN,
        "rule": Rule.DOWN,
        "action": "restart_unit",
        "reason": "3 probes refused in 15 s",
        "unit": "tabbyapi.service",
        "fields": (("GPU_INDEX", "0"), ("TARGET_PID", "4242"), ("LATENCY_MS", "2500")),
    }
    base.update(overrides)
    return Event(**base)


# --- wire format --------------------------------------------------------------------------------


def _sent(path: str, fields: list[tuple[str, str]]) -> None:
    writer = JournalWriter(path)
    try:
        assert writer.send(fields)
    finally:
        writer.close()


def test_plain_values_are_key_equals_value_lines(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, sock = journal_socket
    _sent(path, [("MESSAGE", "hello"), ("PRIORITY", "6")])
    assert sock.recv(65536) == b"MESSAGE=hello\nPRIORITY=6\n"


def test_multiline_value_uses_the_length_prefixed_form(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, sock = journal_socket
    value = "line one\nline two=still two\n"
    _sent(path, [("MESSAGE", "x"), ("HYDRA_REASON", value), ("PRIORITY", "3")])
    data = sock.recv(65536)
    raw = value.encode()
    assert b"HYDRA_REASON\n" + struct.pack("<Q", len(raw)) + raw + b"\n" in data
    assert parse_native(data) == [
        ("MESSAGE", b"x"),
        ("HYDRA_REASON", raw),
        ("PRIORITY", b"3"),
    ]


def test_oversized_value_is_truncated_on_a_character_boundary() -> None:
    value = "é" * journal.MAX_VALUE_BYTES  # two bytes each: the cut lands mid-character
    fields = dict(render_fields({"event": "x", "hydra_excerpt": value}))
    data = fields["HYDRA_EXCERPT"].encode("utf-8")  # strict: raises on a split character
    assert len(data) <= journal.MAX_VALUE_BYTES
    assert data.endswith(b" [truncated]")


def test_a_value_that_is_not_valid_utf8_still_goes_out(
    journal_socket: tuple[str, socket.socket],
) -> None:
    """A path decoded with surrogateescape holds lone surrogates, which UTF-8 cannot encode:
    the record goes to journald all the same, the undecodable byte shown as "?"."""
    path, sock = journal_socket
    configure_logging(journal=True, socket_path=path, stream=io.StringIO())
    get_logger("test").warning(
        "model folder unreadable", path=b"/mnt/models/m\xff".decode("utf-8", "surrogateescape")
    )
    record = as_dict(parse_native(sock.recv(65536)))
    assert record["PATH"] == "/mnt/models/m?"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("gpu_index", "GPU_INDEX"),
        ("latency-ms", "LATENCY_MS"),
        ("_PID", "PID"),  # journald's trusted fields cannot be forged
        ("2fast", "FAST"),
        ("ünit", "_NIT".lstrip("_")),
        ("___", None),
        ("x" * 100, "X" * 64),
    ],
)
def test_field_names(key: str, expected: str | None) -> None:
    assert field_name(key) == expected


def test_event_record_fields() -> None:
    fields = dict(event_fields(make_event()))
    assert fields["MESSAGE"] == "restart tabbyapi.service"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS[EventKind.ACTION]
    assert fields["PRIORITY"] == "5"  # NOTICE
    assert fields["SYSLOG_IDENTIFIER"] == "hydra-watchdog"
    assert fields["HYDRA_EVENT"] == "action"
    assert fields["HYDRA_STATE"] == "down"
    assert fields["HYDRA_RULE"] == "tabbyapi_down"
    assert fields["HYDRA_ACTION"] == "restart_unit"
    assert fields["HYDRA_REASON"] == "3 probes refused in 15 s"
    assert fields["OBJECT_SYSTEMD_UNIT"] == "tabbyapi.service"
    assert fields["GPU_INDEX"] == "0"
    assert fields["TARGET_PID"] == "4242"
    assert fields["LATENCY_MS"] == "2500"


def test_event_without_unit_rule_or_action_omits_those_fields() -> None:
    event = make_event(kind=EventKind.STARTED, rule=None, action="", reason="", unit="", fields=())
    fields = dict(event_fields(event))
    for absent in ("OBJECT_SYSTEMD_UNIT", "HYDRA_RULE", "HYDRA_ACTION", "HYDRA_REASON"):
        assert absent not in fields
    assert fields["MESSAGE_ID"] == MESSAGE_IDS[EventKind.STARTED]


@pytest.mark.parametrize("severity", list(Severity))
def test_priority_follows_severity(severity: Severity) -> None:
    assert dict(event_fields(make_event(severity=severity)))["PRIORITY"] == str(severity.priority)


def test_message_ids_are_stable_128_bit_and_unique() -> None:
    assert set(MESSAGE_IDS) == set(EventKind)
    assert all(re.fullmatch(r"[0-9a-f]{32}", mid) for mid in MESSAGE_IDS.values())
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)
    # Pinned: a changed id silently orphans its catalog entry and everyone's saved queries.
    assert MESSAGE_IDS[EventKind.RESTART_LOOP] == "7a01b035dca1496d95cd584754b03efe"


# --- the socket and the logger --------------------------------------------------------------------


def test_log_event_reaches_the_journal_socket(journal_socket: tuple[str, socket.socket]) -> None:
    path, sock = journal_socket
    console = io.StringIO()
    configure_logging(journal=True, socket_path=path, stream=console)
    log_event(make_event(reason="first line\nsecond line"))
    record = as_dict(parse_native(sock.recv(65536)))
    assert record["MESSAGE"] == "restart tabbyapi.service"
    assert record["HYDRA_REASON"] == "first line\nsecond line"
    assert record["PRIORITY"] == "5"
    assert record["OBJECT_SYSTEMD_UNIT"] == "tabbyapi.service"
    assert record["MESSAGE_ID"] == MESSAGE_IDS[EventKind.ACTION]
    assert console.getvalue() == ""


def test_plain_logger_calls_go_to_the_journal_too(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, sock = journal_socket
    configure_logging(journal=True, socket_path=path, stream=io.StringIO())
    get_logger("test").warning("config file unreadable", path="/etc/x.toml", attempt=2)
    record = as_dict(parse_native(sock.recv(65536)))
    assert record["MESSAGE"] == "config file unreadable"
    assert record["PRIORITY"] == "4"
    assert record["PATH"] == "/etc/x.toml"
    assert record["ATTEMPT"] == "2"
    assert record["SYSLOG_IDENTIFIER"] == "hydra-watchdog"


def test_the_packages_stdlib_warnings_reach_the_journal_at_their_priority(
    journal_socket: tuple[str, socket.socket], tmp_path: Path
) -> None:
    """statefile.py warns through the stdlib's logging when it quarantines a state file that
    someone planted or a crash tore; that warning reaches journald as one, not as bare stderr
    text at journald's default priority. Another library's INFO (httpx: every request) does
    not."""
    path, sock = journal_socket
    configure_logging(journal=True, socket_path=path, stream=io.StringIO())
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:5000/health 200")
    state_dir = tmp_path / "st"
    state_dir.mkdir(mode=0o700)
    (state_dir / STATE_FILE).write_bytes(b"{not json")
    StateFile(state_dir, events_kept=5, boot_id="b").load()
    record = as_dict(parse_native(sock.recv(65536)))  # the first record: not httpx's
    assert record["PRIORITY"] == "4"
    assert record["MESSAGE"].startswith(f"{state_dir / STATE_FILE} is unusable (")
    assert "moved it to" in record["MESSAGE"]
    assert record["CODE_FILE"].endswith("/hydra_watchdog/statefile.py")
    assert record["CODE_FUNC"] == "move_aside" and record["CODE_LINE"].isdigit()
    assert record["SYSLOG_IDENTIFIER"] == "hydra-watchdog"
    try:
        raise OSError("disk on fire")
    except OSError:
        logging.getLogger("hydra_watchdog.control").exception("cannot read %s", "/x")
    record = as_dict(parse_native(sock.recv(65536)))
    assert (record["MESSAGE"], record["PRIORITY"]) == ("cannot read /x", "3")
    assert record["EXCEPTION"].endswith("OSError: disk on fire")


def test_exception_becomes_a_multiline_field(journal_socket: tuple[str, socket.socket]) -> None:
    path, sock = journal_socket
    configure_logging(journal=True, socket_path=path, stream=io.StringIO())
    try:
        empty: dict[str, int] = {}
        empty["missing"]
    except KeyError:
        get_logger("test").exception("cycle failed")
    record = as_dict(parse_native(sock.recv(65536)))
    assert record["MESSAGE"] == "cycle failed"
    assert record["PRIORITY"] == "3"
    assert record["EXCEPTION"].startswith("Traceback (most recent call last):\n")
    assert "KeyError: 'missing'" in record["EXCEPTION"]


def test_auto_uses_journal_when_stderr_is_the_journal_stream(
    journal_socket: tuple[str, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = journal_socket
    with (tmp_path / "stderr").open("w+") as stderr:
        st = os.fstat(stderr.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging(socket_path=path, stream=stderr)
        log_event(make_event(kind=EventKind.RECOVERED, severity=Severity.INFO))
        assert as_dict(parse_native(sock.recv(65536)))["HYDRA_EVENT"] == "recovered"
        stderr.seek(0)
        assert stderr.read() == ""


def test_auto_uses_console_when_journal_stream_is_another_file(
    journal_socket: tuple[str, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = journal_socket
    other = os.stat(journal_socket[0])
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    with (tmp_path / "stderr").open("w+") as stderr:
        configure_logging(socket_path=path, stream=stderr)
        log_event(make_event())
        stderr.seek(0)
        line = stderr.read()
    # The console's line: the level, the kind and the [rule] (not journald's fields).
    assert "[notice   ] action          [tabbyapi_down] restart tabbyapi.service" in line
    assert "target_pid=4242" in line
    assert "message_id" not in line
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(65536)


def test_no_journald_falls_back_to_console(tmp_path: Path) -> None:
    console = io.StringIO()
    configure_logging(journal=True, socket_path=str(tmp_path / "absent"), stream=console)
    log_event(make_event(severity=Severity.CRIT, message="TabbyAPI down"))
    assert "TabbyAPI down" in console.getvalue()


def test_journald_vanishing_later_falls_back_per_record(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    console = io.StringIO()
    configure_logging(journal=True, socket_path=path, stream=console)
    listener.close()
    os.unlink(path)
    log_event(make_event(message="still said somewhere"))
    assert "still said somewhere" in console.getvalue()
    assert "hydra_reason='3 probes refused in 15 s'" in console.getvalue()


def _older_transport(socket_path: str | None = None) -> Any:
    """logging-journald's transport as an older release made it: no `connected` argument. (No
    older package can be installed beside the current one; the signature is what differs.)"""
    return JournaldTransport(socket_path)


def test_a_transport_that_raises_anything_falls_back_to_the_console_said_once(
    journal_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception from the transport (here the TypeError of an older logging-journald), not
    only OSError: the record reaches the console, and why the journal failed is said once."""
    path, _sock = journal_socket
    monkeypatch.setattr(journal, "JournaldTransport", _older_transport)
    console = io.StringIO()
    configure_logging(journal=True, socket_path=path, stream=console)
    log_event(make_event(message="first record"))
    log_event(make_event(message="second record"))
    lines = console.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == (
        "<4>cannot log to journald (TypeError: _older_transport() got an …): records go to stderr"
    )
    assert lines[1].startswith("<5>first record  ")
    assert lines[2].startswith("<5>second record  ")


def test_writer_survives_a_restarted_journald(journal_socket: tuple[str, socket.socket]) -> None:
    path, sock = journal_socket
    writer = JournalWriter(path)
    try:
        assert writer.send([("MESSAGE", "one")])
        sock.close()
        os.unlink(path)
        assert writer.send([("MESSAGE", "lost")]) is False
        again = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        again.bind(path)
        again.settimeout(10)
        with again:
            assert writer.send([("MESSAGE", "two")])
            assert parse_native(again.recv(65536)) == [("MESSAGE", b"two")]
    finally:
        writer.close()


def test_record_too_big_for_a_datagram_travels_in_a_sealed_memfd(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, sock = journal_socket
    excerpt = "\n".join(f"tabbyapi[{i}]: traceback line {i}" for i in range(15_000))
    assert len(excerpt) > 500_000  # beyond any default AF_UNIX datagram size
    _sent(path, [("MESSAGE", "journal excerpt"), ("HYDRA_EXCERPT", excerpt)])
    size = struct.calcsize("i")
    data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(size))
    assert data == b""
    ((level, kind, payload),) = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", payload[:size])[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        # journald maps the memfd; it does not care where the sender left the file offset.
        body = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    record = as_dict(parse_native(body))
    assert record["MESSAGE"] == "journal excerpt"
    assert record["HYDRA_EXCERPT"] == excerpt


# --- the catalog --------------------------------------------------------------------------------


def parse_catalog(text: str) -> dict[str, dict[str, list[str]]]:
    entries: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    in_body = False
    for line in text.splitlines():
        if line.startswith("#") and current is None:
            continue
        if line.startswith("-- "):
            current = {"body": []}
            entries[line[3:].strip()] = current
            in_body = False
        elif current is not None and not in_body:
            if line == "":
                in_body = True
            else:
                key, _, value = line.partition(": ")
                current.setdefault(key, []).append(value)
        elif current is not None:
            current["body"].append(line)
    return entries


def test_catalog_has_one_complete_entry_per_message_id() -> None:
    entries = parse_catalog(CATALOG.read_text())
    assert set(entries) == set(MESSAGE_IDS.values())
    for mid, entry in entries.items():
        assert entry.get("Subject"), mid
        assert entry.get("Defined-By") == ["hydra-watchdog"], mid
        assert entry.get("Documentation"), mid
        assert len(" ".join(entry["body"]).split()) >= 10, f"{mid}: explain the event"
    restart_loop = " ".join(entries[MESSAGE_IDS[EventKind.RESTART_LOOP]]["body"])
    assert "more than 3 times in 10 minutes" in restart_loop


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="journalctl is not installed")
def test_catalog_compiles_with_journalctl(tmp_path: Path) -> None:
    """The real parser, in a scratch root (--root): the host's catalog database is untouched."""
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir / "hydra-watchdog.catalog")
    subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--update-catalog"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    ids = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert ids == set(MESSAGE_IDS.values())
    assert f"{MESSAGE_IDS[EventKind.ESCALATED]} hydra-watchdog: TabbyAPI unresolved" in listed


# --- real journald (systemd booted in a namespace) ----------------------------------------------

_LOG_IN_NAMESPACE = """
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.report.journal import configure_logging, log_event
from hydra_watchdog.states import Phase, Rule, Severity
configure_logging(journal=True)
log_event(Event(
    wall=0.0, kind=EventKind.RESTART_LOOP, severity=Severity.CRIT,
    message="TabbyAPI restarted 4 times in 10 minutes: stopping it, back-off step 1",
    state=Phase.BACKOFF, rule=Rule.RESTART_LOOP, action="stop_unit",
    reason="restarts at 12:00:01, 12:02:10\\n12:04:55, 12:07:30", unit="tabbyapi.service",
    fields=(("GPU_INDEX", "1"), ("TARGET_PID", "4242"), ("LATENCY_MS", "2500"),
            ("HYDRA_TOKEN", "{TOKEN}")),
))
"""


def _json_value(value: object) -> str:
    # journalctl -o json prints a value it cannot show as text as an array of byte values.
    if isinstance(value, list):
        return bytes(value).decode()
    assert isinstance(value, str)
    return value


@pytest.mark.systemd
def test_real_journald_fields_unit_and_catalog(systemd_ns: SystemdNamespace) -> None:
    token = uuid.uuid4().hex
    systemd_ns.write_file("/usr/lib/systemd/catalog/hydra-watchdog.catalog", CATALOG.read_text())
    update = systemd_ns.journalctl("--update-catalog")
    assert update.returncode == 0, update.stderr
    sent = systemd_ns.python(_LOG_IN_NAMESPACE.replace("{TOKEN}", token))
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr == ""  # nothing fell back to the console: journald took it

    records: list[dict[str, object]] = []

    def logged() -> bool:
        out = systemd_ns.journalctl("-o", "json", f"HYDRA_TOKEN={token}").stdout
        records[:] = [json.loads(line) for line in out.splitlines() if line.strip()]
        return bool(records)

    systemd_ns.wait_for(logged, timeout=60, what="the record in the journal")
    (record,) = records
    assert record["MESSAGE_ID"] == MESSAGE_IDS[EventKind.RESTART_LOOP]
    assert record["PRIORITY"] == "2"
    assert record["SYSLOG_IDENTIFIER"] == "hydra-watchdog"
    assert record["HYDRA_EVENT"] == "restart_loop"
    assert record["HYDRA_STATE"] == "backoff"
    assert record["HYDRA_RULE"] == "restart_loop"
    assert record["HYDRA_ACTION"] == "stop_unit"
    assert (
        _json_value(record["HYDRA_REASON"]) == "restarts at 12:00:01, 12:02:10\n12:04:55, 12:07:30"
    )
    assert record["OBJECT_SYSTEMD_UNIT"] == "tabbyapi.service"
    assert (record["GPU_INDEX"], record["TARGET_PID"], record["LATENCY_MS"]) == (
        "1",
        "4242",
        "2500",
    )

    # A root process's OBJECT_SYSTEMD_UNIT puts the record in `journalctl -u tabbyapi` too.
    by_unit = systemd_ns.journalctl("-u", "tabbyapi.service", "-o", "json").stdout
    assert token in by_unit

    explained = systemd_ns.journalctl("-x", f"HYDRA_TOKEN={token}").stdout
    assert "Subject: TabbyAPI is in a restart loop" in explained
    assert "Defined-By: hydra-watchdog" in explained
    assert "more than 3 times in 10 minutes" in explained

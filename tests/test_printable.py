"""Issue 10 item 7: text from other processes reaches the console and the journal one line each.

The end-to-end test starts a real process whose argv carries a newline, a forged log record and
an escape sequence, lets it hold TabbyAPI's port, and follows it through the real ProcScanner,
decide(), narrate() and the logging sinks (the console, and journald's native socket).
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.events import Event
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import GpuReport, ProcessInfo, ProcessRole, UnitStatus
from hydra_watchdog.printable import printable
from hydra_watchdog.report.journal import _console_line, configure_logging, log_event
from hydra_watchdog.report.log import capture_logs
from hydra_watchdog.states import Rule
from tests.policy_kit import Run, config, obs, refused
from tests.test_journal import as_dict, parse_native

FORGED = "\n[fake] ALL OK\n"
CLEAR_SCREEN = "\x1b[2J"

# Listens on argv[1].
HOLDER = """\
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
time.sleep(600)
"""


def test_printable_escapes_what_could_forge_or_hide_a_line() -> None:
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x00\x1b[31m\x7f\x85") == "\\x00\\x1b[31m\\x7f\\x85"
    assert (
        printable("x\u2028y\u2029z\u202egnp.exe\u2066") == "x\\u2028y\\u2029z\\u202egnp.exe\\u2066"
    )
    assert printable("python /opt/tabby/main.py --port 5000 é 中") == (
        "python /opt/tabby/main.py --port 5000 é 中"
    )
    hostile = FORGED + CLEAR_SCREEN + "\\n"
    assert printable(printable(hostile)) == printable(hostile)  # escaping twice changes nothing
    assert all(c.isprintable() for c in printable(hostile))


def test_process_info_command_is_escaped_but_identity_is_raw() -> None:
    info = ProcessInfo(7, 1.0, ("nc", "-l", FORGED), ProcessRole.FOREIGN)
    assert info.command == "nc -l \\n[fake] ALL OK\\n"
    assert info.cmdline == ("nc", "-l", FORGED)  # what an actuator compares before a signal


def test_console_fallback_line_escapes_message_and_values() -> None:
    line = _console_line([("MESSAGE", "held by x" + FORGED), ("HYDRA_REASON", "a\rb")])
    assert "\n" not in line and "\r" not in line
    assert "held by x\\n[fake] ALL OK\\n" in line and "hydra_reason='a\\rb'" in line


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    # argv[0] is whatever a process says it is; first, so no cut of the command line hides it.
    proc = subprocess.Popen(
        ["nc" + FORGED + CLEAR_SCREEN, str(script), str(port)],
        executable=sys.executable,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with capture_logs():  # the test's configure_logging ends with it
            yield proc, port
    finally:
        proc.kill()
        proc.wait()


def _foreign_holder_events(port: int, pid: int) -> list[Event]:
    """Cycles of the real scan + decide + narrate until the foreign holder is told."""
    cfg = config(
        tabbyapi={"url": f"http://127.0.0.1:{port}", "cmdline_patterns": ["/opt/tabbyapi"]}
    )
    scanner = ProcScanner(port, ["/opt/tabbyapi"])
    unit = UnitStatus(name="tabbyapi.service", available=False)
    run = Run(cfg=cfg)
    for t in range(30):
        report, found = scanner.scan(unit, GpuReport(), full=True)
        assert report.owners(port) == (pid,)
        before = run.state
        o = obs(t, health=refused(), port=report, processes=found)
        actions = run.step(o)
        events = narrate(before, run.state, actions, (), o, config=cfg, wall=float(t))
        if any(e.rule is Rule.FOREIGN_HOLDER for e in events):
            return list(events)
    raise AssertionError(f"no foreign_holder finding; findings: {run.state.findings}")


def test_a_forged_line_in_argv_stays_escaped_on_the_console(
    holder: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = holder
    console = io.StringIO()
    configure_logging(journal=False, stream=console)
    events = _foreign_holder_events(port, proc.pid)
    for event in events:
        log_event(event)
    out = console.getvalue()
    assert f"pid {proc.pid}" in out
    assert "\\n[fake] ALL OK\\n\\x1b[2J" in out
    assert "\x1b" not in out and "\r" not in out
    assert not any(line.lstrip().startswith("[fake]") for line in out.splitlines())
    # one record, one entry: a wrapped record goes on under its message, never at the margin
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert len(heads) == len(events)
    assert all(line.startswith(" " * 32) for line in out.splitlines() if line not in heads)


def test_a_forged_line_in_argv_stays_escaped_in_the_journal_message(
    holder: tuple[subprocess.Popen[str], int], tmp_path: Path
) -> None:
    proc, port = holder
    path = str(tmp_path / "journal.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journald:
        journald.bind(path)
        journald.settimeout(10)
        configure_logging(journal=True, socket_path=path, stream=io.StringIO())
        events = _foreign_holder_events(port, proc.pid)
        for event in events:
            log_event(event)
        records = [as_dict(parse_native(journald.recv(1 << 20))) for _ in events]
    told = [r for r in records if r.get("HYDRA_RULE") == Rule.FOREIGN_HOLDER.value]
    # Said once (narrate): the finding's record tells the holder; the state change after it
    # names the transition and keeps the evidence in HYDRA_REASON.
    said = [r for r in told if f"pid {proc.pid}" in r["MESSAGE"]]
    assert said and all(f"pid {proc.pid}" in r.get("HYDRA_REASON", "") for r in told)
    for record in told:
        for text in (record["MESSAGE"], record.get("HYDRA_REASON", "")):
            assert "\n" not in text and "\x1b" not in text
        assert "\\n[fake] ALL OK\\n\\x1b[2J" in record["HYDRA_REASON"]

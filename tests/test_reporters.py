"""The publish seam: one CycleRecord through the reporters, with real files, a real metrics
registry and a real sd_notify socket."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.actions import (
    ActionResult,
    LoadModel,
    Reason,
    ResultStatus,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.policy_state import PolicyState, RestartOrigin, RestartRecord
from hydra_watchdog.report.log import capture_logs
from hydra_watchdog.report.metrics import Metrics
from hydra_watchdog.report.reporters import (
    STATE_REFRESH,
    CycleRecord,
    JournalReporter,
    MetricsReporter,
    SdNotifyReporter,
    StateFileReporter,
    StatusFileReporter,
    publish,
    reporters,
)
from hydra_watchdog.report.sdnotify import Notifier
from hydra_watchdog.report.status_file import STATUS_FILE, read_status
from hydra_watchdog.statefile import StateFile
from hydra_watchdog.states import Phase, Rule, Severity
from tests.policy_kit import obs, refused

RESTART = UnitCommand(UnitVerb.RESTART, "tabbyapi.service", Reason(Rule.DOWN, "refused"))


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return parse_config(
        {"watchdog": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")}}
    )


def _event(message: str, phase: Phase = Phase.HEALTHY) -> Event:
    return Event(1_000.0, EventKind.STATE_CHANGED, Severity.NOTICE, message, phase)


def _record(cfg: Config, **kw: Any) -> CycleRecord:
    told = (_event("recovered"),)
    base = CycleRecord(
        before=PolicyState(phase=Phase.UNKNOWN),
        after=PolicyState(phase=Phase.HEALTHY, phase_since=5.0),
        observation=obs(10.0),
        actions=(),
        results=(),
        told=told,
        kept=told,
        config=cfg,
        dry_run=False,
        wall=1_000.0,
        mono=10.0,
        pid=os.getpid(),
        pid_start=None,
    )
    return dataclasses.replace(base, **kw)


def _state_file(cfg: Config) -> StateFile:
    return StateFile(cfg.watchdog.state_dir, events_kept=cfg.watchdog.events_kept)


class _Notices:
    """sd_notify's receiving end, with what was on disk when READY=1 was sent."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sent: list[str] = []
        self.on_disk_at_ready: tuple[bool, bool] | None = None

    def ready(self) -> bool:
        state = Path(self.cfg.watchdog.state_dir) / "state.json"
        status = Path(self.cfg.watchdog.runtime_dir) / STATUS_FILE
        self.on_disk_at_ready = (state.exists(), status.exists())
        self.sent.append("READY=1")
        return True

    def status(self, line: str) -> bool:
        self.sent.append(f"STATUS={line}")
        return True

    def watchdog(self) -> bool:
        return True

    def stopping(self) -> bool:
        return True

    def watchdog_interval(self) -> float | None:
        return None


def test_the_chain_publishes_every_part_and_says_ready_last(cfg: Config) -> None:
    told: list[Event] = []
    notices = _Notices(cfg)
    metrics = Metrics()
    chain = reporters(
        journal=JournalReporter(told.append),
        state_file=StateFileReporter(_state_file(cfg), saved=None, saved_events=()),
        notifier=notices,
        metrics=metrics,
    )
    restarted = PolicyState(
        phase=Phase.RECOVERING,
        restarts=(RestartRecord(9.0, RestartOrigin.WATCHDOG),),
        phase_since=9.0,
    )
    record = _record(
        cfg,
        after=restarted,
        actions=(RESTART,),
        results=(ActionResult(RESTART, ResultStatus.OK, "restarted", 9.5),),
    )
    publish(chain, record)

    assert told == list(record.told)  # the journal
    saved = _state_file(cfg).load()
    assert (saved.state, saved.events) == (restarted, record.kept)  # the state file
    assert read_status(cfg.watchdog.runtime_dir) == record.status  # the status file
    assert record.status.phase == Phase.RECOVERING and record.status.pid == os.getpid()
    page = metrics.exposition().decode()  # the metrics page
    assert 'hydra_watchdog_restarts_total{by="watchdog"} 1.0' in page
    assert 'hydra_watchdog_actions_total{action="restart_unit",result="ok"} 1.0' in page
    # sd_notify last: systemd's `start` returns on READY=1, and `status` must find its file then
    assert notices.sent == ["STATUS=recovering", "READY=1"]
    assert notices.on_disk_at_ready == (True, True)


class _Broken:
    def publish(self, record: CycleRecord) -> None:
        raise RuntimeError("a bug in one reporter")


def test_a_failing_reporter_is_logged_and_the_others_still_publish(cfg: Config) -> None:
    told: list[Event] = []
    record = _record(cfg)
    with capture_logs() as logs:
        publish([_Broken(), JournalReporter(told.append), StatusFileReporter()], record)
    assert told == list(record.told)
    assert read_status(cfg.watchdog.runtime_dir) == record.status
    (failure,) = [e for e in logs if e["level"] == "error"]
    assert failure["reporter"] == "_Broken" and failure["error"] == "a bug in one reporter"
    assert failure["exception"].endswith("RuntimeError: a bug in one reporter")


def test_the_state_file_is_written_only_when_something_changed(cfg: Config) -> None:
    reporter = StateFileReporter(_state_file(cfg), saved=None, saved_events=())
    first = _record(cfg)
    reporter.publish(first)
    path = Path(cfg.watchdog.state_dir) / "state.json"
    assert path.exists()
    path.unlink()  # a save would bring it back

    reporter.publish(dataclasses.replace(first, told=()))  # same state, same events kept
    assert not path.exists()

    more = (*first.kept, _event("a new event"))
    reporter.publish(dataclasses.replace(first, told=more[-1:], kept=more))
    assert _state_file(cfg).load().events == more
    path.unlink()
    reporter.publish(dataclasses.replace(first, kept=more, after=PolicyState(phase=Phase.DOWN)))
    assert _state_file(cfg).load().state.phase is Phase.DOWN


def test_clock_stamps_alone_are_saved_only_every_refresh_interval(cfg: Config) -> None:
    now = [100.0]
    reporter = StateFileReporter(
        _state_file(cfg), saved=None, saved_events=(), clock=lambda: now[0]
    )
    first = _record(cfg)
    base = dataclasses.replace(first.after, observed_at=100.0, nrestarts_at=100.0)
    reporter.publish(dataclasses.replace(first, after=base))
    path = Path(cfg.watchdog.state_dir) / "state.json"
    path.unlink()

    # A healthy cycle moves only the two stamps: no write...
    now[0] += 1.0
    ticked = dataclasses.replace(base, observed_at=101.0, nrestarts_at=101.0)
    reporter.publish(dataclasses.replace(first, after=ticked))
    assert not path.exists()
    # ...until STATE_REFRESH passed since the last write: then the stamps are saved too.
    now[0] += STATE_REFRESH
    later = dataclasses.replace(base, observed_at=now[0], nrestarts_at=now[0])
    reporter.publish(dataclasses.replace(first, after=later))
    assert _state_file(cfg).load().state.observed_at == now[0]
    path.unlink()
    # Anything else that changes is saved at once, stamps included.
    now[0] += 1.0
    seen = dataclasses.replace(later, nrestarts_seen=7, nrestarts_at=now[0])
    reporter.publish(dataclasses.replace(first, after=seen))
    assert _state_file(cfg).load().state.nrestarts_at == now[0]


def test_a_state_file_that_cannot_be_written_is_logged_and_retried(
    cfg: Config, tmp_path: Path
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state dir belongs")
    reporter = StateFileReporter(_state_file(cfg), saved=None, saved_events=())
    record = _record(cfg)
    with capture_logs() as logs:
        reporter.publish(record)  # never raises: the loop goes on
    assert [e["event"] for e in logs] == ["cannot persist the state"]
    blocker.unlink()
    reporter.publish(dataclasses.replace(record, told=()))  # the same record: not "saved" before
    assert _state_file(cfg).load().state == record.after


def test_an_unwritable_status_file_is_a_warning(cfg: Config, tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file where the runtime dir belongs")
    with capture_logs() as logs:
        StatusFileReporter().publish(_record(cfg))
    assert [(e["level"], e["event"]) for e in logs] == [("warning", "cannot write status.json")]


def test_metrics_count_restarts_by_issuer_and_skip_latency_without_an_answer(
    cfg: Config,
) -> None:
    metrics = Metrics()
    reporter = MetricsReporter(metrics)
    one = (RestartRecord(3.0, RestartOrigin.WATCHDOG),)
    three = (
        *one,
        *[RestartRecord(5.0, RestartOrigin.SYSTEMD)] * 2,
    )  # two seen in one cycle: one stamp
    reporter.publish(
        _record(cfg, before=PolicyState(restarts=one), after=PolicyState(restarts=three))
    )
    reporter.publish(_record(cfg, observation=obs(11.0, health=refused())))
    page = metrics.exposition().decode()
    assert 'hydra_watchdog_restarts_total{by="systemd"} 2.0' in page
    assert 'hydra_watchdog_restarts_total{by="watchdog"} 0.0' in page
    assert "hydra_watchdog_health_latency_seconds_count 1.0" in page  # the refused one is not


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def _received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_sd_notify_says_ready_once_and_status_on_phase_changes(
    cfg: Config, notify_socket: tuple[str, socket.socket]
) -> None:
    address, sock = notify_socket
    reporter = SdNotifyReporter(Notifier({"NOTIFY_SOCKET": address}))
    healthy = PolicyState(phase=Phase.HEALTHY)
    down = PolicyState(phase=Phase.DOWN, last_failure="refused x3")
    reporter.publish(_record(cfg, before=healthy, after=healthy))  # first: STATUS even unchanged
    assert _received(sock) == ["STATUS=healthy", "READY=1"]
    reporter.publish(_record(cfg, before=healthy, after=healthy))
    assert _received(sock) == []
    reporter.publish(_record(cfg, before=healthy, after=down, dry_run=True))
    assert _received(sock) == ["STATUS=[dry-run] down: refused x3"]


def test_metrics_count_the_end_of_every_background_load_by_result(cfg: Config) -> None:
    """issue 23 item 7: a load is counted as "in_progress" when it starts, and again by how it
    ended (ok, failed, cancelled) when its outcome arrives cycles later."""
    metrics = Metrics()
    reporter = MetricsReporter(metrics)
    load = LoadModel("m1", None, Reason(Rule.NO_MODEL, "no model"))
    started = ActionResult(load, ResultStatus.IN_PROGRESS, "loading", 1.0)
    reporter.publish(_record(cfg, results=(started,)))
    ends = (
        ActionResult(load, ResultStatus.OK, "confirmed", 2.0, duration_s=41.5),
        ActionResult(load, ResultStatus.FAILED, "OOM", 3.0, ErrorKind.LOAD_ERROR, 12.0),
        ActionResult(load, ResultStatus.FAILED, "cancelled", 4.0, ErrorKind.CANCELLED, 3.0),
    )
    # a launch that failed at once was counted with its own cycle: as a result fed back to the
    # next observation it carries no duration and is not counted again
    launch_failed = ActionResult(load, ResultStatus.FAILED, "no systemd-run", 1.5)
    reporter.publish(_record(cfg, observation=obs(12.0, results=(*ends, launch_failed))))
    page = metrics.exposition().decode()
    for result, count in (("in_progress", 1), ("ok", 1), ("failed", 1), ("cancelled", 1)):
        line = f'hydra_watchdog_actions_total{{action="load_model",result="{result}"}} {count}.0'
        assert line in page, result

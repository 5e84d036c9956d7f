"""One publish seam: every cycle ends as one CycleRecord handed to an ordered list of reporters.

Modelled on a logging library's chain of processors. The daemon produces one frozen record of
what the cycle did (the policy state before and after, the observation, the actions and their
results, the events told) and each reporter publishes its part of it, in this order (`reporters()`):

1. journal: the cycle's events (narrate.py chose them) to journald, or the console;
2. state file: the policy's memory and the events kept, atomically (skipped when unchanged);
3. incidents: the incident each cycle belongs to (incidents.py), kept in the state dir and
   counted in the metrics when it closes;
4. status file: status.json for `hydra-watchdog status`;
5. metrics: the Prometheus page;
6. sd_notify: STATUS= on a phase change, READY=1 after the first complete cycle.

The order matters: the state is on disk before the outside world hears of it, and READY=1 comes
last, so that `systemctl start` returns only once `status` has a file to read. A reporter that
fails is logged and the next one still runs: one broken output (a full disk, a journal that went
away) never silences the others or stops the loop. A write retried every cycle is said once while
it fails (again when why changes), and once when it works again (said_once.py).

Persisting the intent *before* acting is not a report but a safety step of the cycle, and stays
in daemon.py (it uses StateFileReporter.save, so both saves share the skip-when-unchanged rule).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol

from hydra_watchdog.actions import Action, ActionResult, action_name
from hydra_watchdog.config import Config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event
from hydra_watchdog.incidents import Tracker, facts, step
from hydra_watchdog.observation import Observation, Outcome
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.printable import cut, printable
from hydra_watchdog.report.incident_file import IncidentFile
from hydra_watchdog.report.log import get_logger
from hydra_watchdog.report.metrics import Metrics
from hydra_watchdog.report.status import StatusReport
from hydra_watchdog.report.status_build import build_status
from hydra_watchdog.report.status_file import write_status
from hydra_watchdog.said_once import SaidOnce, failure_key
from hydra_watchdog.statefile import StateFile
from hydra_watchdog.states import Phase

log = get_logger("hydra_watchdog.report")
# /health outcomes whose latency is not TabbyAPI's answering time (none came, or none was asked).
_NO_LATENCY = (Outcome.REFUSED, Outcome.TIMEOUT, Outcome.LOCAL_ERROR, Outcome.WITHHELD)


@dataclass(frozen=True)
class CycleRecord:
    """What one cycle produced: everything a reporter publishes, and nothing to call back."""

    before: PolicyState
    after: PolicyState
    observation: Observation
    actions: tuple[Action, ...]
    results: tuple[ActionResult, ...]  # of this cycle's actions (a load: in progress)
    told: tuple[Event, ...]  # the events of this cycle, in order
    kept: tuple[Event, ...]  # the last events kept, oldest first, `told` included
    config: Config
    dry_run: bool  # --dry-run or watchdog.dry_run
    wall: float  # time.time() when the cycle ended
    mono: float  # the monotonic clock at the same moment (the policy's stamps are on it)
    pid: int  # the daemon's, and its start time: `status` tells a reused pid from us
    pid_start: int | None

    @cached_property
    def status(self) -> StatusReport:
        """The status report of this cycle (status.json, the metrics page); built once."""
        return build_status(
            self.after,
            self.observation,
            self.config,
            self.kept,
            wall_now=self.wall,
            mono_now=self.mono,
            pid=self.pid,
            pid_start=self.pid_start,
        )


class Reporter(Protocol):
    def publish(self, record: CycleRecord) -> None:
        """Publish this reporter's part of the cycle. Expected failures (a full disk) are logged
        here; anything raised is a bug, logged by `publish`."""


def publish(reporters: Sequence[Reporter], record: CycleRecord) -> None:
    """Hand `record` to each reporter in order; one that raises does not stop the others."""
    for reporter in reporters:
        try:
            reporter.publish(record)
        except Exception as exc:
            log.exception(
                "a reporter failed; the others still publish",
                reporter=type(reporter).__name__,
                error=str(exc),
            )


# --- the reporters, in their order --------------------------------------------------------------


class JournalReporter:
    """The cycle's events to the journal (or the console). `tell` also serves the events that
    happen outside a cycle: start, stop, config reloads."""

    def __init__(self, emit: Callable[[Event], None]) -> None:
        self.emit = emit

    def publish(self, record: CycleRecord) -> None:
        self.tell(record.told)

    def tell(self, events: Iterable[Event]) -> None:
        for event in events:
            try:
                self.emit(event)
            except Exception:  # a logging failure must not stop the watchdog
                with contextlib.suppress(Exception):
                    text = printable(event.message)
                    sys.stderr.write(f"hydra-watchdog: cannot log event: {text}\n")


STATE_REFRESH = 60.0  # seconds: the longest a save is skipped while only the clocks moved


def _without_clocks(state: PolicyState) -> PolicyState:
    """The state less the two stamps that move every cycle (when it last observed, when it
    last read NRestarts): a state file rewritten and fsynced for those alone costs more than
    the rest of a healthy cycle."""
    return replace(state, observed_at=None, nrestarts_at=None)


class StateFileReporter:
    """The policy's memory and the events kept, to the state file (atomic, fsynced).

    Saved when anything but the per-cycle clocks changed, and at least every STATE_REFRESH
    seconds, and at every stop (Daemon.shutdown). A watchdog killed outright therefore restarts
    with stamps up to STATE_REFRESH old: restarts systemd made meanwhile are then dated that much
    earlier (policy._count_restarts dates them to the start of the unseen gap), which can only
    spread them out, never make a slow series look like a burst."""

    def __init__(
        self,
        file: StateFile,
        *,
        saved: PolicyState | None,
        saved_events: tuple[Event, ...],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.file = file  # replaced on a config reload
        self._saved = None if saved is None else _without_clocks(saved)  # None: save next time
        self._saved_events = saved_events
        self._clock = clock
        self._saved_at = clock()
        self._failing = SaidOnce()

    def publish(self, record: CycleRecord) -> None:
        self.save(record.after, record.kept)

    def save(self, state: PolicyState, events: tuple[Event, ...]) -> None:
        # Most healthy cycles change nothing but the clocks: skip the fsyncs then.
        now = self._clock()
        key = _without_clocks(state)
        fresh = now - self._saved_at < STATE_REFRESH
        if fresh and key == self._saved and events == self._saved_events:
            return
        try:
            self.file.save(state, events)
        except OSError as exc:  # a full disk must not stop the watchdog; retried next cycle
            if self._failing.failed(failure_key(exc)):
                log.error("cannot persist the state", error=str(exc), path=str(self.file.path))
            return
        if self._failing.worked():
            log.info("the state is persisted again", path=str(self.file.path))
        self._saved, self._saved_events, self._saved_at = key, events, now


class IncidentReporter:
    """Incidents from each cycle's record (incidents.py, pure), kept in the state dir
    (incidents.json, written only when the tracker changed) and, with metrics on, the closed
    ones counted and the open one shown. The file is read at the first cycle, and again when a
    reload moves the state dir or switches dry run."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.tracker = Tracker()
        self._file: IncidentFile | None = None
        self._unsaved = False
        self._unread = SaidOnce()
        self._failing = SaidOnce()

    def publish(self, record: CycleRecord) -> None:
        file = IncidentFile(record.config.watchdog.state_dir, dry_run=record.dry_run)
        if self._file is None or file.path != self._file.path:
            self._read(file)
        cycle = facts(
            record.before,
            record.after,
            record.observation,
            record.results,
            record.config,
            wall=record.wall,
            mono=record.mono,
        )
        tracker, closed = step(self.tracker, cycle)
        if tracker is not self.tracker:
            self._unsaved = True
        self.tracker = tracker
        if self._unsaved and self._file is not None:
            self._save(self._file)
        if self.metrics is not None:
            if closed is not None:
                self.metrics.record_incident(closed)
            self.metrics.set_open_incident(tracker.open)

    def _read(self, file: IncidentFile) -> None:
        try:
            loaded = file.load()
        except OSError as exc:  # retried next cycle; the incident is tracked meanwhile
            if self._unread.failed(failure_key(exc)):
                log.error("cannot read the incidents", error=str(exc), path=str(file.path))
            return
        self._unread.worked()
        if loaded.note:
            log.warning(loaded.note, path=str(file.path))
        self.tracker, self._file = loaded.tracker, file

    def _save(self, file: IncidentFile) -> None:
        try:
            file.save(self.tracker)
        except OSError as exc:  # a full disk: retried next cycle
            if self._failing.failed(failure_key(exc)):
                log.error("cannot save the incidents", error=str(exc), path=str(file.path))
            return
        self._unsaved = False
        if self._failing.worked():
            log.info("the incidents are saved again", path=str(file.path))


class StatusFileReporter:
    """status.json in the runtime dir, for `hydra-watchdog status` as any user."""

    def __init__(self) -> None:
        self._failing = SaidOnce()

    def publish(self, record: CycleRecord) -> None:
        runtime_dir = record.config.watchdog.runtime_dir
        try:
            write_status(runtime_dir, record.status)
        except OSError as exc:
            if self._failing.failed(failure_key(exc)):
                log.warning("cannot write status.json", error=str(exc))
            return
        if self._failing.worked():
            log.info("status.json is written again", runtime_dir=runtime_dir)


def new_restarts(prev: PolicyState, new: PolicyState) -> list[str]:
    """Who issued each restart the policy recorded this cycle ("watchdog" or "systemd"). A
    multiset difference: systemd's restarts seen in one cycle share one timestamp."""
    added = Counter(new.restarts) - Counter(prev.restarts)
    return [record.by for record, n in added.items() for _ in range(n)]


class MetricsReporter:
    """The Prometheus page: the status gauges, restarts by issuer, actions, /health latency."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def publish(self, record: CycleRecord) -> None:
        m = self.metrics
        for by in new_restarts(record.before, record.after):
            m.record_restart(by)
        m.update(record.status)
        for r in record.results:
            m.record_action(action_name(r.action), r.status.value)
        # The ends of loads that ran in the background (started as "in_progress" cycles ago)
        for r in record.observation.results:
            if r.duration_s is not None:
                cancelled = r.error_kind is ErrorKind.CANCELLED
                m.record_action(action_name(r.action), "cancelled" if cancelled else r.status.value)
        health = record.observation.health.result
        if health.outcome not in _NO_LATENCY:
            m.observe_health_latency(health.latency_s)


class Notify(Protocol):
    def ready(self) -> bool: ...
    def status(self, line: str) -> bool: ...
    def watchdog(self) -> bool: ...
    def stopping(self) -> bool: ...
    def watchdog_interval(self) -> float | None: ...


def status_line(state: PolicyState, dry_run: bool) -> str:
    """sd_notify STATUS=: what `systemctl status hydra-watchdog` shows."""
    head = f"{state.phase.value}"
    if state.findings:
        head += f": {state.findings[0].message}"
    elif state.last_failure and state.phase is not Phase.HEALTHY:
        head += f": {state.last_failure}"
    return ("[dry-run] " if dry_run else "") + cut(head, 200)


class SdNotifyReporter:
    """STATUS= on the first cycle and on every phase change; READY=1 once, after the first
    complete cycle (the reporters before it have published it). WATCHDOG=1 is not a report: the
    loop sends it itself (daemon.py)."""

    def __init__(self, notifier: Notify) -> None:
        self.notifier = notifier
        self._ready = False

    def publish(self, record: CycleRecord) -> None:
        if not self._ready or record.before.phase != record.after.phase:
            self.notifier.status(status_line(record.after, record.dry_run))
        if not self._ready:
            self._ready = True
            self.notifier.ready()


def reporters(
    *,
    journal: JournalReporter,
    state_file: StateFileReporter,
    notifier: Notify,
    metrics: Metrics | None,
) -> tuple[Reporter, ...]:
    """The daemon's chain, in the order the module docstring gives and why."""
    chain: list[Reporter] = [journal, state_file, IncidentReporter(metrics), StatusFileReporter()]
    if metrics is not None:
        chain.append(MetricsReporter(metrics))
    chain.append(SdNotifyReporter(notifier))
    return tuple(chain)

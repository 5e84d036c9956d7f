"""One Observation per cycle, from the adapters, within a bounded time.

Cheap probes run every cycle: /health, the unit's status, the GPU read, the cheap port check
(listeners of the port and port+1 among known PIDs) and the models dir. Expensive ones run only
when the policy asked in `state.wants`: the canary, the host-wide port scan, ldd, the journal.

/v1/model runs every cycle too, but while its last answer was "no model loaded" and nothing has
changed, at most once every MODEL_QUIET: TabbyAPI writes an ERROR line into its log for each such
answer (notes/tabbyapi.md), about 17,000 a day at a 5 s interval while a load is blocked. It is
asked at once when the policy wants it (Probe.MODEL: before it acts on the answer), when the
unit's process changed, after a NixOS switch, when a load of ours ended, and by a new Observer
(a config reload); in between, the cycle carries the last answer, marked not fresh. A model
loaded by hand is seen within MODEL_QUIET.

The probes of one cycle run concurrently, each on its own lane of a pool of long-lived threads
(adapters/bounded.py), and the whole observation has one deadline: the longest deadline among the
probes it runs. Every adapter bounds its own calls, but an adapter that hangs anyway (a lost GPU
inside NVML, a wedged systemctl) must not hang the loop: its answer is replaced by a typed "timed
out" outcome, and while its lane is still stuck the probe is not started again (a hung probe
costs one thread, never one per cycle; no probe costs a new thread per cycle).

/health is evidence only from the verified TabbyAPI: a new connection is vetted against this
cycle's unit status (the gate judges the port's listener by it, adapters/identity.py), so the
probe starts once that status is in, or after at most unit_wait(health_timeout) with the last
cycle's (a unit read that slow must not delay the probe: a vet it fails is WITHHELD, no evidence
either way, never a failure); in the first cycle, with no status before it, as late as the probe
can still end within the cycle's deadline.

A /health probe that hangs is confirmed within the same cycle: once the first probe has gone
unanswered for confirm_after(health_timeout), `failures_before_down - 1` confirming probes (at
most MAX_CONFIRMATIONS) go out at once, each a GET /health on its own connection (never the one
the first probe waits on) with the full health_timeout. The cycle reports the first probe and how
many confirmations failed too (judge_probes), so a hang reaches failures_before_down consecutive
failed probes at about 1.1 x health_timeout instead of failures_before_down x (health_timeout +
the pause between cycles). A probe that fails fast (refused, a 503) sends no confirmations: the
daemon confirms it in the next cycles, CONFIRM_DELAY apart.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from hydra_watchdog.actions import ActionResult, LoadModel, ResultStatus
from hydra_watchdog.adapters.bounded import Call, Pool, Why
from hydra_watchdog.adapters.nixos import SystemWatch
from hydra_watchdog.config import Config
from hydra_watchdog.interfaces import (
    Adapters,
    GpuAdapter,
    HostChecker,
    ProcessScanner,
    TabbyApi,
    UnitManager,
)
from hydra_watchdog.observation import (
    Canary,
    GpuReport,
    Health,
    HostReport,
    HttpResult,
    LoadProgress,
    ModelStatus,
    NvmlErrorKind,
    Observation,
    Outcome,
    PauseRequest,
    PortReport,
    Probe,
    ProcessInfo,
    UnitStatus,
    local_failure,
)
from hydra_watchdog.printable import cut

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

# systemctl, /proc walks and ldd are bounded by their adapters; this is the loop's own backstop.
SUBPROCESS_DEADLINE = 10.0
JOURNAL_LINES = 50
_SLACK = 0.25  # thread start-up and hand-over on a loaded 2-core machine
MODEL_QUIET = 60.0  # seconds between asks of /v1/model while none is loaded and nothing changed


MAX_CONFIRMATIONS = 4  # confirming /health probes per cycle (one lane each); more wait a cycle
CONFIRM_AFTER = 0.5  # seconds a first /health probe may go unanswered before confirmations go out
_PROBES = ("health", "unit", "gpu", "host", "libraries", "journal", "model", "canary", "scan")
_CONFIRM_LANES = tuple(f"confirm-{i}" for i in range(1, MAX_CONFIRMATIONS + 1))


def confirm_after(health_timeout: float) -> float:
    """How long the cycle's first /health probe may go unanswered before its confirmations go
    out: a tenth of its timeout, at most CONFIRM_AFTER. A healthy /health answers in
    milliseconds, so by then the probe is late (a few extra GETs of /health are all a false
    alarm costs); every probe of the cycle has failed by 1.1 x health_timeout, about when a
    single probe would have, and a TabbyAPI that is merely slow answers them all."""
    return min(CONFIRM_AFTER, health_timeout / 10)


def unit_wait(health_timeout: float) -> float:
    """How long the /health probe waits for this cycle's unit status before it starts with the
    last one: as long as a first probe may go unanswered (confirm_after). A D-Bus read takes a
    millisecond; a read this slow (a wedged systemctl) must not take the probe's time."""
    return confirm_after(health_timeout)


def confirmations(failures_before_down: int) -> int:
    """How many confirming probes go out with a first probe that went unanswered: enough for
    the cycle alone to reach failures_before_down, at most MAX_CONFIRMATIONS."""
    return max(0, min(MAX_CONFIRMATIONS, failures_before_down - 1))


def judge_probes(first: Health, confirming: tuple[Health | None, ...]) -> tuple[Health, int]:
    """The cycle's health and how many of its confirming probes failed as well.

    The probes overlap in time, so they have no order: any healthy answer makes the cycle
    healthy (the failed one was the dropped probe). Otherwise the first probe speaks for the
    cycle, and every confirmation that got an answer or timed out counts as one more failed
    probe. A confirmation our own thread did not deliver (None) or could not run (LOCAL_ERROR)
    is no evidence about TabbyAPI and counts for nothing."""
    if first.healthy:
        return first, 0
    answered = [
        h for h in confirming if h is not None and h.result.outcome is not Outcome.LOCAL_ERROR
    ]
    healthy = next((h for h in answered if h.healthy), None)
    if healthy is not None:
        return healthy, 0
    return first, len(answered)


@dataclass(frozen=True)
class _Task(Generic[T_co]):
    """A probe handed to its lane, or why it was not."""

    name: str
    call: Call[T_co] | None
    local_error: str = ""  # the watchdog's own failure (no thread), not the probe's
    stuck: bool = False

    def get(self, deadline: float, clock: Callable[[], float]) -> tuple[T_co | None, str]:
        """(value, "") or (None, why not)."""
        if self.stuck:
            return None, f"{self.name} probe is still stuck from an earlier cycle"
        if self.call is None:
            return None, self.local_error
        if not self.call.wait(deadline - clock()):
            return None, f"{self.name} probe did not answer in time"
        error = self.call.error
        if error is None:
            return self.call.value, ""
        # adapters must not raise; if one does, it is a typed failure
        local = local_failure(error) if isinstance(error, Exception) else ""
        if local:
            return None, f"{self.name} probe not run: {local}"
        return None, f"{self.name} probe crashed: {cut(f'{type(error).__name__}: {error}', 300)}"

    @property
    def local(self) -> bool:
        """Whether our own failure kept the probe from running (no evidence about TabbyAPI)."""
        if self.local_error:
            return True
        error = None if self.call is None or not self.call.done.is_set() else self.call.error
        return isinstance(error, Exception) and bool(local_failure(error))


def _http_failed(why: str, elapsed: float, task: _Task[object]) -> HttpResult:
    # Our own failure to run the probe is no evidence about TabbyAPI: never a timeout.
    return HttpResult(Outcome.LOCAL_ERROR if task.local else Outcome.TIMEOUT, elapsed, None, why)


class Observer:
    def __init__(
        self,
        config: Config,
        *,
        tabby: TabbyApi,
        gpu: GpuAdapter,
        units: UnitManager,
        scanner: ProcessScanner,
        host: HostChecker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.tabby = tabby
        self.gpu = gpu
        self.units = units
        self.scanner = scanner
        self.host = host
        self._clock = clock
        self.system = SystemWatch(config.nixos.current_system, config.nixos.profiles_dir)
        self._pool = Pool("probe", _PROBES + _CONFIRM_LANES)
        # The last answer of /v1/model, when it was asked, and the unit's process then.
        self._model: ModelStatus | None = None
        self._model_at = 0.0
        self._model_process: tuple[str, int | None] = ("", None)
        self._unit_noted = False  # the client's gate has had a unit status to judge by

    @classmethod
    def from_adapters(
        cls, config: Config, adapters: Adapters, *, clock: Callable[[], float] = time.monotonic
    ) -> Observer:
        return cls(
            config,
            tabby=adapters.tabby,
            gpu=adapters.gpu,
            units=adapters.units,
            scanner=adapters.scanner,
            host=adapters.host,
            clock=clock,
        )

    def deadline(self, wants: frozenset[Probe]) -> float:
        """The longest deadline among the probes a cycle with `wants` runs."""
        cfg = self.config
        health = cfg.tabbyapi.health_timeout
        probes = unit_wait(health) + health + confirm_after(health)  # see observe()
        longest = max(probes, cfg.gpu.call_timeout * 2, SUBPROCESS_DEADLINE)
        if Probe.CANARY in wants:
            longest = max(longest, cfg.tabbyapi.canary_deadline)
        return longest

    def close(self) -> None:
        """Stop the probe lanes (a stuck one is left behind); the adapters are not closed."""
        self._pool.close()

    def _start(self, name: str, fn: Callable[[], T]) -> _Task[T]:
        call = self._pool.submit(name, fn)
        if isinstance(call, Call):
            return _Task(name, call)
        if call.why is Why.STUCK:
            return _Task(name, None, stuck=True)
        why = f"the watchdog cannot start the {name} probe's thread ({call.detail})"
        if call.why is Why.CLOSED:
            why = f"{name} probe not run: the observer is closed"
        return _Task(name, None, local_error=why)

    def _get(self, task: _Task[T] | None, name: str, deadline: float) -> tuple[T | None, str]:
        if task is None:  # pragma: no cover - every wanted probe was started
            return None, f"{name} probe was not started"
        return task.get(deadline, self._clock)

    def _confirm_if_late(self, first: _Task[Health], start: float) -> list[_Task[Health]]:
        """The confirming probes, started once the first one (started at `start`) has gone
        unanswered for confirm_after (at once if the cycle got here later than that); none if
        it answered."""
        count = confirmations(self.config.tabbyapi.failures_before_down)
        if first.call is None or count == 0:
            return []  # no first probe went out: nothing to confirm
        late = start + confirm_after(self.config.tabbyapi.health_timeout)
        if first.call.wait(late - self._clock()):
            return []
        return [self._start(lane, self.tabby.health) for lane in _CONFIRM_LANES[:count]]

    def _start_model(
        self,
        wants: frozenset[Probe],
        unit: UnitStatus,
        switched: bool,
        results: tuple[ActionResult, ...],
    ) -> _Task[ModelStatus] | None:
        """GET /v1/model, when this cycle asks it (see the module docstring)."""
        if not self._model_due(wants, unit, switched, results):
            return None
        self._model_process = (unit.invocation_id, unit.main_pid)
        return self._start("model", self.tabby.model)

    def _model_due(
        self,
        wants: frozenset[Probe],
        unit: UnitStatus,
        switched: bool,
        results: tuple[ActionResult, ...],
    ) -> bool:
        last = self._model
        quiet = last is not None and last.known and last.loaded is None
        process = (unit.invocation_id, unit.main_pid)
        load_ended = any(
            isinstance(r.action, LoadModel) and r.status is not ResultStatus.IN_PROGRESS
            for r in results
        )
        return (
            not quiet
            or Probe.MODEL in wants
            or self._clock() - self._model_at >= MODEL_QUIET
            or process != self._model_process
            or switched
            or load_ended
        )

    def _model_answer(
        self, task: _Task[ModelStatus] | None, deadline: float, start: float
    ) -> ModelStatus | None:
        """This cycle's answer, remembered; without a task, the last one, marked not fresh."""
        if task is None:
            last = self._model
            return dataclasses.replace(last, fresh=False) if last is not None else None
        model, _ = self._get(task, "model", deadline)
        self._model, self._model_at = model, start
        return model

    def _start_health(
        self, unit_t: _Task[UnitStatus], start: float, deadline: float
    ) -> tuple[_Task[Health], float]:
        """The cycle's first /health probe and when it started. Its new connections are vetted
        against this cycle's unit status: it goes once that is in (handed to the client's gate
        first), or with the last cycle's after unit_wait at most. Before any status was handed
        over there is none to vet by: it waits as long as the probe can still end in time."""
        health = self.config.tabbyapi.health_timeout
        late = start + unit_wait(health)
        if not self._unit_noted:
            late = max(late, deadline - _SLACK - health - confirm_after(health))
        if unit_t.call is not None and unit_t.call.wait(late - self._clock()):
            unit, _ = unit_t.get(late, self._clock)
            if unit is not None:
                self._note_unit(unit)
        return self._start("health", self.tabby.health), self._clock()

    def _note_unit(self, unit: UnitStatus) -> None:
        self.tabby.note_unit(unit)
        self._unit_noted = True

    def observe(
        self,
        wants: frozenset[Probe] = frozenset(),
        *,
        results: tuple[ActionResult, ...] = (),
        load: LoadProgress | None = None,
        pause: PauseRequest | None = None,
    ) -> Observation:
        cfg = self.config
        start = self._clock()
        deadline = start + self.deadline(wants) + _SLACK
        devices = cfg.gpu.device

        unit_t = self._start("unit", self.units.status)
        gpu_t = self._start("gpu", lambda: self.gpu.read(devices))
        journal_t = (
            self._start("journal", lambda: self.units.journal(JOURNAL_LINES))
            if Probe.JOURNAL in wants
            else None
        )
        # A `nixos-rebuild switch` (the system link moved): the library check runs in this very
        # cycle; the models folder, health and model are checked every cycle anyway.
        system, switched = self.system.read()
        libraries = Probe.LIBRARIES in wants or switched
        health_t, health_started = self._start_health(unit_t, start, deadline)

        unit, why = self._get(unit_t, "unit", deadline)
        if unit is None:
            unit = UnitStatus(name=cfg.tabbyapi.unit, available=False, detail=why)
        # Requests that carry the admin key wait for this cycle's unit status: the client's
        # gate verifies the port's listener against it right before each one.
        self._note_unit(unit)
        # ldd runs in the environment of the unit's process, so the host check waits for it.
        unit_seen = unit
        host_t = self._start("host", lambda: self.host.check(libraries=libraries, unit=unit_seen))
        model_t = self._start_model(wants, unit, switched, results)
        gpus, why = self._get(gpu_t, "gpu", deadline)
        if gpus is None:
            gpus = GpuReport(error=NvmlErrorKind.TIMEOUT, detail=why)

        # The process scan needs the unit's cgroup and the GPU's holders, so it starts once
        # those are in, and gets what is left of the cycle's deadline.
        full = Probe.PORT_SCAN in wants
        unit_now, gpus_now = unit, gpus
        scan_t = self._start("scan", lambda: self.scanner.scan(unit_now, gpus_now, full=full))
        port: PortReport | None = None
        processes: tuple[ProcessInfo, ...] = ()
        scanned, _ = self._get(scan_t, "scan", deadline)
        if scanned is not None:
            port, processes = scanned

        confirm_t = self._confirm_if_late(health_t, health_started)
        health, why = self._get(health_t, "health", deadline)
        if health is None:
            health = Health(_http_failed(why, self._clock() - start, health_t), healthy=False)
        confirming = (
            tuple(self._get(t, t.name, deadline)[0] for t in confirm_t)
            if not health.healthy
            else ()
        )
        health, confirmations_failed = judge_probes(health, confirming)
        model = self._model_answer(model_t, deadline, start)
        # The canary goes only to a TabbyAPI that has a model loaded right now: the exl2 build
        # leaks its load lock on a completion sent while no model is loaded, and every
        # completion hangs from then on (notes/tabbyapi.md) - a canary must never cause that.
        canary_t = (
            self._start("canary", lambda: self.tabby.canary(cfg.tabbyapi.canary_deadline))
            if Probe.CANARY in wants and model is not None and model.loaded
            else None
        )
        # The client enforces the canary's deadline itself and says TIMEOUT: that is a hang. If
        # our own thread did not deliver (stuck, or past the cycle's deadline), the canary is
        # unknown, never a made-up timeout: a restart for a generation hang needs TabbyAPI's
        # silence, not ours.
        canary: Canary | None = None
        if canary_t is not None:
            canary, _ = self._get(canary_t, "canary", deadline)
        host, why = self._get(host_t, "host", deadline)
        if host is None:
            host = HostReport(models_dir_ok=None, models_dir_detail=f"not checked: {why}")
        if not libraries and not health.healthy and cfg.tabbyapi.venv:
            # A restart must never come before this outage's library check (a missing library
            # would only turn it into a loop): check in this very cycle, not the next.
            libs_t = self._start(
                "libraries", lambda: self.host.check(libraries=True, unit=unit_seen)
            )
            checked, _ = self._get(libs_t, "libraries", deadline)
            if checked is not None:
                host = checked
        if Probe.JOURNAL in wants:
            lines, why = self._get(journal_t, "journal", deadline)
            host = dataclasses.replace(host, journal_excerpt=lines if lines is not None else (why,))

        return Observation(
            at=self._clock(),
            admin_key=self.tabby.admin_key(),
            health=health,
            confirmations_failed=confirmations_failed,
            unit=unit,
            host=host,
            model=model,
            canary=canary,
            gpus=gpus,
            port=port,
            processes=processes,
            load=load,
            results=results,
            pause=pause,
            system=system,
        )

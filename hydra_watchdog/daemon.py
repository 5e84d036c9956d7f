"""The daemon: every `interval`, observe -> decide -> act -> tell -> remember.

The loop is the imperative shell around the pure policy. Each cycle:
1. read the pause file; collect the results of actions finished since the last cycle;
2. observe (probes concurrently, bounded; expensive ones only when the policy asked);
3. decide (pure; `now` is the monotonic clock); when it plans actions, persist that intent;
4. act (in order, skip after failure, dry-run says "would ...");
5. narrate the cycle as events (pure), keep the last N;
6. publish: one CycleRecord through the reporters (report/reporters.py): journal, state file,
   status.json, metrics, sd_notify.

WATCHDOG=1 is sent from this loop itself, never from a helper thread: if the loop hangs, systemd
must notice and restart us. An exception inside one cycle is logged and the next cycle runs.
SIGTERM ends the loop after the current step; a model load in flight goes on in its helper
process (act/load_launch.py) for the next watchdog to pick up, the state is persisted, exit 0.
SIGHUP reloads the config; an invalid one is rejected (CONFIG_REJECTED) and the old one stays,
as is one that `run` would refuse at start (an untrusted state or runtime dir, a key file that
can never hold a key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from hydra_watchdog import control
from hydra_watchdog.act.executor import Executor
from hydra_watchdog.act.load import ModelLoader
from hydra_watchdog.act.load_launch import LoadHelpers
from hydra_watchdog.actions import Action, ActionResult
from hydra_watchdog.adapters.admin_key import ADMIN_KEY_MAX_BYTES
from hydra_watchdog.config import EX_CONFIG, Config, ConfigError, check_host, load_config
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.interfaces import Adapters
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import (
    Health,
    HostReport,
    HttpResult,
    LoadProgress,
    Observation,
    Outcome,
    UnitStatus,
)
from hydra_watchdog.observe import Observer
from hydra_watchdog.policy import decide as policy_decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.printable import wrapped
from hydra_watchdog.regular_file import UnusableFileError, read_regular
from hydra_watchdog.report.journal import configure_logging, log_event
from hydra_watchdog.report.log import get_logger
from hydra_watchdog.report.metrics import Metrics
from hydra_watchdog.report.reporters import (
    CycleRecord,
    JournalReporter,
    Notify,
    StateFileReporter,
    publish,
    reporters,
)
from hydra_watchdog.report.sdnotify import Notifier
from hydra_watchdog.report.status_file import mark_stopped
from hydra_watchdog.report.status_view import process_start
from hydra_watchdog.statefile import (
    DRY_RUN_STATE_FILE,
    STATE_FILE,
    StateFile,
    ensure_private_dir,
    ensure_public_dir,
)
from hydra_watchdog.states import Severity

SHUTDOWN_LOAD_WAIT = 10.0

Decide = Callable[[PolicyState, Observation, float, Config], tuple[PolicyState, tuple[Action, ...]]]

log = get_logger("hydra_watchdog.daemon")


def build_adapters(config: Config, *, command: bool = False) -> Adapters:
    """The real adapters for this node. `command`: for `check` or `verify` run from a shell,
    whose TabbyAPI client finds the key as the watchdog's unit gets it (adapters/admin_key.py)."""
    from hydra_watchdog.adapters.fallback_route import LiteLlmRoute  # noqa: PLC0415 - heavy
    from hydra_watchdog.adapters.gpu import NvmlGpu  # noqa: PLC0415 - imports at start only
    from hydra_watchdog.adapters.gpu_reset import NvidiaSmiReset  # noqa: PLC0415
    from hydra_watchdog.adapters.host import HostProbe  # noqa: PLC0415
    from hydra_watchdog.adapters.loader_env import tabby_environment  # noqa: PLC0415
    from hydra_watchdog.adapters.process_control import PidfdControl  # noqa: PLC0415
    from hydra_watchdog.adapters.procs import ProcScanner  # noqa: PLC0415
    from hydra_watchdog.adapters.systemd import SystemctlUnit  # noqa: PLC0415
    from hydra_watchdog.adapters.tabby import TabbyClient  # noqa: PLC0415

    units = SystemctlUnit(config.tabbyapi.unit)
    return Adapters(
        tabby=TabbyClient.from_config(config, command=command),
        gpu=NvmlGpu.from_config(config),
        units=units,
        scanner=ProcScanner.from_config(config),
        host=HostProbe.from_config(config, tabby_environment(config, units.loader_environment)),
        fallback=LiteLlmRoute(),
        processes=PidfdControl(),
        reset=NvidiaSmiReset(),
    )


@dataclass(frozen=True)
class Wiring:
    """Everything one config implies, built in one place: at start and on SIGHUP."""

    config: Config
    adapters: Adapters
    dry_run: bool
    observer: Observer
    executor: Executor
    statefile: StateFile


def wire(
    config: Config,
    adapters: Adapters,
    *,
    cli_dry_run: bool,
    clock: Callable[[], float],
    loader: ModelLoader | None = None,
) -> Wiring:
    """`loader`: the running one on a reload, so a load in flight is neither lost nor doubled."""
    dry_run = cli_dry_run or config.watchdog.dry_run
    return Wiring(
        config=config,
        adapters=adapters,
        dry_run=dry_run,
        observer=Observer.from_adapters(config, adapters, clock=clock),
        executor=Executor(config, adapters, dry_run=dry_run, clock=clock, loader=loader),
        statefile=StateFile(
            config.watchdog.state_dir,
            events_kept=config.watchdog.events_kept,
            name=DRY_RUN_STATE_FILE if dry_run else STATE_FILE,
        ),
    )


CONFIRM_DELAY = 1.0  # seconds between the probes that confirm a failure (at most the interval)


def next_cycle_delay(state: PolicyState, config: Config) -> float:
    """When the next cycle runs. `failures_before_down` failed probes in a row make an outage
    (one dropped probe is not one); once a probe failed, the next ones follow after
    CONFIRM_DELAY instead of a whole interval, so an outage is confirmed in seconds."""
    interval = config.watchdog.interval
    unconfirmed = 0 < state.failures < config.tabbyapi.failures_before_down
    return min(interval, CONFIRM_DELAY) if unconfirmed else interval


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        adapters: Adapters,
        decide: Decide,
        config_path: Path | None = None,
        adapter_factory: Callable[[Config], Adapters] = build_adapters,
        dry_run: bool = False,
        notifier: Notify | None = None,
        metrics: Metrics | None = None,
        emit: Callable[[Event], None] = log_event,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        before_cycle: Callable[[], None] | None = None,
    ) -> None:
        """`before_cycle` runs at the start of every cycle: the seam through which the tests
        hang the loop on purpose (tests/harness/hooked_hydra_watchdog.py)."""
        self.config_path = config_path
        self.adapter_factory = adapter_factory
        self.decide = decide
        self._cli_dry_run = dry_run
        self._apply(wire(config, adapters, cli_dry_run=dry_run, clock=clock))
        self.notifier: Notify = notifier if notifier is not None else Notifier()
        self.clock = clock
        self.wall = wall
        self.before_cycle = before_cycle
        loaded = self.statefile.load()
        self.state = loaded.state
        self.events: deque[Event] = deque(loaded.events, maxlen=config.watchdog.events_kept)
        self.journal = JournalReporter(emit)
        self._pid = os.getpid()
        self._pid_start = process_start(self._pid)
        self.state_file = StateFileReporter(
            self.statefile,
            saved=loaded.state if not loaded.notes else None,
            saved_events=loaded.events,
        )
        self.reporters = reporters(
            journal=self.journal,
            state_file=self.state_file,
            notifier=self.notifier,
            metrics=metrics,
        )
        self._pending: tuple[ActionResult, ...] = ()  # results for the next observation
        self._prev_load: LoadProgress | None = None
        # Set from signal handlers, which run on the main thread between bytecodes: plain flags
        # and a self-pipe, never a lock the interrupted loop might be holding.
        self._stop = False
        self._reload = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.cycles = 0  # completed ones
        self._stop_why = ""  # what asked the loop to end (request_stop)
        self._record(EventKind.STARTED, Severity.NOTICE, self._started_text())
        for note in loaded.notes:
            self._record(EventKind.DIAGNOSIS, Severity.WARNING, note)

    # --- events -----------------------------------------------------------------------------

    def _started_text(self) -> str:
        """What the kind's name does not say: who, watching what, from which config, and
        whether it acts."""
        cfg = self.config
        acts = "dry run: acts on nothing" if self.dry_run else "acts on it"
        return f"pid {self._pid} watches {cfg.tabbyapi.unit} ({acts}); config {cfg.source}"

    def _record(self, kind: EventKind, severity: Severity, message: str, reason: str = "") -> None:
        self._tell((Event(self.wall(), kind, severity, message, self.state.phase, reason=reason),))

    def _tell(self, events: Sequence[Event]) -> None:
        """Events outside a cycle's record (start, stop, reloads): kept, and told at once."""
        self.events.extend(events)
        self.journal.tell(events)

    # --- one cycle --------------------------------------------------------------------------

    def cycle(self) -> None:
        """observe -> decide -> act -> narrate -> publish. Raises only on bugs; the loop (run)
        catches and logs those."""
        if self.before_cycle is not None:
            self.before_cycle()
        cfg = self.config
        pause = control.read_pause(cfg.watchdog.state_dir, self.wall(), self.clock())
        # Progress before drain: a load that ends in between then shows up as a final result
        # (which wins), never as neither in flight nor finished.
        load = self.executor.load_progress()
        finished = (*self._pending, *self.executor.drain())
        self._pending = ()
        obs = self.observer.observe(self.state.wants, results=finished, load=load, pause=pause)
        self._ping()
        prev = self.state
        new, actions = self.decide(prev, obs, self.clock(), cfg)
        self.state = new
        if actions:
            # The intent first (restart budget, back-off, load in flight): a kill -9 in the middle
            # of the actions must not forget that they were started.
            self._persist()
        results = self.executor.run(actions, between=self._ping)
        self._pending = results
        told = narrate(
            prev,
            new,
            actions,
            results,
            obs,
            config=cfg,
            wall=self.wall(),
            prev_load=self._prev_load,
        )
        self._prev_load = obs.load
        self.events.extend(told)
        record = CycleRecord(
            before=prev,
            after=new,
            observation=obs,
            actions=actions,
            results=results,
            told=told,
            kept=tuple(self.events),
            config=cfg,
            dry_run=self.dry_run,
            wall=self.wall(),
            mono=self.clock(),
            pid=self._pid,
            pid_start=self._pid_start,
        )
        publish(self.reporters, record)
        self.cycles += 1

    def _persist(self) -> None:
        self.state_file.save(self.state, tuple(self.events))

    # --- the loop ---------------------------------------------------------------------------

    def _ping(self) -> None:
        if self.notifier.watchdog_interval() is not None:
            self.notifier.watchdog()

    def _apply(self, wiring: Wiring) -> None:
        self.config = wiring.config
        self.adapters = wiring.adapters
        self.dry_run = wiring.dry_run
        self.observer = wiring.observer
        self.executor = wiring.executor
        self.statefile = wiring.statefile

    def _wake_up(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"!")

    def _sleep(self, seconds: float) -> None:
        readable, _, _ = select.select([self._wake_r], [], [], max(0.0, seconds))
        if readable:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)

    def request_stop(self, why: str = "asked to stop") -> None:
        """`why`: what asked, for the stop's record ("SIGTERM")."""
        self._stop_why = self._stop_why or why
        self._stop = True
        self._wake_up()

    def request_reload(self) -> None:
        self._reload = True
        self._wake_up()

    def reload(self) -> bool:
        """SIGHUP: a new config if it is valid; otherwise the old one stays and we say why."""
        if self.config_path is None:
            return False
        old, loader = self.adapters, self.executor.loader
        try:
            new = load_config(self.config_path)
            check_host(new)
            refused = start_refusal(new)  # what `run` refuses at start, a reload refuses too
            if refused:
                raise ConfigError("", refused)
            adapters = self.adapter_factory(new)
            try:
                # The running loader carries over: a load in flight finishes on the client it
                # began with, its result still reaches drain(), and no second load starts.
                wiring = wire(
                    new, adapters, cli_dry_run=self._cli_dry_run, clock=self.clock, loader=loader
                )
            except Exception:
                adapters.close(keep=old.members())
                raise
        except ConfigError as exc:
            self._record(
                EventKind.CONFIG_REJECTED,
                Severity.ERR,
                f"new config rejected, keeping the old one: {exc}",
                reason=str(exc),
            )
            return False
        except Exception as exc:
            self._record(
                EventKind.CONFIG_REJECTED,
                Severity.ERR,
                f"new config could not be applied, keeping the old one: {exc}",
                reason=str(exc),
            )
            return False
        old_observer = self.observer
        self._apply(wiring)
        old_observer.close()
        # The old adapters hold a thread, an NVML handle and a connection pool each: closed,
        # but for one the factory handed out again and a client a load still streams through.
        in_flight = (old.tabby,) if loader.in_flight else ()
        old.close(keep=(*adapters.members(), *in_flight))
        self.state_file.file = self.statefile
        self.events = deque(self.events, maxlen=new.watchdog.events_kept)
        self._record(
            EventKind.CONFIG_RELOADED, Severity.NOTICE, f"config reloaded from {new.source}"
        )
        return True

    def close(self) -> None:
        """At exit: stop the probe threads and close the adapters (but a client that a load
        which ignored its cancel still streams through)."""
        self.observer.close()
        keep = (self.adapters.tabby,) if self.executor.loader.in_flight else ()
        self.adapters.close(keep=keep)

    def _safe_cycle(self) -> None:
        try:
            self.cycle()
        except Exception as exc:
            log.exception("cycle failed; the next one runs as usual", error=str(exc))

    def run(self, *, once: bool = False) -> int:
        interval_ping = self.notifier.watchdog_interval()
        next_cycle = self.clock()
        next_ping = self.clock()
        while not self._stop:
            if self._reload:
                self._reload = False
                self.reload()
            now = self.clock()
            if now >= next_cycle:
                self._safe_cycle()
                if once:
                    self._stop_why = "one cycle run (--once)"
                    break
                # Fixed rate from the cycle's start; an overrun starts the next one at once. A
                # probe that just failed is confirmed sooner (issue 15: detection).
                step = next_cycle_delay(self.state, self.config)
                next_cycle = max(next_cycle + step, now) if step else now
            if interval_ping is not None and self.clock() >= next_ping:
                self.notifier.watchdog()
                next_ping = self.clock() + interval_ping
            wake = next_cycle if interval_ping is None else min(next_cycle, next_ping)
            self._sleep(wake - self.clock())
        return self.shutdown()

    def shutdown(self) -> int:
        self.notifier.stopping()
        why = self._stop_why or "asked to stop"
        self._record(EventKind.STOPPING, Severity.NOTICE, f"pid {self._pid} stops: {why}")
        if not self.executor.shutdown(SHUTDOWN_LOAD_WAIT):
            self._record(
                EventKind.ACTION_FAILED,
                Severity.WARNING,
                f"a model load did not stop within {SHUTDOWN_LOAD_WAIT:g}s of the cancel",
            )
        leftovers = self.executor.drain()
        if leftovers:
            # told as the ends of loads they are (load_failed, model_loaded), as in a cycle
            self._tell(
                narrate(
                    self.state,
                    self.state,
                    (),
                    (),
                    dataclasses.replace(self._empty_obs(), results=leftovers),
                    config=self.config,
                    wall=self.wall(),
                )
            )
        try:  # `status` must say stopped, not repeat the last verdict as if we still watched
            mark_stopped(self.config.watchdog.runtime_dir, wall=self.wall(), pid=self._pid)
        except OSError as exc:
            log.warning("cannot mark status.json stopped", error=str(exc))
        try:
            self.state_file.file.save(self.state, tuple(self.events))
        except OSError as exc:
            log.error("cannot persist the state at shutdown", error=str(exc))
            return 1
        return 0

    def _empty_obs(self) -> Observation:
        return Observation(
            at=self.clock(),
            health=Health(HttpResult(Outcome.TIMEOUT, 0.0, None, "shutting down"), False),
            unit=UnitStatus(name=self.config.tabbyapi.unit, available=False),
            host=HostReport(models_dir_ok=None),  # not checked: shutting down
        )


def start_refusal(config: Config) -> str:
    """Why `run` must not start (exit 78), or must not take `config` on a reload: a state or
    runtime dir that a component of its path lets another user replace (made here when missing,
    as the daemon would), or an admin key file that can never hold a key. "" when none."""
    try:  # before anything reads pause.json or the state from a dir someone else prepared
        ensure_private_dir(Path(config.watchdog.state_dir))
        ensure_public_dir(Path(config.watchdog.runtime_dir))
    except OSError as exc:  # UnsafeDirectoryError names the component
        return str(exc)
    return unusable_key_file(config.tabbyapi.admin_key_file)


def unusable_key_file(path: str) -> str:
    """Why the configured admin key file can never hold a key (a FIFO, a device, a directory,
    too large), or "". Refused at start like a bad config; one that is missing or unreadable is
    not: the key's problem is said every cycle, and the file may appear later."""
    if not path:
        return ""
    try:
        read_regular(path, ADMIN_KEY_MAX_BYTES, follow=True)
    except UnusableFileError as exc:
        return f"tabbyapi.admin_key_file {path} is unusable: {exc}"
    except OSError:
        return ""
    return ""


def run_daemon(
    config_path: Path | str,
    *,
    dry_run: bool = False,
    once: bool = False,
    adapter_factory: Callable[[Config], Adapters] = build_adapters,
    before_cycle: Callable[[], None] | None = None,
) -> int:
    """`hydra-watchdog run`: exit 0 after SIGTERM (or after one cycle with `once`), 78 on a bad
    config. `adapter_factory` is the seam the demo and the end-to-end tests use to put a
    stand-in unit under the daemon where there is no systemd; `before_cycle` is the one they
    hang the loop through (Daemon)."""
    path = Path(config_path)
    try:
        config = load_config(path)
        check_host(config)
    except ConfigError as exc:
        print(wrapped(f"hydra-watchdog: {exc}"), file=sys.stderr)
        return EX_CONFIG
    refused = start_refusal(config)
    if refused:  # 78: no restart loop
        print(wrapped(f"hydra-watchdog: refusing to start: {refused}"), file=sys.stderr)
        return EX_CONFIG
    configure_logging()
    adapters = adapter_factory(config)
    metrics = Metrics()
    if config.metrics.listen:
        serving = metrics.serve(config.metrics.listen)
        if not serving.ok:
            log.warning("metrics exporter not started", reason=serving.detail)
    daemon = Daemon(
        config,
        adapters=adapters,
        decide=policy_decide,
        config_path=path,
        adapter_factory=adapter_factory,
        dry_run=dry_run,
        metrics=metrics,
        before_cycle=before_cycle,
    )
    if not daemon.dry_run:  # loads outlive us in a helper; a dry run never loads nor adopts one
        daemon.executor.loader.helpers = LoadHelpers.from_config(path, config)

    def on_term(signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop(signal.Signals(signum).name)

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        return daemon.run(once=once)
    finally:
        daemon.close()
        metrics.shutdown()

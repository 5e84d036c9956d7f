"""A model load in the background: minutes long, one at a time, cancellable on shutdown.

TabbyAPI's older builds have no load lock (a second concurrent load OOMs the card) and cancel a
load when the client disconnects, so: exactly one load in flight, never a short timeout on the
stream, and on shutdown a clean cancel rather than a dropped connection mid-stream. The loop never
waits for a load: `start()` answers IN_PROGRESS at once, `progress()` feeds Observation.load, and
the final ActionResult is picked up by `drain()` in a later cycle.

With `helpers` (the daemon's case), the load runs in a helper process instead of a thread
(act/load_launch.py), so it survives the watchdog's own stop or restart: `shutdown()` leaves it
running, and a new watchdog finds it through the record in the state dir, reports it as progress
(the policy never issues a second load) and its outcome once, from `drain()`. Only `cancel()`,
a deliberate cancel, stops it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hydra_watchdog.act.load_launch import LoadHelpers
from hydra_watchdog.actions import ActionResult, LoadModel, Reason, ResultStatus
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import LoadOutcome, TabbyApi
from hydra_watchdog.observation import LoadProgress
from hydra_watchdog.states import Rule

# The adapter enforces load_timeout itself; this is how much later we cancel a load it failed to
# stop, as a backstop.
_BACKSTOP = 30.0


class ModelLoader:
    def __init__(
        self,
        tabby: TabbyApi,
        load_timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        helpers: LoadHelpers | None = None,
    ) -> None:
        self.tabby = tabby
        self.helpers = helpers
        self.load_timeout = load_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._action: LoadModel | None = None
        self._progress: LoadProgress | None = None
        self._finished: list[ActionResult] = []

    def start(self, action: LoadModel) -> ActionResult:
        """IN_PROGRESS (the load runs in a thread or a helper) or REFUSED "load in flight"."""
        if self.helpers is not None:
            return self._start_helper(action, self.helpers)
        with self._lock:
            now = self._clock()
            if self._thread is not None and self._thread.is_alive():
                busy = self._action.model if self._action else "?"
                return ActionResult(
                    action,
                    ResultStatus.REFUSED,
                    f"load in flight ({busy}); never two loads at once",
                    now,
                    ErrorKind.LOAD_IN_FLIGHT,
                )
            self._cancel = threading.Event()
            self._action = action
            self._progress = LoadProgress(model=action.model, started_at=now)
            tabby, cancel = self.tabby, self._cancel
            self._thread = threading.Thread(
                target=self._run,
                args=(action, tabby, cancel, now),
                name="model-load",
                daemon=True,
            )
            self._thread.start()
        return ActionResult(
            action, ResultStatus.IN_PROGRESS, f"loading {action.model} in the background", now
        )

    def _run(
        self, action: LoadModel, tabby: TabbyApi, cancel: threading.Event, started: float
    ) -> None:
        def on_progress(done: int, total: int) -> None:
            with self._lock:
                if self._progress is not None:
                    self._progress = LoadProgress(
                        self._progress.model, self._progress.started_at, done, total
                    )

        try:
            outcome = tabby.load_model(
                action.model, timeout=self.load_timeout, on_progress=on_progress, cancel=cancel
            )
        except Exception as exc:  # an adapter bug must not leave a load "in flight" forever
            outcome = LoadOutcome(ok=False, detail=f"load crashed: {type(exc).__name__}: {exc}")
        if outcome.ok:
            status, kind = ResultStatus.OK, ErrorKind.NONE
        elif cancel.is_set():
            status, kind = ResultStatus.FAILED, ErrorKind.CANCELLED
        else:
            status, kind = (
                ResultStatus.FAILED,
                _FAILURE_KINDS.get(outcome.kind, ErrorKind.LOAD_ERROR),
            )
        with self._lock:
            now = self._clock()
            ended = ActionResult(action, status, outcome.detail, now, kind, now - started)
            self._finished.append(ended)
            self._progress = None
            self._action = None

    def _start_helper(self, action: LoadModel, helpers: LoadHelpers) -> ActionResult:
        now = self._clock()
        busy = helpers.current()
        if busy is not None and helpers.alive(busy):
            return ActionResult(
                action,
                ResultStatus.REFUSED,
                f"load in flight ({busy.model}); never two loads at once",
                now,
                ErrorKind.LOAD_IN_FLIGHT,
            )
        with self._lock:  # one that ended unseen is reported before the next begins
            self._finished.extend(self._collect(helpers))
        launched = helpers.launch(action, now)
        if isinstance(launched, str):
            return ActionResult(action, ResultStatus.FAILED, launched, now, ErrorKind.LOAD_ERROR)
        where = f"unit {launched.unit}" if launched.unit else f"pid {launched.pid}"
        return ActionResult(
            action, ResultStatus.IN_PROGRESS, f"loading {action.model} in a helper ({where})", now
        )

    def _collect(self, helpers: LoadHelpers) -> tuple[ActionResult, ...]:
        """The outcome of a helper's load once it ended, reported once (its record removed)."""
        launch = helpers.current()
        if launch is None or helpers.alive(launch):
            return ()
        report = helpers.report(launch)
        try:
            rule = Rule(launch.rule)
        except ValueError:
            rule = Rule.NO_MODEL
        action = LoadModel(launch.model, launch.vram_needed_bytes, Reason(rule, launch.evidence))
        kind: ErrorKind
        if report is None or not report.finished:
            status, kind = ResultStatus.FAILED, ErrorKind.LOAD_ERROR
            detail = "the load helper ended without an outcome (killed?)"
        elif report.ok:
            status, kind, detail = ResultStatus.OK, ErrorKind.NONE, report.detail
        else:
            status, detail = ResultStatus.FAILED, report.detail
            kind = _FAILURE_KINDS.get(report.kind, ErrorKind.LOAD_ERROR)
            if report.detail.startswith("cancelled"):
                kind = ErrorKind.CANCELLED
        took = helpers.duration(launch, report)
        helpers.forget()
        return (ActionResult(action, status, detail, self._clock(), kind, took),)

    @property
    def in_flight(self) -> bool:
        if self.helpers is not None:
            launch = self.helpers.current()
            return launch is not None and self.helpers.alive(launch)
        with self._lock:
            return self._thread is not None and self._thread.is_alive() and self._action is not None

    def progress(self) -> LoadProgress | None:
        """The load in flight, for Observation.load; None when none runs."""
        if self.helpers is not None:
            return self._helper_progress(self.helpers)
        with self._lock:
            progress = self._progress
        if progress is not None and self._clock() - progress.started_at > (
            self.load_timeout + _BACKSTOP
        ):
            self._cancel.set()
        return progress

    def _helper_progress(self, helpers: LoadHelpers) -> LoadProgress | None:
        launch = helpers.current()
        if launch is None or not helpers.alive(launch):
            return None
        if self._clock() - launch.started_mono > self.load_timeout + _BACKSTOP:
            helpers.stop(launch, 0.0)
        report = helpers.report(launch)
        done, total = (report.module, report.modules) if report is not None else (0, 0)
        return LoadProgress(launch.model, launch.started_mono, done, total)

    def drain(self) -> tuple[ActionResult, ...]:
        """Loads that finished since the last call."""
        with self._lock:
            if self.helpers is not None:
                self._finished.extend(self._collect(self.helpers))
            done, self._finished = tuple(self._finished), []
        return done

    def shutdown(self, wait: float) -> bool:
        """The watchdog stops: a helper's load goes on (a new watchdog picks it up); a load in
        a thread cannot outlive us and is cancelled cleanly, as `cancel` does."""
        if self.helpers is not None:
            return True
        return self.cancel(wait)

    def cancel(self, wait: float) -> bool:
        """Ask a load in flight to stop and wait up to `wait` s; True when none is left running."""
        if self.helpers is not None:
            launch = self.helpers.current()
            return launch is None or self.helpers.stop(launch, wait)
        thread = self._thread
        self._cancel.set()
        if thread is None:
            return True
        thread.join(wait)
        return not thread.is_alive()


# LoadOutcome.kind -> ActionResult.error_kind: what the policy needs to know of a failed load.
_FAILURE_KINDS = {"unauthorized": ErrorKind.UNAUTHORIZED, "permanent": ErrorKind.LOAD_PERMANENT}

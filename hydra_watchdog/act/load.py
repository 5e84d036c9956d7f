"""A model load in the background: minutes long, one at a time, cancellable on shutdown.

TabbyAPI's older builds have no load lock (a second concurrent load OOMs the card) and cancel a
load when the client disconnects, so: exactly one load in flight, never a short timeout on the
stream, and on shutdown a clean cancel rather than a dropped connection mid-stream. The loop never
waits for a load: `start()` answers IN_PROGRESS at once, `progress()` feeds Observation.load, and
the final ActionResult is picked up by `drain()` in a later cycle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hydra_watchdog.actions import ActionResult, LoadModel, ResultStatus
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import LoadOutcome, TabbyApi
from hydra_watchdog.observation import LoadProgress

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
    ) -> None:
        self.tabby = tabby
        self.load_timeout = load_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._action: LoadModel | None = None
        self._progress: LoadProgress | None = None
        self._finished: list[ActionResult] = []

    def start(self, action: LoadModel) -> ActionResult:
        """IN_PROGRESS (the load runs in a thread) or REFUSED "load in flight"."""
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
                target=self._run, args=(action, tabby, cancel), name="model-load", daemon=True
            )
            self._thread.start()
        return ActionResult(
            action, ResultStatus.IN_PROGRESS, f"loading {action.model} in the background", now
        )

    def _run(self, action: LoadModel, tabby: TabbyApi, cancel: threading.Event) -> None:
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
            status, kind = ResultStatus.FAILED, ErrorKind.LOAD_ERROR
        with self._lock:
            self._finished.append(ActionResult(action, status, outcome.detail, self._clock(), kind))
            self._progress = None
            self._action = None

    @property
    def in_flight(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive() and self._action is not None

    def progress(self) -> LoadProgress | None:
        """The load in flight, for Observation.load; None when none runs."""
        with self._lock:
            progress = self._progress
        if progress is not None and self._clock() - progress.started_at > (
            self.load_timeout + _BACKSTOP
        ):
            self._cancel.set()
        return progress

    def drain(self) -> tuple[ActionResult, ...]:
        """Loads that finished since the last call."""
        with self._lock:
            done, self._finished = tuple(self._finished), []
        return done

    def cancel(self, wait: float) -> bool:
        """Ask a load in flight to stop and wait up to `wait` s; True when none is left running."""
        thread = self._thread
        self._cancel.set()
        if thread is None:
            return True
        thread.join(wait)
        return not thread.is_alive()

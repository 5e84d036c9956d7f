"""Bounded calls on long-lived threads: the one way the adapters layer waits for something that
may hang (a lost GPU inside NVML, a wedged systemctl, a probe with a bug).

A Python thread cannot be cancelled. So each kind of call gets a lane: one long-lived daemon
thread that runs that kind's calls one at a time. The caller waits for a call at most until its
deadline; a call that misses it keeps running and keeps its lane busy, and every further call
on that lane is refused at once (never queued) until it returns. A hung call therefore costs one
thread and one deadline per cycle, never a growing pile of threads, and when it finally returns
the lane takes calls again. A pool is a fixed set of named lanes, each started on first use.

Nothing here raises for what a call raises: the exception is handed to the caller, who types
it. A lane whose thread cannot start (out of threads or memory) refuses the call as the
watchdog's own failure and tries again on the next one.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_PR_SET_NAME = 15  # prctl(2)
_COMM_MAX = 15  # bytes of a thread's name the kernel keeps


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` where `top -H`, `ps -L` and /proc/PID/task/TID/comm show it
    (its first 15 bytes): Python's thread names stay inside Python, so a CPU or hang inquiry
    would see a dozen threads all called hydra-watchdog. Best effort: nothing else depends on
    it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:_COMM_MAX], 0, 0, 0)
    except (OSError, AttributeError):  # no libc by that name, or no prctl (not Linux)
        pass


class Call(Generic[T]):
    """One callable handed to a lane; `value` or `error` once `done` is set."""

    __slots__ = ("done", "error", "fn", "started", "value", "what")

    def __init__(self, what: str, fn: Callable[[], T]) -> None:
        self.what = what
        self.fn = fn
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()

    def wait(self, timeout: float) -> bool:
        """Whether the call returned within `timeout` seconds."""
        return self.done.wait(max(0.0, timeout))

    def run(self) -> None:
        """On the lane's thread only."""
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to the caller, typed there
            self.error = exc
        self.done.set()


class Why(StrEnum):
    STUCK = "stuck"  # an earlier call has not returned
    CLOSED = "closed"
    NO_THREAD = "no_thread"  # the lane's thread could not start: the watchdog's own failure


@dataclass(frozen=True)
class Refused:
    """A call that was not run."""

    why: Why
    detail: str
    stuck: Call[Any] | None = None  # the call that keeps the lane busy (Why.STUCK)

    @property
    def stuck_for(self) -> float:
        return 0.0 if self.stuck is None else time.monotonic() - self.stuck.started


class Lane:
    """One long-lived daemon thread running calls one at a time (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[Call[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last: Call[Any] | None = None
        self._closed = False

    @property
    def busy(self) -> bool:
        """Whether a call handed over earlier has not returned yet."""
        last = self._last
        return last is not None and not last.done.is_set()

    def submit(self, what: str, fn: Callable[[], T]) -> Call[T] | Refused:
        with self._lock:
            if self._closed:
                return Refused(Why.CLOSED, f"{what}: the {self.name} lane is closed")
            last = self._last
            if last is not None and not last.done.is_set():
                return Refused(Why.STUCK, f"{what}: {last.what} has not returned", last)
            if self._thread is None:
                thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # "can't start new thread": out of threads/memory
                    return Refused(Why.NO_THREAD, str(exc))
                self._thread = thread
            call = Call(what, fn)
            self._last = call
            self._calls.put(call)
            return call

    def close(self, wait: float = 1.0) -> None:
        """Stop the thread once it is idle; a thread stuck in a call is left behind (it is a
        daemon thread, and waiting for it would only eat `wait`)."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._calls.put(None)
        if thread is not None and not self.busy:
            thread.join(wait)

    def _work(self) -> None:
        name_this_thread(self.name)
        while True:
            call = self._calls.get()
            if call is None:
                return
            call.run()


class Pool:
    """A fixed set of named lanes (`<prefix>-<name>`), each started on first use."""

    def __init__(self, prefix: str, names: Iterable[str]) -> None:
        self._lanes = {name: Lane(f"{prefix}-{name}") for name in names}

    def submit(self, name: str, fn: Callable[[], T]) -> Call[T] | Refused:
        """Raises KeyError for a name outside the set: a bug, never a condition."""
        return self._lanes[name].submit(name, fn)

    def busy(self, name: str) -> bool:
        return self._lanes[name].busy

    def close(self, wait: float = 1.0) -> None:
        for lane in self._lanes.values():
            lane.close(wait)

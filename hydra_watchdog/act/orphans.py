"""Kill an orphan: a TabbyAPI process left outside the unit's cgroup, holding VRAM or the port.

PIDs are reused. Between the observation that classified a process as an orphan and this kill,
the orphan may have exited and its PID gone to something else entirely (a shell, the new
TabbyAPI). So the process is pinned first (a pidfd: signals through it can only reach that very
process, whatever happens to the PID number), then its identity recorded at observation time
(start ticks since boot, cmdline, uid) is re-read and compared exactly. Start ticks, not wall
time: an NTP step between scan and kill changes every wall-clock start time, never the ticks.

The decisions are made here; /proc and the pidfd are an adapter (interfaces.ProcessControl).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from hydra_watchdog.actions import ActionResult, KillOrphan, ResultStatus
from hydra_watchdog.config import OrphansSection
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import Delivery, PinFailure, PinnedProcess, ProcessControl
from hydra_watchdog.printable import one_line

_KILL_WAIT = 5.0  # after SIGKILL: the kernel frees it promptly unless it is stuck in D state

_Result = Callable[[ResultStatus, str, ErrorKind], ActionResult]


def kill_orphan(
    action: KillOrphan,
    config: OrphansSection,
    *,
    unit: str,
    processes: ProcessControl,
    clock: Callable[[], float] = time.monotonic,
) -> ActionResult:
    """SIGTERM, wait `term_grace`, SIGKILL, if (and only if) the process is still the one the
    policy saw and is not (now) in `unit`'s cgroup. REFUSED when orphan killing is disabled, the
    identity changed, or the unit claims it: the observation that called it an orphan may
    predate a restart by systemd, whose new main process has the same command line."""

    def result(status: ResultStatus, detail: str, kind: ErrorKind = ErrorKind.NONE) -> ActionResult:
        return ActionResult(action, status, detail, clock(), kind)

    if not config.enabled:
        return result(
            ResultStatus.REFUSED, "orphan killing is disabled (orphans.enabled)", ErrorKind.DISABLED
        )
    pid = action.pid
    pinned = processes.pin(pid)
    if isinstance(pinned, PinFailure):
        if pinned.gone:
            gone = f"pid {pid} is gone; nothing to kill"
            return result(ResultStatus.REFUSED, gone, ErrorKind.IDENTITY_CHANGED)
        return result(ResultStatus.FAILED, pinned.detail, ErrorKind.NO_PERMISSION)
    try:
        return _kill_pinned(action, config, unit, processes, pinned, result)
    finally:
        pinned.close()


def _kill_pinned(
    action: KillOrphan,
    config: OrphansSection,
    unit: str,
    processes: ProcessControl,
    pinned: PinnedProcess,
    result: _Result,
) -> ActionResult:
    pid = action.pid
    now = pinned.identity()
    if now is None:
        if pinned.exited(0):
            return result(ResultStatus.OK, f"pid {pid} had already exited", ErrorKind.NONE)
        return result(ResultStatus.FAILED, f"cannot inspect pid {pid}", ErrorKind.NO_PERMISSION)
    if (now.start_ticks, now.cmdline, now.uid) != (action.start_ticks, action.cmdline, action.uid):
        return result(
            ResultStatus.REFUSED,
            f"pid {pid} is now another process (start ticks {now.start_ticks} vs "
            f"{action.start_ticks}, uid {now.uid} vs {action.uid}, cmdline "
            f"{one_line(now.command, 80)!r}); not signalled",
            ErrorKind.IDENTITY_CHANGED,
        )
    ns = processes.own_pid_namespace()
    if ns is None or now.pid_ns != ns:
        return result(
            ResultStatus.REFUSED,
            f"pid {pid} lives in another PID namespace (a container?); not signalled",
            ErrorKind.IDENTITY_CHANGED,
        )
    if processes.in_unit(pid, unit) is not False:
        return result(
            ResultStatus.REFUSED,
            f"pid {pid} is (or may be) in {unit}'s cgroup now; not signalled",
            ErrorKind.IN_UNIT,
        )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        delivery, why = pinned.signal(sig)
        if delivery is Delivery.GONE:
            return result(ResultStatus.OK, f"pid {pid} exited after SIGTERM", ErrorKind.NONE)
        if delivery is Delivery.DENIED:
            return result(
                ResultStatus.FAILED,
                f"not allowed to signal pid {pid}: {why}",
                ErrorKind.NO_PERMISSION,
            )
        if sig is signal.SIGTERM and pinned.exited(config.term_grace):
            return result(ResultStatus.OK, f"pid {pid} exited after SIGTERM", ErrorKind.NONE)
    if pinned.exited(_KILL_WAIT):
        return result(
            ResultStatus.OK,
            f"pid {pid} ignored SIGTERM for {config.term_grace:g}s; killed with SIGKILL",
            ErrorKind.NONE,
        )
    return result(
        ResultStatus.FAILED,
        f"pid {pid} survived SIGKILL for {_KILL_WAIT:g}s (uninterruptible sleep?)",
        ErrorKind.UNKILLABLE,
    )

"""Kill an orphan: a TabbyAPI process left outside the unit's cgroup, holding VRAM or the port.

PIDs are reused. Between the observation that classified a process as an orphan and this kill,
the orphan may have exited and its PID gone to something else entirely (a shell, the new
TabbyAPI). So the identity recorded at observation time (pid, start time, cmdline) is re-read
and compared first, and the signals go through a psutil.Process that itself re-checks the start
time before each send: a reused PID is never signalled.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import psutil

from hydra_watchdog.actions import ActionResult, KillOrphan, ResultStatus
from hydra_watchdog.config import OrphansSection
from hydra_watchdog.probes.procs import in_unit, read_cmdline

# psutil's create_time() is boot time + start ticks (10 ms); two reads of one process agree
# exactly, a different process started in another tick differs by at least one tick.
_START_TIME_TOLERANCE = 0.005
_KILL_WAIT = 5.0  # after SIGKILL: the kernel frees it promptly unless it is stuck in D state
_POLL = 0.05


def _gone(proc: psutil.Process) -> bool:
    # A zombie has exited and freed its memory and sockets; only its parent's wait() is pending.
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _wait_gone(proc: psutil.Process, timeout: float, clock: Callable[[], float]) -> bool:
    deadline = clock() + timeout
    while not _gone(proc):
        if clock() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def kill_orphan(
    action: KillOrphan,
    config: OrphansSection,
    *,
    unit: str,
    clock: Callable[[], float] = time.monotonic,
) -> ActionResult:
    """SIGTERM, wait `term_grace`, SIGKILL, if (and only if) the process is still the one the
    policy saw and is not (now) in `unit`'s cgroup. REFUSED when orphan killing is disabled, the
    identity changed, or the unit claims it: the observation that called it an orphan may
    predate a restart by systemd, whose new main process has the same command line."""

    def result(status: ResultStatus, detail: str, kind: str = "") -> ActionResult:
        return ActionResult(action, status, detail, clock(), kind)

    if not config.enabled:
        return result(
            ResultStatus.REFUSED, "orphan killing is disabled (orphans.enabled)", "disabled"
        )
    try:
        proc = psutil.Process(action.pid)
        start_time = proc.create_time()
        cmdline = read_cmdline(action.pid) or ()
    except psutil.NoSuchProcess:
        return result(
            ResultStatus.REFUSED, f"pid {action.pid} is gone; nothing to kill", "identity_changed"
        )
    except psutil.AccessDenied as exc:
        return result(
            ResultStatus.FAILED, f"cannot inspect pid {action.pid}: {exc}", "no_permission"
        )
    if abs(start_time - action.start_time) > _START_TIME_TOLERANCE or cmdline != action.cmdline:
        return result(
            ResultStatus.REFUSED,
            f"pid {action.pid} is now another process (start time {start_time:.2f} vs "
            f"{action.start_time:.2f}, cmdline {' '.join(cmdline)[:80]!r}); not signalled",
            "identity_changed",
        )
    if in_unit(action.pid, unit) is not False:
        return result(
            ResultStatus.REFUSED,
            f"pid {action.pid} is (or may be) in {unit}'s cgroup now; not signalled",
            "in_unit",
        )
    if _gone(proc):
        return result(ResultStatus.OK, f"pid {action.pid} had already exited")
    try:
        proc.send_signal(signal.SIGTERM)
        if _wait_gone(proc, config.term_grace, clock):
            return result(ResultStatus.OK, f"pid {action.pid} exited after SIGTERM")
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return result(ResultStatus.OK, f"pid {action.pid} exited after SIGTERM")
    except psutil.AccessDenied as exc:
        return result(
            ResultStatus.FAILED, f"not allowed to signal pid {action.pid}: {exc}", "no_permission"
        )
    if _wait_gone(proc, _KILL_WAIT, clock):
        return result(
            ResultStatus.OK,
            f"pid {action.pid} ignored SIGTERM for {config.term_grace:g}s; killed with SIGKILL",
        )
    return result(
        ResultStatus.FAILED,
        f"pid {action.pid} survived SIGKILL for {_KILL_WAIT:g}s (uninterruptible sleep?)",
        "unkillable",
    )

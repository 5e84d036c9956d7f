"""Kill an orphan: a TabbyAPI process left outside the unit's cgroup, holding VRAM or the port.

PIDs are reused. Between the observation that classified a process as an orphan and this kill,
the orphan may have exited and its PID gone to something else entirely (a shell, the new
TabbyAPI). So the process is pinned first (a pidfd: signals through it can only reach that very
process, whatever happens to the PID number), then its identity recorded at observation time
(start ticks since boot, cmdline, uid) is re-read and compared exactly. Start ticks, not wall
time: an NTP step between scan and kill changes every wall-clock start time, never the ticks.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable

from hydra_watchdog.actions import ActionResult, KillOrphan, ResultStatus
from hydra_watchdog.config import OrphansSection
from hydra_watchdog.printable import one_line
from hydra_watchdog.probes.identity import own_pid_namespace, read_identity
from hydra_watchdog.probes.procs import in_unit

_KILL_WAIT = 5.0  # after SIGKILL: the kernel frees it promptly unless it is stuck in D state


def _gone(pidfd: int, timeout: float) -> bool:
    """Whether the pinned process has exited (a pidfd turns readable on exit), within
    `timeout` seconds. A zombie has exited and freed its memory and sockets already."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


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
    pid = action.pid
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return result(
            ResultStatus.REFUSED, f"pid {pid} is gone; nothing to kill", "identity_changed"
        )
    except OSError as exc:
        return result(ResultStatus.FAILED, f"cannot pin pid {pid}: {exc}", "no_permission")
    try:
        return _kill_pinned(action, config, unit, pidfd, result)
    finally:
        os.close(pidfd)


def _kill_pinned(
    action: KillOrphan,
    config: OrphansSection,
    unit: str,
    pidfd: int,
    result: Callable[..., ActionResult],
) -> ActionResult:
    pid = action.pid
    now = read_identity(pid)
    if now is None:
        if _gone(pidfd, 0):
            return result(ResultStatus.OK, f"pid {pid} had already exited")
        return result(ResultStatus.FAILED, f"cannot inspect pid {pid}", "no_permission")
    if (now.start_ticks, now.cmdline, now.uid) != (action.start_ticks, action.cmdline, action.uid):
        return result(
            ResultStatus.REFUSED,
            f"pid {pid} is now another process (start ticks {now.start_ticks} vs "
            f"{action.start_ticks}, uid {now.uid} vs {action.uid}, cmdline "
            f"{one_line(now.command, 80)!r}); not signalled",
            "identity_changed",
        )
    ns = own_pid_namespace()
    if ns is None or now.pid_ns != ns:
        return result(
            ResultStatus.REFUSED,
            f"pid {pid} lives in another PID namespace (a container?); not signalled",
            "identity_changed",
        )
    if in_unit(pid, unit) is not False:
        return result(
            ResultStatus.REFUSED,
            f"pid {pid} is (or may be) in {unit}'s cgroup now; not signalled",
            "in_unit",
        )
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if _gone(pidfd, config.term_grace):
            return result(ResultStatus.OK, f"pid {pid} exited after SIGTERM")
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return result(ResultStatus.OK, f"pid {pid} exited after SIGTERM")
    except PermissionError as exc:
        return result(
            ResultStatus.FAILED, f"not allowed to signal pid {pid}: {exc}", "no_permission"
        )
    if _gone(pidfd, _KILL_WAIT):
        return result(
            ResultStatus.OK,
            f"pid {pid} ignored SIGTERM for {config.term_grace:g}s; killed with SIGKILL",
        )
    return result(
        ResultStatus.FAILED,
        f"pid {pid} survived SIGKILL for {_KILL_WAIT:g}s (uninterruptible sleep?)",
        "unkillable",
    )

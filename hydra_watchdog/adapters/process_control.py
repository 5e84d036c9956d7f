"""Processes as the actuators see them: read one's identity, pin it with a pidfd, signal it.

An adapter (interfaces.ProcessControl): the I/O only. What to compare and when to refuse stays
with the actuators (act/orphans.py, act/gpu_reset.py); what identity means stays in
adapters/identity.py.

A pidfd pins the very process it was opened for: a signal sent through it can never reach a
process that reused the PID number, and it turns readable when that process exits (a zombie
counts as exited: its memory and sockets are freed already).
"""

from __future__ import annotations

import os
import select
import signal

from hydra_watchdog.adapters.identity import ProcIdentity, own_pid_namespace, read_identity
from hydra_watchdog.adapters.procs import in_unit
from hydra_watchdog.config import resolve_uid
from hydra_watchdog.interfaces import Delivery, PinFailure


class _Pinned:
    """interfaces.PinnedProcess over an open pidfd; close() releases it."""

    def __init__(self, pid: int, pidfd: int, proc_root: str) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._proc_root = proc_root

    def identity(self) -> ProcIdentity | None:
        return read_identity(self.pid, self._proc_root)

    def exited(self, timeout: float) -> bool:
        # The pinning pidfd, not psutil's Process.wait(): that one opens a pidfd of its own when
        # called (a PID reused since the pin would be waited on) and takes a zombie that is not
        # our child for alive (measured: TimeoutExpired after the full 1 s; this poll: at once).
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def signal(self, sig: signal.Signals) -> tuple[Delivery, str]:
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return Delivery.GONE, ""
        except PermissionError as exc:
            return Delivery.DENIED, str(exc)
        return Delivery.SENT, ""

    def close(self) -> None:
        os.close(self._pidfd)


class PidfdControl:
    """interfaces.ProcessControl over /proc (`proc_root`) and pidfds. Holds nothing open."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self._proc_root = proc_root

    def identity(self, pid: int) -> ProcIdentity | None:
        return read_identity(pid, self._proc_root)

    def in_unit(self, pid: int, unit: str) -> bool | None:
        return in_unit(pid, unit, self._proc_root)

    def own_pid_namespace(self) -> str | None:
        return own_pid_namespace()

    def resolve_uid(self, user: str) -> int | None:
        return resolve_uid(user)

    def pin(self, pid: int) -> _Pinned | PinFailure:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return PinFailure(gone=True, detail=f"pid {pid} is gone")
        except OSError as exc:
            return PinFailure(gone=False, detail=f"cannot pin pid {pid}: {exc}")
        return _Pinned(pid, pidfd, self._proc_root)

    def close(self) -> None:
        """Nothing to release: every pin is closed by its user."""

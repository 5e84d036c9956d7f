"""`nvidia-smi --gpu-reset`: the runbook's last resort in full recovery.

A reset tears down every context on the card, so it is refused unless `gpu_reset.enabled` and
nothing but TabbyAPI's own processes uses the GPU. That is re-checked through NVML right before
the reset, not taken from the (seconds old) observation: a job started meanwhile must not lose
its work. The decisions are made here; the GPU, /proc and the command are adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from hydra_watchdog.actions import ActionResult, ResetGpu, ResultStatus
from hydra_watchdog.adapters.identity import is_tabby_program
from hydra_watchdog.config import GpuDevice
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import GpuAdapter, GpuResetter, ProcessControl
from hydra_watchdog.printable import one_line

# A reset normally takes seconds; a wedged driver must not hang the loop: this stays below the
# unit's WatchdogSec (90 s) minus a ping interval.
RESET_TIMEOUT = 40.0


def _foreign_users(
    gpu: GpuAdapter,
    processes: ProcessControl,
    index: int,
    install_dirs: Sequence[str],
    user: str,
    unit: str,
) -> tuple[list[str], str | None]:
    """(descriptions of non-TabbyAPI GPU users, or why we could not tell). TabbyAPI's: in a
    cgroup named after the unit, or its program from the install tree run as TabbyAPI's user
    (identity.py); a command line that merely mentions the install tree is someone else's."""
    report = gpu.read((GpuDevice(index=index),))
    if report.error is not None:
        return [], f"cannot read gpu{index}: {report.error.value} {report.detail}".strip()
    snap = next((d for d in report.devices if d.index == index), None)
    if snap is None:
        return [], f"gpu{index} not found"
    if any(what == "processes" for what, _ in snap.errors):
        return [], f"cannot list the processes on gpu{index}"
    uid = processes.resolve_uid(user)
    foreign: list[str] = []
    for gp in snap.processes:
        ident = processes.identity(gp.pid)
        if ident is None:
            if processes.in_unit(gp.pid, unit) is None:
                continue  # exited since NVML listed it: its context is gone with it
            foreign.append(f"{gp.pid} (unreadable)")
            continue
        ours = processes.in_unit(gp.pid, unit) or (
            ident.uid == uid and is_tabby_program(ident, install_dirs)
        )
        if not ours:
            foreign.append(f"{gp.pid} ({one_line(ident.command, 60)})")
    return foreign, None


def reset_gpu(
    action: ResetGpu,
    *,
    enabled: bool,
    gpu: GpuAdapter,
    processes: ProcessControl,
    resetter: GpuResetter,
    install_dirs: Sequence[str],
    user: str,
    unit: str,
    timeout: float = RESET_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
) -> ActionResult:
    """Run the reset (bounded) when it is safe; REFUSED otherwise."""

    def result(status: ResultStatus, detail: str, kind: ErrorKind = ErrorKind.NONE) -> ActionResult:
        return ActionResult(action, status, detail, clock(), kind)

    if not enabled:
        return result(
            ResultStatus.REFUSED, "GPU reset is disabled (gpu_reset.enabled)", ErrorKind.DISABLED
        )
    foreign, unknown = _foreign_users(gpu, processes, action.gpu_index, install_dirs, user, unit)
    if unknown is not None:
        return result(
            ResultStatus.REFUSED, f"{unknown}; not resetting blind", ErrorKind.CANNOT_VERIFY
        )
    if foreign:
        return result(
            ResultStatus.REFUSED,
            f"gpu{action.gpu_index} is in use by non-TabbyAPI processes: {', '.join(foreign)}",
            ErrorKind.FOREIGN_GPU_USER,
        )
    done = resetter.reset(action.gpu_index, timeout)
    if not done.ok:
        return result(ResultStatus.FAILED, done.detail, done.error)
    return result(ResultStatus.OK, done.detail)

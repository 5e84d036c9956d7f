"""Set a GPU's power limit through the GpuAdapter (NVML); the result says why it did not work."""

from __future__ import annotations

import time
from collections.abc import Callable

from hydra_watchdog.actions import ActionResult, ResultStatus, SetPowerLimit
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import GpuAdapter
from hydra_watchdog.observation import NvmlErrorKind


def set_power_limit(
    action: SetPowerLimit, gpu: GpuAdapter, *, clock: Callable[[], float] = time.monotonic
) -> ActionResult:
    """OK with the applied (read-back) limit; otherwise FAILED carrying the NVML error kind
    (`no_permission` needs root or CAP_SYS_ADMIN: the policy reports it once, never retries)."""
    outcome = gpu.set_power_limit(action.gpu_index, action.watts)
    if outcome.ok:
        applied = f"{outcome.applied_w:g} W" if outcome.applied_w is not None else "unread"
        detail = outcome.detail or f"gpu{action.gpu_index} power limit now {applied}"
        return ActionResult(action, ResultStatus.OK, detail, clock())
    kind = ErrorKind((outcome.error or NvmlErrorKind.OTHER).value)
    detail = outcome.detail or f"setting gpu{action.gpu_index} to {action.watts:g} W: {kind}"
    return ActionResult(action, ResultStatus.FAILED, detail, clock(), kind)

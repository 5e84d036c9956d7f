"""start / stop / restart / reset-failed TabbyAPI's unit through the UnitManager adapter."""

from __future__ import annotations

import time
from collections.abc import Callable

from hydra_watchdog.actions import ActionResult, ResultStatus, UnitCommand
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import UnitManager


def run_unit_command(
    action: UnitCommand,
    units: UnitManager,
    configured_unit: str,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> ActionResult:
    """OK, FAILED (systemctl said no: detail says why) or REFUSED (no systemd here, or a unit the
    watchdog was not configured to manage)."""
    if action.unit != configured_unit:
        return ActionResult(
            action,
            ResultStatus.REFUSED,
            f"{action.unit} is not the configured unit {configured_unit}; not touched",
            clock(),
            ErrorKind.WRONG_UNIT,
        )
    outcome = units.command(action.verb)
    if outcome.refused:
        status, kind = ResultStatus.REFUSED, ErrorKind.UNAVAILABLE
    elif outcome.ok:
        status, kind = ResultStatus.OK, ErrorKind.NONE
    else:
        status, kind = ResultStatus.FAILED, ErrorKind.COMMAND_FAILED
    return ActionResult(action, status, outcome.detail, clock(), kind)

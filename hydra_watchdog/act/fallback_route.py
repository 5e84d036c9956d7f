"""The runbook's LiteLLM fallback-route check: does the proxy still answer for the model?"""

from __future__ import annotations

import time
from collections.abc import Callable

from hydra_watchdog.actions import ActionResult, CheckFallbackRoute, ResultStatus
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import FallbackRoute
from hydra_watchdog.observation import Outcome


def check_fallback_route(
    action: CheckFallbackRoute,
    route: FallbackRoute,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> ActionResult:
    result = route.check(action.url, action.model, timeout)
    if result.outcome is Outcome.OK:
        detail = f"fallback route answered in {result.latency_s * 1000:.0f} ms"
        return ActionResult(action, ResultStatus.OK, detail, clock())
    detail = result.detail or f"fallback route: {result.outcome.value}"
    kind = ErrorKind(result.outcome.value)  # Outcome's values are ErrorKinds (errors.py)
    return ActionResult(action, ResultStatus.FAILED, detail, clock(), kind)

"""Runs one decision's actions, in order, and says what came of each.

Rules every action goes through here, so no actuator has to remember them:
- dry run: nothing is executed; each action gets DRY_RUN "would …", which counts as success so
  the policy decides exactly as in a real run;
- skip after failure: actions of one decision depend on their predecessors (stop, then kill the
  orphans, then start), so once one fails or is refused, the rest are SKIPPED;
- no exception escapes: an actuator that raises yields a FAILED result, and the loop goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from hydra_watchdog.act.fallback_route import check_fallback_route
from hydra_watchdog.act.gpu_reset import reset_gpu
from hydra_watchdog.act.load import ModelLoader
from hydra_watchdog.act.orphans import kill_orphan
from hydra_watchdog.act.power import set_power_limit
from hydra_watchdog.act.unit import run_unit_command
from hydra_watchdog.actions import (
    Action,
    ActionResult,
    CheckFallbackRoute,
    KillOrphan,
    LoadModel,
    ResetGpu,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    describe,
)
from hydra_watchdog.config import Config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.interfaces import Adapters
from hydra_watchdog.observation import LoadProgress

_CONTINUE = (ResultStatus.OK, ResultStatus.DRY_RUN, ResultStatus.IN_PROGRESS)


class Executor:
    def __init__(
        self,
        config: Config,
        adapters: Adapters,
        *,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        loader: ModelLoader | None = None,
    ) -> None:
        """`loader`: the previous executor's (a reload), so that a load in flight finishes on
        the adapter it began with and its result still reaches drain(); the next load uses
        the new adapter."""
        self.config = config
        self.adapters = adapters
        self.dry_run = dry_run
        self._clock = clock
        if loader is None:
            loader = ModelLoader(adapters.tabby, config.model.load_timeout, clock=clock)
        else:
            loader.tabby = adapters.tabby
            loader.load_timeout = config.model.load_timeout
        self.loader = loader

    def run(
        self, actions: Sequence[Action], between: Callable[[], None] = lambda: None
    ) -> tuple[ActionResult, ...]:
        """Runs a decision's actions in order; `between` is called before each one (the daemon
        pings systemd's watchdog there: a full recovery can outlast one WatchdogSec)."""
        results: list[ActionResult] = []
        failed: ActionResult | None = None
        for action in actions:
            if failed is not None:
                results.append(
                    ActionResult(
                        action,
                        ResultStatus.SKIPPED,
                        f"skipped: '{describe(failed.action)}' did not succeed ({failed.status})",
                        self._clock(),
                        ErrorKind.SKIPPED,
                    )
                )
                continue
            between()
            result = self.run_one(action)
            results.append(result)
            if result.status not in _CONTINUE:
                failed = result
        return tuple(results)

    def run_one(self, action: Action) -> ActionResult:
        if self.dry_run:
            return ActionResult(
                action, ResultStatus.DRY_RUN, f"would {describe(action)}", self._clock()
            )
        try:
            return self._dispatch(action)
        except Exception as exc:  # a bug in one actuator must not take the loop down
            return ActionResult(
                action,
                ResultStatus.FAILED,
                f"{describe(action)} crashed: {type(exc).__name__}: {exc}",
                self._clock(),
                ErrorKind.EXCEPTION,
            )

    def _dispatch(self, action: Action) -> ActionResult:
        cfg, clock, a = self.config, self._clock, self.adapters
        match action:
            case SetPowerLimit():
                return set_power_limit(action, a.gpu, clock=clock)
            case KillOrphan():
                return kill_orphan(
                    action, cfg.orphans, unit=cfg.tabbyapi.unit, processes=a.processes, clock=clock
                )
            case UnitCommand():
                return run_unit_command(action, a.units, cfg.tabbyapi.unit, clock=clock)
            case LoadModel():
                return self.loader.start(action)
            case ResetGpu():
                return reset_gpu(
                    action,
                    enabled=cfg.gpu_reset.enabled,
                    gpu=a.gpu,
                    processes=a.processes,
                    resetter=a.reset,
                    install_dirs=cfg.tabbyapi.cmdline_patterns,
                    user=cfg.tabbyapi.user,
                    unit=cfg.tabbyapi.unit,
                    clock=clock,
                )
            case CheckFallbackRoute():
                return check_fallback_route(
                    action, a.fallback, cfg.fallback_route.timeout, clock=clock
                )
        raise AssertionError(f"unknown action {action!r}")  # pragma: no cover

    def load_progress(self) -> LoadProgress | None:
        return self.loader.progress()

    def drain(self) -> tuple[ActionResult, ...]:
        """Long actions (model loads) that finished since the last call."""
        return self.loader.drain()

    def shutdown(self, wait: float = 10.0) -> bool:
        """The watchdog stops: a load in a helper goes on; one in a thread is cancelled cleanly
        (the adapter closes the stream itself)."""
        return self.loader.shutdown(wait)

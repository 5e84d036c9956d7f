"""What one cycle knows, and the facts the runbook's rules are written in.

`Situation` is frozen: the policy's memory after absorbing results and tracking health, this
cycle's observation, the time, the config, and what diagnose found. Its properties are the
vocabulary of `policy.PLAN` and `findings.FINDERS` ("the unit is up", "an orphan holds the
port", "a restart loop"), each computed in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from hydra_watchdog.actions import Action
from hydra_watchdog.config import Config
from hydra_watchdog.observation import (
    ActiveState,
    Observation,
    Outcome,
    ProcessInfo,
    ProcessRole,
    UnitStatus,
)
from hydra_watchdog.policy_state import Finding, PolicyState
from hydra_watchdog.states import Rule

# Causes a restart cannot fix and would only turn into a loop (or a port-hopping storm).
BLOCKING_RULES = frozenset({Rule.FOREIGN_HOLDER, Rule.MISSING_LIBRARIES, Rule.UNKILLABLE_ORPHAN})
# Cycles that asked for the library check and got none (the host check hangs) before a start
# goes ahead without it: a check that cannot run never blocks recovery for ever.
LIBRARY_CHECK_TRIES = 3


def library_check_due(s: PolicyState, cfg: Config) -> bool:
    """A venv is configured and no library check ran in this episode of trouble (or ever):
    a (re)start waits for one."""
    checked, since = s.libraries_checked_at, s.trouble_since
    return bool(cfg.tabbyapi.venv) and (checked is None or (since is not None and checked < since))


def unit_up(unit: UnitStatus) -> bool:
    """A process is (being) run: active, or activating other than waiting to auto-restart."""
    if unit.active_state in (ActiveState.ACTIVE, ActiveState.RELOADING):
        return True
    return unit.active_state == ActiveState.ACTIVATING and unit.sub_state != "auto-restart"


def tabby_runs(obs: Observation) -> bool:
    """TabbyAPI's process runs: the unit is up (or, with no unit to ask, something answered
    HTTP on its port; the client only trusts a listener verified as TabbyAPI's)."""
    unit = obs.unit
    if unit.available and unit.exists:
        return unit_up(unit)
    return obs.health.result.outcome in (Outcome.OK, Outcome.HTTP_ERROR)


def auto_restarting(unit: UnitStatus) -> bool:
    return unit.sub_state == "auto-restart"


def in_unit(p: ProcessInfo) -> bool:
    return p.role in (ProcessRole.MAIN, ProcessRole.UNIT)


def listeners(obs: Observation, port: int) -> list[ProcessInfo | None]:
    if obs.port is None:
        return []
    return [None if pid is None else obs.process(pid) for pid in obs.port.owners(port)]


def port_holders(obs: Observation, port: int) -> list[ProcessInfo | None]:
    """Listeners on `port` that are not TabbyAPI's unit (None: owner unknown)."""
    return [p for p in listeners(obs, port) if p is None or not in_unit(p)]


def orphans_in_the_way(obs: Observation) -> list[ProcessInfo]:
    """Orphans provably harmful: holding our port (or port+1) or GPU memory. Without systemd to
    say which processes are the unit's, "outside the unit" is a guess: then there are none."""
    if not obs.unit.available:
        return []
    return [
        p
        for p in obs.processes
        if p.role is ProcessRole.ORPHAN and (p.listens_on or p.gpu_bytes > 0)
    ]


def tabby_process(obs: Observation) -> str:
    """TabbyAPI's process as "pid@start ticks" ("" : none seen): the unit's main process, or
    where there is no unit to ask, the listener on its port (or port+1) that runs TabbyAPI's
    program as its user (the scanner's ORPHAN: outside any unit; never another user's)."""
    unit = obs.unit
    roles = (ProcessRole.MAIN,) if unit.available and unit.exists else (ProcessRole.ORPHAN,)
    found = [p for p in obs.processes if p.role in roles and (p.listens_on or in_unit(p))]
    if not found:
        return ""
    first = min(found, key=lambda p: (min(p.listens_on, default=0), p.pid))
    return f"{first.pid}@{first.start_ticks}"


def process_replaced(s: PolicyState, obs: Observation) -> bool:
    """A new TabbyAPI process since the one last seen: systemd's InvocationID changed or, where
    that says nothing (no systemd, TabbyAPI started by hand), its process did (pid and start
    ticks). Not knowing now (systemd unreachable, nothing listening) is no change."""
    invocation = obs.unit.invocation_id
    if s.invocation_id and invocation and invocation != s.invocation_id:
        return True
    process = tabby_process(obs)
    return bool(s.tabby_process) and bool(process) and process != s.tabby_process


def key_refused(s: PolicyState, obs: Observation) -> bool:
    """TabbyAPI refused a load with the admin key held now: no load goes out until it changes
    (its file is read again when it does: adapters/admin_key.py)."""
    if s.key_refused is None:
        return False
    return obs.admin_key is None or obs.admin_key.stamp == s.key_refused


def canary_impossible(obs: Observation, cfg: Config) -> bool:
    """No canary can be sent: no model is configured (model.name is empty: the watchdog only
    watches) and TabbyAPI says none is loaded (the canary goes only to a loaded model)."""
    model = obs.model
    return not cfg.model.name and model is not None and model.known and model.loaded is None


def start_reference(s: PolicyState, obs: Observation) -> float | None:
    stamps = [t for t in (s.recovery_started, obs.unit.active_enter_mono) if t is not None]
    return max(stamps) if stamps else None


def starting(s: PolicyState, obs: Observation, now: float, cfg: Config) -> bool:
    """TabbyAPI loads its startup model before it opens the port: refused connections from a
    unit that (re)started less than startup_grace ago mean "starting", not "down"."""
    if obs.health.result.outcome is not Outcome.REFUSED:
        return False
    if obs.unit.available and not unit_up(obs.unit):
        return False
    started = start_reference(s, obs)
    return started is not None and now - started < cfg.tabbyapi.startup_grace


@dataclass(frozen=True)
class Situation:
    s: PolicyState
    obs: Observation
    now: float
    cfg: Config
    findings: tuple[Finding, ...]
    cleanup: tuple[Action, ...]  # orphan kills that go ahead of whatever the plan does

    @property
    def unit(self) -> UnitStatus:
        return self.obs.unit

    @property
    def healthy(self) -> bool:
        return self.obs.health.healthy

    @cached_property
    def unit_up(self) -> bool:
        return unit_up(self.obs.unit)

    @cached_property
    def unit_down(self) -> bool:
        """systemd says no TabbyAPI process runs (unknowable without systemd: False)."""
        return self.obs.unit.available and not self.unit_up

    @cached_property
    def starting(self) -> bool:
        return starting(self.s, self.obs, self.now, self.cfg)

    @cached_property
    def holders(self) -> list[ProcessInfo | None]:
        return port_holders(self.obs, self.cfg.tabbyapi.port)

    @cached_property
    def foreign_on_port(self) -> bool:
        return any(p is not None and p.role is ProcessRole.FOREIGN for p in self.holders)

    @cached_property
    def orphans_on_port(self) -> list[ProcessInfo]:
        if not self.obs.unit.available:
            return []
        return [p for p in self.holders if p is not None and p.role is ProcessRole.ORPHAN]

    @cached_property
    def orphans_in_the_way(self) -> list[ProcessInfo]:
        """Those a kill can remove: one that survived SIGKILL is not tried again."""
        return [p for p in orphans_in_the_way(self.obs) if p.pid not in self.s.unkillable]

    @cached_property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.rule in BLOCKING_RULES]

    @cached_property
    def will_fail(self) -> tuple[str, ...]:
        """Libraries a restart would miss while the running TabbyAPI still has them."""
        return self.s.will_fail if tabby_runs(self.obs) else ()

    @cached_property
    def in_restart_loop(self) -> bool:
        """More than max_restarts restarts of any origin within the window."""
        r = self.cfg.restart_loop
        return self.s.restarts_in_window(self.now, r.window) > r.max_restarts

    @cached_property
    def budget_left(self) -> bool:
        """The (re)starts the watchdog issued within the window, whether or not they ran (a
        start that keeps failing is not hammered), stay below max_restarts."""
        r = self.cfg.restart_loop
        issued = sum(1 for at in self.s.start_attempts if self.now - at < r.window)
        return issued < r.max_restarts

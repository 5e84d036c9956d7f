"""What happened this cycle, told as events: a pure function of before, after and the results.

Events are for humans reading the journal and `hydra-watchdog events`, so they are edge-triggered:
a finding is told when it appears, not every cycle it persists; load progress in coarse steps
(every 25%); a phase change once. Every action result is told, with its rule and evidence.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from hydra_watchdog.actions import (
    Action,
    ActionResult,
    KillOrphan,
    LoadModel,
    ResetGpu,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
    action_name,
    describe,
)
from hydra_watchdog.config import Config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.findings import dur
from hydra_watchdog.observation import LoadProgress, Observation
from hydra_watchdog.policy_state import Finding, PolicyState
from hydra_watchdog.printable import cut
from hydra_watchdog.rebuild import checks_after_switch, switch_label
from hydra_watchdog.states import Phase, Rule, Severity, Verdict

PROGRESS_STEP = 25  # percent

_BY_VERDICT = {
    Verdict.OK: Severity.NOTICE,
    Verdict.WARNING: Severity.WARNING,
    Verdict.CRITICAL: Severity.ERR,
    Verdict.UNKNOWN: Severity.NOTICE,
}
# Leaving one of these for HEALTHY is a recovery worth its own record.
_TROUBLE = frozenset(
    {
        Phase.DOWN,
        Phase.RECOVERING,
        Phase.BACKOFF,
        Phase.ESCALATED,
        Phase.BLOCKED,
        Phase.NO_MODEL,
        Phase.LOADING,
    }
)


def _action_fields(action: Action) -> tuple[tuple[str, str], ...]:
    match action:
        case KillOrphan(pid=pid):
            return (("TARGET_PID", str(pid)),)
        case SetPowerLimit(gpu_index=i, watts=w):
            return (("GPU_INDEX", str(i)), ("HYDRA_WATTS", f"{w:g}"))
        case ResetGpu(gpu_index=i):
            return (("GPU_INDEX", str(i)),)
        case LoadModel(model=model):
            return (("HYDRA_MODEL", model),)
        case UnitCommand(verb=verb):
            return (("HYDRA_VERB", verb.value),)
    return ()


def _about_unit(action: Action) -> bool:
    return isinstance(action, UnitCommand | KillOrphan | LoadModel)


def _result_event(result: ActionResult, phase: Phase, unit: str, wall: float) -> Event:
    action, status = result.action, result.status
    what = describe(action)
    if status in (ResultStatus.OK, ResultStatus.DRY_RUN):
        kind, severity = EventKind.ACTION, Severity.NOTICE
        message = result.detail if status is ResultStatus.DRY_RUN else f"{what}: {result.detail}"
    elif status is ResultStatus.IN_PROGRESS:
        kind, severity, message = EventKind.ACTION, Severity.INFO, f"{what}: started"
    elif status is ResultStatus.FAILED:
        kind, severity, message = EventKind.ACTION_FAILED, Severity.ERR, f"{what} failed: "
        message += result.detail
    elif status is ResultStatus.REFUSED:
        kind, severity, message = EventKind.ACTION_REFUSED, Severity.WARNING, f"{what} refused: "
        message += result.detail
    else:  # SKIPPED: not attempted because an earlier action of the decision did not succeed
        kind, severity, message = EventKind.ACTION_REFUSED, Severity.NOTICE, f"{what}: "
        message += result.detail
    fields = (*_action_fields(action), ("HYDRA_RESULT", status.value))
    if result.error_kind is not ErrorKind.NONE:
        fields += (("HYDRA_ERROR_KIND", result.error_kind.value),)
    return Event(
        wall=wall,
        kind=kind,
        severity=severity,
        message=message,
        state=phase,
        rule=action.reason.rule,
        action=action_name(action),
        reason=action.reason.evidence,
        unit=unit if _about_unit(action) else "",
        fields=fields,
    )


def _fresh_findings(old: Sequence[Finding], new: Sequence[Finding]) -> list[Finding]:
    """The findings that are news: a cause (`Finding.key`) at a severity that the previous
    cycle did not have. A message with new numbers ("next start attempt in 598s") is the same
    finding; gpu1's finding beside gpu0's is another (a multiset match on the keys)."""
    seen = Counter((f.key, f.severity) for f in old)
    fresh = []
    for f in new:
        if seen[(f.key, f.severity)] > 0:
            seen[(f.key, f.severity)] -= 1
        else:
            fresh.append(f)
    return fresh


def _percent(load: LoadProgress | None) -> int:
    if load is None or load.modules <= 0:
        return 0
    return min(100, load.module * 100 // load.modules)


def narrate(
    prev: PolicyState,
    new: PolicyState,
    actions: Sequence[Action],
    results: Sequence[ActionResult],
    obs: Observation,
    *,
    config: Config,
    wall: float | None = None,
    prev_load: LoadProgress | None = None,
) -> tuple[Event, ...]:
    """The events of one cycle, in the order they happened: new findings, the phase change (and
    what it means: paused, restart loop, recovered, escalated), load progress, then one event per
    action result. `actions` (the decision) name the rule of a phase change that has no finding;
    `prev_load` is the previous cycle's Observation.load, for the progress steps."""
    wall = time.time() if wall is None else wall
    tabby_unit = config.tabbyapi.unit
    phase = new.phase
    events: list[Event] = []

    def add(
        kind: EventKind,
        severity: Severity,
        message: str,
        *,
        rule: Rule | None,
        reason: str = "",
        unit: str = "",
        fields: tuple[tuple[str, str], ...] = (),
    ) -> None:
        events.append(Event(wall, kind, severity, message, phase, rule, "", reason, unit, fields))

    switch = new.last_switch
    if switch is not None and switch != prev.last_switch:
        found = checks_after_switch(new, obs)
        generation = switch.to_generation
        add(
            EventKind.SYSTEM_SWITCHED,
            Severity.WARNING if new.will_fail else Severity.NOTICE,
            f"NixOS system switched {switch_label(switch)}: {found}",
            rule=Rule.SYSTEM_SWITCHED,
            reason=found,
            fields=(
                ("HYDRA_SYSTEM_FROM", switch.from_target),
                ("HYDRA_SYSTEM_TO", switch.to_target),
                *((("HYDRA_GENERATION", str(generation)),) if generation is not None else ()),
            ),
        )

    fresh = _fresh_findings(prev.findings, new.findings)
    for finding in fresh:
        add(
            _FINDING_KINDS.get(finding.key, EventKind.DIAGNOSIS),
            finding.severity,
            finding.message,
            rule=finding.rule,
            reason=finding.message,
            unit=tabby_unit,
        )

    # A NixOS switch shortly before the outage: said in the loop and escalation records too.
    changed = next((f.message for f in new.findings if f.rule is Rule.SYSTEM_SWITCHED), "")
    also = f"; {changed}" if changed else ""
    # A phase change is told with what the deciding rule rests on (PolicyState.cause), never
    # with whatever finding happens to come first.
    cited = next((f for f in new.findings if f.message == new.cause), None)
    acted = next((a for a in actions if a.reason.evidence == new.cause), None)
    rule: Rule | None = (
        cited.rule
        if cited
        else acted.reason.rule
        if acted
        else actions[0].reason.rule
        if actions
        else None
    )
    evidence = new.cause or new.last_failure or ""
    if prev.phase != new.phase:
        change = f"{prev.phase.value} -> {new.phase.value}"
        add(
            EventKind.STATE_CHANGED,
            _BY_VERDICT[new.phase.verdict],
            f"{change}: {evidence}" if evidence else change,
            rule=rule,
            reason=evidence,
            unit=tabby_unit,
            fields=(("HYDRA_PREV_STATE", prev.phase.value),),
        )
        if new.phase is Phase.PAUSED:
            why = obs.pause.reason if obs.pause else ""
            add(
                EventKind.PAUSED,
                Severity.NOTICE,
                f"paused: {why}" if why else "paused",
                rule=Rule.PAUSED,
                reason=why,
            )
        elif prev.phase is Phase.PAUSED:
            add(
                EventKind.RESUMED,
                Severity.NOTICE,
                f"resumed; now {new.phase.value}",
                rule=Rule.PAUSED,
            )
        if new.backoff_step > prev.backoff_step:
            window = config.restart_loop.window
            add(
                EventKind.RESTART_LOOP,
                Severity.CRIT,
                f"restart loop: {new.restarts_in_window(obs.at, window)} restarts within "
                f"{window:g}s; {_stop_told(results)}, back-off step {new.backoff_step}{also}",
                rule=Rule.RESTART_LOOP,
                reason=evidence,
                unit=tabby_unit,
            )
        if new.phase is Phase.HEALTHY and (
            prev.phase in _TROUBLE
            or (prev.phase is Phase.STARTING and prev.recovery_started is not None)
        ):
            add(
                EventKind.RECOVERED,
                Severity.NOTICE,
                f"recovered: healthy again after {prev.phase.value}",
                rule=Rule.RECOVERED,
                unit=tabby_unit,
            )
    if new.escalated and not prev.escalated:  # once per escalation, not per back-off step
        add(
            EventKind.ESCALATED,
            Severity.CRIT,
            f"escalated: unresolved for over {config.restart_loop.escalate_after:g}s; "
            f"a human is needed{also}",
            rule=Rule.ESCALATION,
            reason=evidence,
            unit=tabby_unit,
        )

    load = obs.load
    if load is not None and load.modules > 0:
        before = _percent(prev_load) if prev_load and prev_load.model == load.model else -1
        now_pct = _percent(load)
        if now_pct // PROGRESS_STEP > before // PROGRESS_STEP:
            add(
                EventKind.LOAD_PROGRESS,
                Severity.INFO,
                f"loading {load.model}: {now_pct}% ({load.module}/{load.modules} modules)",
                rule=Rule.NO_MODEL,
                unit=tabby_unit,
                fields=(("HYDRA_MODEL", load.model), ("HYDRA_PROGRESS_PCT", str(now_pct))),
            )

    # A load ends cycles after it started: its outcome arrives with the observation.
    events.extend(_load_ends(obs, new, wall, tabby_unit))
    events.extend(_result_event(r, phase, tabby_unit, wall) for r in results)
    return tuple(events)


def _load_ends(obs: Observation, new: PolicyState, wall: float, unit: str) -> list[Event]:
    """One event per load that ended since the last cycle: loaded (with how long it took),
    failed or cancelled (with TabbyAPI's words)."""
    events = []
    for res in obs.results:
        if not isinstance(res.action, LoadModel):
            continue
        took = (
            (("HYDRA_DURATION_S", f"{res.duration_s:.1f}"),) if res.duration_s is not None else ()
        )
        model = (("HYDRA_MODEL", res.action.model),)
        if res.status is ResultStatus.FAILED:
            kind, severity, rule = EventKind.LOAD_FAILED, Severity.ERR, Rule.LOAD_FAILED
            message, reason = _load_failed_text(res, new, obs.at, wall), res.detail
            fields = (*model, ("HYDRA_ERROR_KIND", res.error_kind), *took)
        elif res.status is ResultStatus.OK and res.duration_s is not None:
            kind, severity, rule = EventKind.MODEL_LOADED, Severity.NOTICE, res.action.reason.rule
            message = f"loaded {res.action.model} in {dur(res.duration_s)}: {res.detail}"
            reason, fields = res.action.reason.evidence, (*model, *took)
        else:
            continue
        events.append(
            Event(wall, kind, severity, message, new.phase, rule, "", reason, unit, fields)
        )
    return events


# Findings with a journal catalog entry of their own (by Finding.key).
_FINDING_KINDS = {
    (Rule.ADMIN_KEY_REJECTED, ""): EventKind.ADMIN_KEY_REJECTED,
    (Rule.GENERATION_HANG, "canary"): EventKind.GENERATION_HANG,
}


def _stop_told(results: Sequence[ActionResult]) -> str:
    """What became of this cycle's stop, as it happened (not as it was planned)."""
    stops = [
        r for r in results if isinstance(r.action, UnitCommand) and r.action.verb is UnitVerb.STOP
    ]
    if not stops:
        return "the unit was not running"
    if stops[-1].status in (ResultStatus.OK, ResultStatus.DRY_RUN):
        return "unit stopped" if stops[-1].status is ResultStatus.OK else "unit would be stopped"
    return f"the stop did not happen ({stops[-1].status.value}: {cut(stops[-1].detail, 120)})"


def _load_failed_text(res: ActionResult, new: PolicyState, now: float, wall: float) -> str:
    action = res.action
    assert isinstance(action, LoadModel)
    after = f" after {dur(res.duration_s)}" if res.duration_s is not None else ""
    if res.error_kind == ErrorKind.CANCELLED:
        return f"load of {action.model} cancelled{after}: {res.detail}"
    if res.error_kind == ErrorKind.UNAUTHORIZED:
        return (
            f"load of {action.model} refused{after}: {res.detail}; no load is sent until the "
            "admin key changes"
        )
    if res.error_kind == ErrorKind.LOAD_PERMANENT:
        return f"load of {action.model} failed{after} and will not be retried as is: {res.detail}"
    nxt = ""
    if new.next_load_at is not None:
        at = time.strftime("%H:%M:%S", time.localtime(wall + new.next_load_at - now))
        nxt = f"; next attempt at {at}"
    return f"load of {action.model} failed{after} (attempt {new.load_failures}): {res.detail}{nxt}"

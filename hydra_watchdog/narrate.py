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
from hydra_watchdog.observation import LoadProgress, Observation, Outcome
from hydra_watchdog.policy import backoff_delay
from hydra_watchdog.policy_state import Finding, PolicyState
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


def _news(prev: PolicyState, new: PolicyState, *, looped: bool) -> tuple[list[Finding], str]:
    """The fresh findings to tell as records of their own, and the text of the one that the
    restart_loop record of this cycle says instead ("" : none)."""
    folded = ""
    # The previous cycle entered this back-off step: its record said the step and its delay.
    stepped = new.backoff_step == prev.backoff_step and any(
        f.key == _LOOP_STOPPED for f in prev.findings
    )
    news = []
    for finding in _fresh_findings(prev.findings, new.findings):
        if looped and finding.key == _LOOP_STOPPED:
            folded = finding.message  # the restart_loop record says it, with the stop as it
            continue  # happened
        if stepped and finding.key == _LOOP_WAITING:
            continue  # it stands for status; told, it would repeat the loop's record
        if finding in prev.down_told:
            continue  # told earlier in this outage, in the same words
        news.append(finding)
    return news, folded


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
    """The events of one cycle: the ends of loads, new findings, then the phase change, each
    record of evidence before the change it led to (the restart loop and the recovery in their
    own records), escalation, load progress, then one event per action result. Each text is
    said once: the state_changed line names the transition and its [rule] (_deciding), and its
    evidence only where no record of the cycle said it. `actions` (the decision) name the rule
    of a phase change that has no finding; `prev_load` is the previous cycle's
    Observation.load, for the progress steps."""
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

    # A load ends cycles after it started: its outcome arrives with the observation, and is
    # told before the change of phase it led to (loading -> recovering).
    events.extend(_load_ends(obs, new, wall, tabby_unit))

    changing = prev.phase != new.phase
    looped = changing and new.backoff_step > prev.backoff_step
    pausing = changing and new.phase is Phase.PAUSED
    news, folded = _news(prev, new, looped=looped)
    for finding in news:
        kind = _FINDING_KINDS.get(finding.key, EventKind.DIAGNOSIS)
        if pausing and finding.rule is Rule.PAUSED:
            kind = EventKind.PAUSED  # the pause's own record says its finding, once
        add(kind, finding.severity, finding.message, rule=finding.rule, reason=finding.message,
            unit=tabby_unit)  # fmt: skip

    # A NixOS switch shortly before the outage: said in the loop and escalation records too.
    changed = next((f.message for f in new.findings if f.rule is Rule.SYSTEM_SWITCHED), "")
    also = f"; {changed}" if changed else ""
    rule, evidence = _deciding(prev, new, actions, obs)
    if changing:
        # Said once: the records that state the evidence come first (the fresh finding, the
        # load's end, the loop, the recovery); the state_changed line after them names the
        # transition and the [rule] that decided it, and adds the evidence only when none of
        # this cycle's records said it. Every record keeps its journald fields (HYDRA_REASON).
        if looped:
            add(
                EventKind.RESTART_LOOP,
                Severity.CRIT,
                _loop_text(new, obs, config, results) + also,
                rule=Rule.RESTART_LOOP,
                reason=evidence,
                unit=tabby_unit,
            )
        if rule is Rule.RECOVERED:
            add(EventKind.RECOVERED, Severity.NOTICE, evidence, rule=rule, unit=tabby_unit)
        said = evidence == folded or any(evidence in e.message for e in events)
        change = f"{prev.phase.value} -> {new.phase.value}"
        add(
            EventKind.STATE_CHANGED,
            _BY_VERDICT[new.phase.verdict],
            f"{change}: {evidence}" if evidence and not said else change,
            rule=rule,
            reason=evidence,
            unit=tabby_unit,
            fields=(("HYDRA_PREV_STATE", prev.phase.value),),
        )
        if pausing and not any(e.kind is EventKind.PAUSED for e in events):
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
                "resumed: acts again",  # the state change above says the phase
                rule=Rule.PAUSED,
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


# The restart-loop finding of the cycle that stops the unit (findings.restart_loop): the loop's
# own record tells it then, so it is not told twice.
_LOOP_STOPPED = (Rule.RESTART_LOOP, "stopped")
# The wait of the step that finding entered (findings.backoff_waiting): the same step and delay.
_LOOP_WAITING = (Rule.RESTART_LOOP, "waiting")

# The runbook rule a phase stands for, for a change of phase that cites no finding and no
# action (policy.decide left `cause` empty): DOWN is TabbyAPIDown whichever PLAN rule entered it
# (_down, _systemd_restarting, _job_running...); STARTING and RECOVERING without a cause wait
# inside startup_grace (_starting, _job_running); BACKOFF is the restart loop's wait.
_PHASE_RULES = {
    Phase.DOWN: Rule.DOWN,
    Phase.STARTING: Rule.STARTING,
    Phase.RECOVERING: Rule.STARTING,
    Phase.BACKOFF: Rule.RESTART_LOOP,
    Phase.ESCALATED: Rule.ESCALATION,
    Phase.NO_MODEL: Rule.NO_MODEL,
    Phase.LOADING: Rule.NO_MODEL,
    Phase.PAUSED: Rule.PAUSED,
}


def _recovered(prev: PolicyState, new: PolicyState) -> bool:
    """Healthy again after trouble, or after a start the watchdog issued."""
    return new.phase is Phase.HEALTHY and (
        prev.phase in _TROUBLE
        or (prev.phase is Phase.STARTING and prev.recovery_started is not None)
    )


def _deciding(
    prev: PolicyState, new: PolicyState, actions: Sequence[Action], obs: Observation
) -> tuple[Rule | None, str]:
    """The rule that decided this cycle's phase, and the evidence it rests on. The policy's
    `cause` (a finding's text, or an action's evidence) names it when there is one; a change to
    healthy is the recovery (after trouble) or the clearing of the rule that held the phase
    before; otherwise the phase's own runbook rule (_PHASE_RULES)."""
    if _recovered(prev, new):
        took = dur(max(0.0, obs.at - prev.phase_since))
        return Rule.RECOVERED, f"healthy again after {took} in {prev.phase.value}: {_proof(obs)}"
    if new.cause:
        cited = next((f for f in new.findings if f.message == new.cause), None)
        if cited is not None:
            return cited.rule, new.cause
        acted = next((a for a in actions if a.reason.evidence == new.cause), None)
        if acted is not None:
            return acted.reason.rule, new.cause
    if new.phase is Phase.HEALTHY and prev.phase is not Phase.HEALTHY:
        held = next((f.rule for f in prev.findings if f.message == prev.cause), None)
        held = held or _PHASE_RULES.get(prev.phase)
        if held is not None:
            return held, f"cleared; {_health_said(obs)}"
    rule = _PHASE_RULES.get(new.phase) or (actions[0].reason.rule if actions else None)
    return rule, new.cause or new.last_failure


def _health_said(obs: Observation) -> str:
    r = obs.health.result
    return f"/health answered {r.status or r.outcome.value} in {r.latency_s * 1000:.0f} ms"


def _proof(obs: Observation) -> str:
    """What shows TabbyAPI serves this cycle: the canary that passed, else /health."""
    canary = obs.canary
    if canary is not None and canary.result.outcome is Outcome.OK:
        return f"a 1-token completion passed in {canary.result.latency_s * 1000:.0f} ms"
    return _health_said(obs)


def _loop_text(
    new: PolicyState, obs: Observation, config: Config, results: Sequence[ActionResult]
) -> str:
    """The restart loop as it stands after this cycle's actions: the count, the back-off, and
    the stop only where no action line tells it (the unit was not running)."""
    r = config.restart_loop
    step = new.backoff_step
    stops = [
        x for x in results if isinstance(x.action, UnitCommand) and x.action.verb is UnitVerb.STOP
    ]
    idle = "" if stops else "; the unit was not running"
    return (
        f"restart loop: {new.restarts_in_window(obs.at, r.window)} restarts within "
        f"{dur(r.window)} (max {r.max_restarts}){idle}; back-off step {step}, next start "
        f"attempt in {dur(backoff_delay(step, config))}"
    )


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

"""Incidents: the runbook's alerts as the watchdog lived them, one record per episode of trouble.

Pure, like the policy: `facts()` reads what one cycle produced (the policy state before and
after, the observation, the results) and `step()` folds those facts into a `Tracker`, the
incident memory that the daemon keeps in the state dir (report/incident_file.py). Times are wall
seconds, so that a record survives a restart of the watchdog and a reboot of the node alike.

An incident, in the order it is lived:

* **began**: the first observation that showed a symptom of it (a failed or slow /health, no
  model loaded), although the watchdog had not yet judged it; failures_before_down and
  slow_probes make judging take a few probes;
* **detected**: the first cycle whose phase is one of a runbook alert's (`alert_for`): down or
  recovering is TabbyAPIDown, back-off or escalated TabbyAPIRestartLoop, no model, loading or
  serving the fallback TabbyAPINoModel, degraded by slow probes TabbyAPISlowHealthCheck. An
  incident that grows (a crash that becomes a loop) takes the gravest alert it reached;
* **actions**: each action of the watchdog while it lasts, with its result (a model load's final
  result arrives cycles after its start, with the observation);
* **cause**: the most specific finding seen (a missing library rather than "restart loop");
* **human needed**: escalated, blocked, or a finding no restart can fix (a missing library, the
  models mount, a foreign holder of the port, a rejected admin key, an unkillable orphan);
* **recovered**: the first cycle in phase healthy again. After a restart that phase needs a
  passing canary (policy.py), whose time is kept as `canary_at`.

A closed incident counts once in hydra_watchdog_incidents_total{alert,outcome}: outcome
"recovered" when the watchdog alone brought TabbyAPI back, "human" when a human was needed (or
paused the watchdog) at some point of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from hydra_watchdog.actions import ActionResult, LoadModel, ResultStatus, action_name, describe
from hydra_watchdog.config import Config
from hydra_watchdog.observation import Observation, Outcome
from hydra_watchdog.policy_state import CanaryVerdict, Finding, PolicyState
from hydra_watchdog.printable import one_line
from hydra_watchdog.states import Phase, Rule, Severity

INCIDENTS_KEPT = 100  # closed incidents kept in the file, the newest
ACTIONS_KEPT = 40  # actions kept per incident, the latest (a long back-off makes many)
TEXT_LIMIT = 300  # characters of a cause or an action's detail


class AlertClass(StrEnum):
    """The runbook's alerts (prometheus/alerts.yml), gravest last."""

    SLOW_HEALTH = "TabbyAPISlowHealthCheck"
    NO_MODEL = "TabbyAPINoModel"
    DOWN = "TabbyAPIDown"
    RESTART_LOOP = "TabbyAPIRestartLoop"

    @property
    def rank(self) -> int:
        return list(AlertClass).index(self)


class IncidentOutcome(StrEnum):
    RECOVERED = "recovered"  # the watchdog alone brought TabbyAPI back
    HUMAN = "human"  # a human was needed at some point (or paused the watchdog)


# Findings that say what is wrong in general words, or what the watchdog waits for or cannot
# do (a canary awaited after a restart, this outage's library check, no systemd to ask); any
# other finding names a cause.
GENERIC_RULES = frozenset(
    {
        Rule.DOWN.value,
        Rule.STARTING.value,
        Rule.NO_MODEL.value,
        Rule.RESTART_LOOP.value,
        Rule.BACKOFF_ATTEMPT.value,
        Rule.BACKOFF_RESET.value,
        Rule.ESCALATION.value,
        Rule.RECOVERED.value,
        Rule.PAUSED.value,
        Rule.POWER_LIMIT.value,
        Rule.FALLBACK_ROUTE.value,
        Rule.CANARY_PENDING.value,
        Rule.LIBRARY_CHECK.value,
        Rule.SYSTEMD_UNAVAILABLE.value,
    }
)
# Causes that no restart, kill or load of the watchdog can fix.
HUMAN_RULES = frozenset(
    {
        Rule.MISSING_LIBRARIES,
        Rule.MODELS_MOUNT,
        Rule.FOREIGN_HOLDER,
        Rule.ADMIN_KEY_REJECTED,
        Rule.UNKILLABLE_ORPHAN,
        Rule.ESCALATION,
    }
)
_SEVERITY_RANK = {s: i for i, s in enumerate(reversed(Severity))}  # crit first


def names_a_cause(rule: str) -> bool:
    """Whether a finding of `rule` (a Rule value; a file may hold a name a newer or older
    watchdog used) names a cause rather than the symptom."""
    return bool(rule) and rule not in GENERIC_RULES


@dataclass(frozen=True)
class ActionNote:
    at: float  # wall time of the result
    action: str  # actions.action_name: restart_unit, load_model...
    result: str  # ResultStatus: ok, failed, refused, skipped, dry_run, in_progress
    detail: str  # what was done, and what came of it


@dataclass(frozen=True)
class Incident:
    number: int  # counts up over the node's life (kept in the file)
    alert: AlertClass
    began: float  # wall: the first symptom
    detected: float  # wall: the cycle that judged it
    actions: tuple[ActionNote, ...] = ()
    actions_dropped: int = 0  # older actions beyond ACTIONS_KEPT
    cause: str = ""  # the finding's words
    cause_rule: str = ""  # its rule (a Rule value: bounded, a metric label)
    human_needed: bool = False  # now: for a closed incident, at its end
    human_was_needed: bool = False  # at any point
    recovered: float | None = None  # wall: healthy again; None while open
    canary_at: float | None = None  # wall: the passing canary that confirmed it, if any

    @property
    def open(self) -> bool:
        return self.recovered is None

    def time_to_recover(self) -> float | None:
        return None if self.recovered is None else max(0.0, self.recovered - self.began)

    @property
    def outcome(self) -> IncidentOutcome:
        return IncidentOutcome.HUMAN if self.human_was_needed else IncidentOutcome.RECOVERED


@dataclass(frozen=True)
class Tracker:
    """The incident memory: the open incident, a symptom not yet judged, the last closed."""

    open: Incident | None = None
    symptom_since: float | None = None  # wall: first symptom while no incident is open
    next_number: int = 1
    closed: tuple[Incident, ...] = ()  # oldest first, at most INCIDENTS_KEPT


@dataclass(frozen=True)
class CycleFacts:
    """What one cycle tells the tracker."""

    observed: float  # wall time of the observation
    alert: AlertClass | None  # the alert the phase after the decision stands for
    symptom: bool  # the observation showed trouble, judged or not
    healthy: bool  # phase healthy after the decision
    paused: bool
    cause: str
    cause_rule: str
    human_needed: bool
    canary_at: float | None  # wall: the last passing canary
    actions: tuple[ActionNote, ...] = ()


def alert_for(state: PolicyState, obs: Observation) -> AlertClass | None:
    """The runbook alert the phase stands for, as its expression sees the node; None when it
    stands for none (healthy, starting, paused, unknown; recovering while /health answers and
    only a canary is awaited; degraded for a reason no alert covers)."""
    phase = state.phase
    if phase in (Phase.BACKOFF, Phase.ESCALATED):
        return AlertClass.RESTART_LOOP
    if phase in (Phase.DOWN, Phase.RECOVERING, Phase.BLOCKED) and not obs.health.healthy:
        return AlertClass.DOWN
    if phase in (Phase.DOWN, Phase.RECOVERING, Phase.BLOCKED) and _hung(state):
        # /health answers but no completion does (tabbyAPI#428): down for every client
        return AlertClass.DOWN
    if phase in (Phase.NO_MODEL, Phase.LOADING, Phase.BLOCKED):
        return AlertClass.NO_MODEL
    if phase is Phase.DEGRADED:
        if any(f.rule is Rule.SLOW_HEALTH for f in state.findings):
            return AlertClass.SLOW_HEALTH
        if state.using_fallback:  # serving, but not the wanted model
            return AlertClass.NO_MODEL
    return None


def _hung(state: PolicyState) -> bool:
    return state.canary_verdict in (CanaryVerdict.STALLED, CanaryVerdict.FAILED)


def symptom(obs: Observation, config: Config) -> bool:
    """Trouble in the observation itself, before any judgement: what `began` is dated by."""
    health = obs.health
    if health.result.outcome is Outcome.LOCAL_ERROR:
        return False  # the watchdog's own failure says nothing about TabbyAPI
    if not health.healthy:
        return True
    if health.result.latency_s > config.tabbyapi.slow_threshold:
        return True
    return obs.model is not None and obs.model.known and not obs.model.loaded


def _cause(state: PolicyState) -> tuple[str, str]:
    """The most specific cause the state holds: the gravest finding that names one, else what
    the deciding rule rests on (PolicyState.cause) with that finding's rule."""
    specific = [f for f in state.findings if _names_a_cause(f, state)]
    if specific:
        best = min(specific, key=lambda f: _SEVERITY_RANK[f.severity])
        return best.message, best.rule.value
    cited = next((f for f in state.findings if f.message == state.cause), None)
    if state.cause:
        if cited is None:
            return state.cause, ""
        if cited.rule is Rule.GENERATION_HANG and not _hung(state):
            return state.cause, Rule.CANARY_PENDING.value  # a state an older policy wrote
        return state.cause, cited.rule.value
    first: Finding | None = state.findings[0] if state.findings else None
    return (first.message, first.rule.value) if first else ("", "")


def _names_a_cause(finding: Finding, state: PolicyState) -> bool:
    # A generation_hang finding without a stalled or failed canary only says that a canary is
    # awaited after a restart (older policies file the wait under that rule).
    if finding.rule is Rule.GENERATION_HANG and not _hung(state):
        return False
    return names_a_cause(finding.rule.value)


def human_needed(state: PolicyState) -> bool:
    return (
        state.escalated
        or state.phase in (Phase.BLOCKED, Phase.ESCALATED)
        or any(f.rule in HUMAN_RULES for f in state.findings)
    )


def _notes(results: Iterable[ActionResult], wall_of: float) -> tuple[ActionNote, ...]:
    """`wall_of`: wall minus monotonic at the cycle's end, to date the results."""
    notes = []
    for r in results:
        what = describe(r.action)
        if r.detail and r.detail != what:
            what = f"{what}: {r.detail}"
        notes.append(
            ActionNote(
                at=r.finished_at + wall_of,
                action=action_name(r.action),
                result=r.status.value,
                detail=one_line(what, TEXT_LIMIT),
            )
        )
    return tuple(notes)


def facts(
    before: PolicyState,
    after: PolicyState,
    obs: Observation,
    results: tuple[ActionResult, ...],
    config: Config,
    *,
    wall: float,
    mono: float,
) -> CycleFacts:
    """The facts of one cycle (`wall` and `mono`: the two clocks at its end)."""
    del before  # the state after the decision holds all that is needed; kept for symmetry
    offset = wall - mono
    # The cycle's own results, and the loads that finished since the last cycle (their final
    # results arrive with the observation; the other results there were the last cycle's).
    finished = tuple(
        r
        for r in obs.results
        if isinstance(r.action, LoadModel) and r.status is not ResultStatus.IN_PROGRESS
    )
    cause, rule = _cause(after)
    if cause and not rule and results:  # the deciding rule's action's evidence
        rule = results[0].action.reason.rule.value
    canary = after.last_canary_at
    passed = after.canary_verdict is CanaryVerdict.OK and canary is not None
    return CycleFacts(
        observed=obs.at + offset,
        alert=alert_for(after, obs),
        symptom=symptom(obs, config),
        healthy=after.phase is Phase.HEALTHY,
        paused=after.phase is Phase.PAUSED,
        cause=one_line(cause, TEXT_LIMIT) if cause else "",
        cause_rule=rule,
        human_needed=human_needed(after),
        canary_at=canary + offset if passed and canary is not None else None,
        actions=_notes((*finished, *results), offset),
    )


def _update(inc: Incident, f: CycleFacts) -> Incident:
    alert = inc.alert
    if f.alert is not None and f.alert.rank > alert.rank:
        alert = f.alert
    actions, dropped = inc.actions, inc.actions_dropped
    if f.actions:
        actions = (*actions, *f.actions)
        if len(actions) > ACTIONS_KEPT:
            dropped += len(actions) - ACTIONS_KEPT
            actions = actions[-ACTIONS_KEPT:]
    cause, rule = inc.cause, inc.cause_rule
    # A cause is kept until a specific one replaces it; a generic one only fills an empty place
    # (the first words of a crash, "refused", tell more than the canary awaited after it).
    if f.cause and not f.healthy and (names_a_cause(f.cause_rule) or not cause):
        cause, rule = f.cause, f.cause_rule
    human = f.human_needed or (f.paused and inc.human_needed)
    return replace(
        inc,
        alert=alert,
        actions=actions,
        actions_dropped=dropped,
        cause=cause,
        cause_rule=rule,
        human_needed=human,
        human_was_needed=inc.human_was_needed or f.human_needed or f.paused,
    )


def step(tracker: Tracker, f: CycleFacts) -> tuple[Tracker, Incident | None]:
    """Fold one cycle into the tracker; also returns the incident that closed in it."""
    inc = tracker.open
    if inc is None:
        if f.alert is None:
            since = (tracker.symptom_since or f.observed) if f.symptom else None
            return _with(tracker, symptom_since=since), None
        began = min(tracker.symptom_since or f.observed, f.observed)
        inc = Incident(number=tracker.next_number, alert=f.alert, began=began, detected=f.observed)
        tracker = replace(tracker, next_number=tracker.next_number + 1, symptom_since=None)
    inc = _update(inc, f)
    if not f.healthy:
        return _with(tracker, open=inc), None
    closed = replace(
        inc,
        recovered=f.observed,
        human_needed=False,
        canary_at=f.canary_at if f.canary_at is not None and f.canary_at >= inc.began else None,
    )
    kept = (*tracker.closed, closed)[-INCIDENTS_KEPT:]
    return replace(tracker, open=None, symptom_since=None, closed=kept), closed


def _with(tracker: Tracker, **changes: object) -> Tracker:
    """replace(), but the same object when nothing changes: the file is written on change."""
    if all(getattr(tracker, k) == v for k, v in changes.items()):
        return tracker
    return replace(tracker, **changes)  # type: ignore[arg-type]


def incidents_since(tracker: Tracker, since: float) -> list[Incident]:
    """The incidents that were going on at or after `since` (wall), oldest first."""
    every = [*tracker.closed, *([tracker.open] if tracker.open else [])]
    return [i for i in every if i.recovered is None or i.recovered >= since]

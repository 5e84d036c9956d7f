"""The runbook as a pure state machine.

    decide(state, observation, now, config) -> (new_state, actions)

Everything that affects what the watchdog does lives here, and nothing here does I/O or reads a
clock: `now` is monotonic seconds passed in, the observation is a frozen snapshot, and the result
is data. The daemon executes the actions in order (a failure skips the rest of the batch) and
feeds their results back through the next observation.

Theory of operation, one cycle:

1. absorb: results of earlier actions (load outcomes, refused power limits, the fallback-route
   check) and systemd's own restarts (NRestarts deltas) update the memory;
2. track: health streaks (consecutive failures, slow probes, healthy-since);
3. diagnose (findings.FINDERS): every cause visible now; they clear when the cause clears;
4. plan: the first rule of `PLAN` whose `when` holds decides. The tuple's order is the runbook's
   order of precedence, and the README's runbook table is checked against it. A pause comes
   before every rule: observe only;
5. always (unless paused): power limits that drifted are re-applied, the fallback route is
   checked once per outage, and the expensive probes the next cycle needs are requested.

Two budgets keep it from making things worse: the watchdog never issues more than
`max_restarts` starts/restarts within `window`, and more than `max_restarts` restarts of any
origin within `window` while TabbyAPI is not healthy is a restart loop: stop and back off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from hydra_watchdog import findings as say
from hydra_watchdog import rebuild
from hydra_watchdog.actions import (
    Action,
    ActionResult,
    CheckFallbackRoute,
    KillOrphan,
    LoadModel,
    Reason,
    ResetGpu,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.config import Config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.findings import diagnose
from hydra_watchdog.observation import (
    ActiveState,
    GpuSnapshot,
    Observation,
    Outcome,
    Probe,
    ProcessInfo,
    ProcessRole,
)
from hydra_watchdog.policy_state import (
    CanaryVerdict,
    Finding,
    PermanentFailure,
    PolicyState,
    PowerHold,
    RestartOrigin,
    RestartRecord,
)
from hydra_watchdog.printable import cut
from hydra_watchdog.situation import (
    LIBRARY_CHECK_TRIES,
    Situation,
    auto_restarting,
    canary_impossible,
    key_refused,
    library_check_due,
    orphans_in_the_way,
    process_replaced,
    starting,
    tabby_process,
)
from hydra_watchdog.states import Phase, Rule
from hydra_watchdog.vram import GIB, snapshot_for, vram_free, vram_needed

POWER_RETRY_AFTER = 3600.0  # a refused power limit is retried hourly, not every cycle
POWER_TOLERANCE_W = 1.0  # drivers round limits; smaller differences are not drift

Plan = tuple[PolicyState, list[Action], list[Finding]]

__all__ = ["PLAN", "POWER_RETRY_AFTER", "PlanRule", "backoff_delay", "decide", "vram_needed"]


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")


def changed(obj: _D, /, **changes: Any) -> _D:
    """dataclasses.replace, except that `obj` itself comes back when every change gives a
    field the value it already has: in a healthy cycle most rules change nothing, and copying
    the state costs more than the rule that looked at it."""
    for name, value in changes.items():
        current = getattr(obj, name)
        if current is not value and current != value:
            return replace(obj, **changes)
    return obj


def decide(
    state: PolicyState, obs: Observation, now: float, config: Config
) -> tuple[PolicyState, tuple[Action, ...]]:
    """One step of the runbook. Pure: same inputs, same outputs; `config.watchdog.dry_run` is
    deliberately never read here, so a dry run decides exactly as a real one."""
    s = _absorb_results(state, obs, now, config)
    s = rebuild.track(s, obs, now)  # before _count_restarts: it compares the process
    s, counted = _count_restarts(s, obs, now, config)
    s = _track_health(s, obs, now, config)
    s = _power_back_on_target(s, obs, config)
    pause = obs.pause if obs.pause is not None and obs.pause.active(now) else None
    if pause is None and _loop_unresolved(s, obs, now, config):
        s = changed(s, escalated=True)  # the runbook's Escalation: a loop unresolved this long
    found = diagnose(s, obs, config)
    findings = found + counted

    if pause is not None:
        until_in = None if pause.until is None else pause.until - now
        paused = say.paused(pause.reason, until_in, unreadable=pause.unreadable)
        s = changed(
            _enter(s, Phase.PAUSED, now),
            findings=(paused, *findings),
            wants=frozenset(),
            cause=paused.message,
        )
        return s, ()

    cleanup: tuple[Action, ...] = ()
    if config.orphans.enabled:
        killable = [p for p in orphans_in_the_way(obs) if p.pid not in s.unkillable]
        cleanup = tuple(_kill(killable, Rule.ORPHAN_CLEANUP, "orphan"))
    # The remedy may name what decided it (_because); otherwise _cause finds it.
    sit = Situation(changed(s, cause=""), obs, now, config, tuple(findings), cleanup)
    rule = next(r for r in PLAN if r.when(sit))
    notes: list[Finding] = []
    if rule.settles:
        sit, notes = _settle(sit)
    s, actions, more = rule.then(sit)
    # The restarts counted late are bookkeeping: no change of phase rests on them.
    cause = s.cause or _cause(rule, found, notes + more, actions, cleanup)
    held = _load_held(rule, sit)
    if rule.sees:  # an impaired watchdog acts on nothing, preventive steps included
        actions += _power_limits(s, obs, now, config)
        actions += _fallback_route(s, config)
    said = findings + notes + more
    s = changed(s, findings=tuple(said), wants=_wants(s, obs, now, config) | held, cause=cause)
    return changed(s, down_told=_down_told(s)), tuple(actions)


# Distinct words kept per outage: the unit's states and Results, the journal's excerpts.
DOWN_TOLD_KEPT = 16


def _down_told(s: PolicyState) -> tuple[Finding, ...]:
    """PolicyState.down_told after this cycle's findings: () once TabbyAPI is healthy again.
    A /health 200 for a moment in a restart loop (a start that crashes a second later) ends
    no outage: until a canary passes, the phase is not HEALTHY."""
    if s.phase is Phase.HEALTHY:
        return ()
    told = [*s.down_told, *(f for f in s.findings if f.rule is Rule.DOWN and f not in s.down_told)]
    return tuple(told[-DOWN_TOLD_KEPT:])


def _load_held(rule: PlanRule, sit: Situation) -> frozenset[Probe]:
    """{Probe.MODEL} when `no_model` held a load back only because the model's answer was not
    asked this cycle: the next cycle asks, and loads on a fresh "no model"."""
    model = sit.obs.model
    if rule.name != "no_model" or model is None or model.fresh:
        return frozenset()
    fresh = replace(sit, obs=replace(sit.obs, model=replace(model, fresh=True)))
    _, would, _ = _no_model(fresh)
    return frozenset({Probe.MODEL}) if any(isinstance(a, LoadModel) for a in would) else frozenset()


def _loop_unresolved(s: PolicyState, obs: Observation, now: float, cfg: Config) -> bool:
    """A restart loop escalates once it has gone on for escalate_after and TabbyAPI still
    fails: not on the cycle after it recovered (the back-off stands until reset_after), not
    while the watchdog sees nothing."""
    if s.loop_since is None or s.escalated or now - s.loop_since < cfg.restart_loop.escalate_after:
        return False
    if obs.health.result.outcome is Outcome.LOCAL_ERROR:
        return False
    return not obs.health.healthy or s.canary_verdict in (
        CanaryVerdict.STALLED,
        CanaryVerdict.FAILED,
    )


def _cause(
    rule: PlanRule,
    said: list[Finding],
    more: list[Finding],
    actions: list[Action],
    cleanup: tuple[Action, ...],
) -> str:
    """What a change of phase this cycle is told with: the deciding rule's own note of this
    cycle, else its standing finding, else the evidence of its first action (the orphan
    cleanup that goes ahead of every rule only when it did nothing else); never an unrelated
    finding that happens to be first."""
    mine = [f for f in (*more, *said) if f.rule in rule.rules]
    if mine:
        return mine[0].message
    own = [a for a in actions if a not in cleanup] or actions
    return own[0].reason.evidence if own else ""


def _because(s: PolicyState, sit: Situation, rule: Rule, subject: str | None = None) -> PolicyState:
    """The standing finding of `rule` (and `subject`) decided this cycle: a change of phase
    cites it."""
    found = (f for f in sit.findings if f.rule is rule and subject in (None, f.subject))
    return _cite(s, next(found, None))


def _cite(s: PolicyState, finding: Finding | None) -> PolicyState:
    return s if finding is None else changed(s, cause=finding.message)


# --- 1. absorb ---------------------------------------------------------------------------------


_NOT_RUN = (ResultStatus.FAILED, ResultStatus.REFUSED, ResultStatus.SKIPPED)


def _absorb_results(s: PolicyState, obs: Observation, now: float, cfg: Config) -> PolicyState:
    final_load: tuple[ActionResult, LoadModel] | None = None
    for res in obs.results:
        action = res.action
        if isinstance(action, LoadModel) and res.status is not ResultStatus.IN_PROGRESS:
            final_load = res, action
        elif isinstance(action, UnitCommand) and action.verb in (UnitVerb.START, UnitVerb.RESTART):
            s = _absorb_start(s, res, action)
        elif isinstance(action, KillOrphan) and res.error_kind == ErrorKind.UNKILLABLE:
            s = changed(s, unkillable=tuple(sorted({*s.unkillable, action.pid})))
        elif isinstance(action, SetPowerLimit) and res.status is ResultStatus.OK:
            # The hourly retry worked: the "failed" finding goes with the hold.
            kept = tuple(d for d in s.power_denied if d.gpu_index != action.gpu_index)
            s = changed(s, power_denied=kept)
        elif isinstance(action, SetPowerLimit) and res.status in (
            ResultStatus.FAILED,
            ResultStatus.REFUSED,
        ):
            denied = [d for d in s.power_denied if d.gpu_index != action.gpu_index]
            denied.append(PowerHold(action.gpu_index, action.watts, now + POWER_RETRY_AFTER))
            s = changed(s, power_denied=tuple(denied))
        elif isinstance(action, SetPowerLimit) and res.status is ResultStatus.DRY_RUN:
            # The limit never changes in a dry run: say "would set" hourly, not every cycle.
            held = [d for d in s.power_held if d.gpu_index != action.gpu_index]
            held.append(PowerHold(action.gpu_index, action.watts, now + POWER_RETRY_AFTER))
            s = changed(s, power_held=tuple(held))
        elif isinstance(action, CheckFallbackRoute) and res.status is not ResultStatus.SKIPPED:
            verdict = "works" if res.succeeded else "FAILS"
            s = changed(
                s,
                fallback_route_checked=True,
                fallback_route_ok=res.succeeded,
                fallback_route_detail=f"fallback route {action.url} {verdict}: {res.detail}",
            )

    if final_load is not None:
        s = changed(s, load_in_flight="", load_started=None)
        ended, load = final_load
        if ended.succeeded:
            # A model just loaded has served nothing yet: a canary runs before "healthy".
            s = _unverified(s, f"the load of {load.model}")
        elif ended.error_kind == ErrorKind.UNAUTHORIZED:
            # Not the model's fault and no back-off can fix it: admin_key_rejected says so, and
            # no load goes out with this key again (situation.key_refused).
            s = changed(
                s,
                last_load_error=ended.detail,
                next_load_at=None,
                key_refused=obs.admin_key.stamp if obs.admin_key is not None else "",
                key_refused_detail=ended.detail,
            )
        elif ended.error_kind == ErrorKind.LOAD_PERMANENT:
            # No back-off either: waiting cannot change it, and the fallback may go at once.
            s = changed(
                s,
                next_load_at=None,
                permanent=(
                    *(p for p in s.permanent if p.model != load.model),
                    PermanentFailure(
                        load.model,
                        ended.detail,
                        repr(cfg.model),
                        _folder_mtime(obs, cfg, load.model),
                    ),
                ),
                last_load_error=ended.detail,
            )
        else:
            s = _load_failed(s, now, cfg, ended.detail)
    elif s.load_in_flight and obs.load is None:
        # The actuator reports progress for as long as a load runs; silence means it is gone
        # (the daemon was restarted mid-load). Count it, so a vanishing load cannot loop.
        s = _load_failed(
            changed(s, load_in_flight="", load_started=None), now, cfg, "the load was lost"
        )
    return s


def _absorb_start(s: PolicyState, res: ActionResult, action: UnitCommand) -> PolicyState:
    """Only a (re)start that ran counts: one that was skipped, refused or failed gives back its
    place in the budget (a back-off attempt that never ran is then tried again at the same
    step: _backoff finds that the unit never came up)."""
    if res.status in _NOT_RUN:
        mine = [i for i, r in enumerate(s.restarts) if r.by is RestartOrigin.WATCHDOG]
        restarts = s.restarts
        if mine:
            restarts = s.restarts[: mine[-1]] + s.restarts[mine[-1] + 1 :]
        return changed(s, restarts=restarts, recovery_started=None)
    if res.status is ResultStatus.OK:
        # A new process: whatever was said of the old one, only a canary that passes may say
        # it serves (README: a passing canary after any restart).
        s = _unverified(s, f"the watchdog's {action.verb.value} of {action.unit}")
    return s


def _unverified(s: PolicyState, after: str, *, keep: bool = False) -> PolicyState:
    """A restart or a load: TabbyAPI is called healthy again only once a canary passes.
    `keep`: what this follows does not replace what a wait already under way follows."""
    if keep and s.canary_verdict is CanaryVerdict.UNVERIFIED:
        return s
    return changed(s, canary_verdict=CanaryVerdict.UNVERIFIED, canary_wait=after)


def _folder_mtime(obs: Observation, cfg: Config, model: str) -> float | None:
    folder = obs.host.fallback if model == cfg.model.fallback else obs.host.model
    return folder.mtime if folder is not None else None


def _still_permanent(p: PermanentFailure, obs: Observation, cfg: Config) -> bool:
    """Nothing it depended on besides TabbyAPI's process (whose replacement ends them all) is
    seen to change: the model config, the folder (its mtime, when it can be read now). What
    cannot be read this cycle (the host check timed out, the mount lost) has not changed."""
    mtime = _folder_mtime(obs, cfg, p.model)
    return p.config == repr(cfg.model) and (mtime is None or p.folder is None or mtime == p.folder)


def _folder_seen(p: PermanentFailure, obs: Observation, cfg: Config) -> PermanentFailure:
    """A folder not read when the load failed is taken as it is first seen after: what it
    looked like then is unknown, so that first sight is no change."""
    mtime = _folder_mtime(obs, cfg, p.model)
    return replace(p, folder=mtime) if p.folder is None and mtime is not None else p


def _load_failed(s: PolicyState, now: float, cfg: Config, detail: str) -> PolicyState:
    failures = s.load_failures + 1
    return changed(
        s,
        load_failures=failures,
        next_load_at=now + backoff_delay(failures, cfg),
        last_load_error=detail,
    )


def _count_restarts(
    s: PolicyState, obs: Observation, now: float, cfg: Config
) -> tuple[PolicyState, list[Finding]]:
    records = list(s.restarts)
    notes: list[Finding] = []
    seen, n = s.nrestarts_seen, obs.unit.n_restarts
    if n is not None:
        if seen is not None:
            # A manual restart or reset-failed zeroes NRestarts: then all n are new.
            delta = n if n < seen else n - seen
            # They happened since the last observation that read NRestarts, when exactly is
            # not known: dated to that observation, never later than they were (a restart
            # dated late would stay in the window longer than it is, and "N restarts within"
            # would say more than happened). The last one is dated by the unit's own
            # ActiveEnterTimestamp when that falls in the gap.
            last = s.nrestarts_at
            earlier = last if last is not None else now
            latest = earlier
            entered = obs.unit.active_enter_mono
            if entered is not None and earlier < entered <= now:
                latest = entered
            if delta and last is not None and now - last > 2 * cfg.watchdog.interval:
                # The watchdog away, a late cycle, the unit gone from systemd for a while:
                # dated to the gap's start, so a slow series cannot pass for a burst.
                latest = last
                notes.append(say.restarts_seen_late(delta, now - last))
            if delta:
                records += [RestartRecord(earlier, RestartOrigin.SYSTEMD)] * (delta - 1)
                records.append(RestartRecord(latest, RestartOrigin.SYSTEMD))
        seen = n
        s = changed(s, nrestarts_at=now)
    window = cfg.restart_loop.window
    kept = tuple(r for r in records if now - r.at < window)
    attempts = tuple(at for at in s.start_attempts if now - at < window)
    s = changed(s, start_attempts=attempts)
    fresh = process_replaced(s, obs)
    invocation, process = obs.unit.invocation_id, tabby_process(obs)
    if not fresh:  # not knowing now is no change: the process last seen stays
        invocation, process = invocation or s.invocation_id, process or s.tabby_process
    s = changed(
        s,
        restarts=kept,
        nrestarts_seen=seen,
        invocation_id=invocation,
        tabby_process=process,
    )
    if fresh:
        # A new TabbyAPI process starts with empty VRAM: the main model deserves a fresh try,
        # and it serves nothing until a canary passes, whoever restarted it. What the old one
        # refused (a permanent load error, a key) the new one may take.
        s = changed(s, load_failures=0, next_load_at=None, last_load_error="")
        s = changed(s, permanent=(), key_refused=None)
        # (the watchdog's own start, seen done this cycle, has said so already)
        own = any(
            isinstance(r.action, UnitCommand)
            and r.action.verb in (UnitVerb.START, UnitVerb.RESTART)
            and r.status is ResultStatus.OK
            for r in obs.results
        )
        s = _unverified(s, "TabbyAPI's restart (a new process)", keep=own)
    # Config or folder changed: such a failure may not hold any more.
    holding = tuple(_folder_seen(p, obs, cfg) for p in s.permanent if _still_permanent(p, obs, cfg))
    if holding != s.permanent:
        s = changed(s, permanent=holding)
    return s, notes


# --- 2. track ----------------------------------------------------------------------------------


def _track_health(s: PolicyState, obs: Observation, now: float, cfg: Config) -> PolicyState:
    health, t = obs.health, cfg.tabbyapi
    s = changed(s, observed_at=now)
    if obs.canary is not None:
        s = changed(s, last_canary_at=now)
        verdict = _CANARY_VERDICTS.get(obs.canary.result.outcome)
        if "No models" in obs.canary.result.detail:
            verdict = None  # the model went away meanwhile: no word on generation
        if verdict is not None:  # withheld, refused, our own failure: no word on generation
            s = changed(s, canary_verdict=verdict, canary_detail=obs.canary.result.detail)
        if verdict in (CanaryVerdict.STALLED, CanaryVerdict.FAILED) and s.trouble_since is None:
            s = changed(s, trouble_since=now)  # an outage too, though /health says 200
    if obs.host.libraries_checked:
        missing = obs.host.missing_libraries or ()  # unknown never blocks a restart
        s = changed(s, missing_libraries=tuple(missing), libraries_checked_at=now, library_misses=0)
    elif s.trouble_since is None:
        s = changed(s, library_misses=0)
    elif Probe.LIBRARIES in s.wants:
        s = changed(s, library_misses=s.library_misses + 1)  # asked for, and it did not run
    if obs.model is not None and obs.model.loaded:
        s = changed(s, last_load_error="")
        if obs.model.loaded == cfg.model.name:
            s = changed(s, load_failures=0, using_fallback=False, next_load_at=None)
        # (on the fallback, the main model's back-off stands: its retries keep to it)
    if obs.host.journal_excerpt is not None:
        s = changed(s, journal=obs.host.journal_excerpt)  # stands until the next read
    if health.result.outcome is Outcome.LOCAL_ERROR:
        return s  # the watchdog could not probe: no evidence either way, streaks stay as they are
    if health.result.outcome is Outcome.WITHHELD:
        # not asked: the port's listener is not verified as TabbyAPI. Its say is no evidence
        # about TabbyAPI (never a failure toward a restart), and no healthy time either.
        return changed(s, healthy_since=None, slow_streak=0)
    if health.healthy:
        slow = health.result.latency_s > t.slow_threshold
        return changed(
            s,
            journal=(),
            failures=0,
            last_failure="",
            slow_streak=s.slow_streak + 1 if slow else 0,
            healthy_since=s.healthy_since if s.healthy_since is not None else now,
            fallback_route_checked=False,
            fallback_route_ok=None,
            fallback_route_detail="",
        )
    s = changed(
        s,
        healthy_since=None,
        slow_streak=0,
    )
    if health.result.outcome is Outcome.REFUSED:
        # Nothing listens on the port: whatever answers there next has started since (a
        # restart the watchdog may not tell by its process, e.g. without systemd).
        s = _unverified(s, "TabbyAPI's start", keep=True)
    if starting(s, obs, now, cfg):
        return changed(s, failures=0, last_failure="")
    failed = 1 + obs.confirmations_failed  # the first probe and its confirmations (observe.py)
    return changed(s, failures=s.failures + failed, last_failure=_health_text(obs))


_CANARY_VERDICTS = {
    Outcome.OK: CanaryVerdict.OK,
    Outcome.TIMEOUT: CanaryVerdict.STALLED,
    # an error answer (HTTP 500, an error body) serves no completion either
    Outcome.HTTP_ERROR: CanaryVerdict.FAILED,
    Outcome.BAD_BODY: CanaryVerdict.FAILED,
}


def _health_text(obs: Observation) -> str:
    r = obs.health.result
    text = r.outcome.value + (f" {r.status}" if r.status else "")
    if obs.health.unhealthy_issues:
        text += f" ({cut(obs.health.unhealthy_issues[-1], 120)})"
    elif r.detail:
        text += f" ({cut(r.detail, 120)})"
    return text


# --- 4. plan: the runbook's rules, first match wins ---------------------------------------------


@dataclass(frozen=True)
class PlanRule:
    """One runbook rule: when `when` holds (and no earlier rule did), `then` decides.

    `settles`: the rule acts on a TabbyAPI that answers; before it decides, a back-off that has
    seen `reset_after` of health is reset and the recovery grace is closed (`_settle`).
    `sees`: False for the one rule under which the watchdog is blind (impaired): then not even
    the preventive steps (power limits, the fallback route) are taken."""

    name: str
    runbook: str  # the README table's runbook section it encodes ("": the watchdog's caution)
    rules: tuple[Rule, ...]  # the HYDRA_RULE values its actions and notes carry
    when: Callable[[Situation], bool]
    then: Callable[[Situation], Plan]
    settles: bool = False
    sees: bool = True


def _enter(s: PolicyState, phase: Phase, now: float) -> PolicyState:
    return s if s.phase is phase else changed(s, phase=phase, phase_since=now)


def _stay(phase: Phase, *, cleanup: bool = True) -> Callable[[Situation], Plan]:
    """A rule whose whole answer is a phase (and the orphan cleanup)."""

    def then(sit: Situation) -> Plan:
        return _enter(sit.s, phase, sit.now), list(sit.cleanup) if cleanup else [], []

    return then


def _keep(sit: Situation) -> Plan:
    """Not enough evidence to change anything: the phase stays, orphans are still cleaned. A
    pause that has ended is not kept: nothing is known yet, and nothing is paused."""
    s = sit.s if sit.s.phase is not Phase.PAUSED else _enter(sit.s, Phase.UNKNOWN, sit.now)
    return s, list(sit.cleanup), []


def backoff_delay(step: int, cfg: Config) -> float:
    """Wait before back-off attempt `step` (1, 2, ...): backoff_initial * 2^(step-1), capped."""
    r = cfg.restart_loop
    return min(r.backoff_initial * 2.0 ** min(max(step - 1, 0), 60), r.backoff_max)


def _kill(procs: list[ProcessInfo], rule: Rule, why: str) -> list[Action]:
    # The reason says what the orphan holds; its command line is said by the orphan's finding
    # and the kill's own line, not a third time by the change of phase that cites this reason.
    return [
        KillOrphan(
            p.pid,
            p.start_ticks,
            p.cmdline,
            p.uid,
            Reason(rule, f"{why} pid {p.pid} holds {_held(p)}"),
        )
        for p in procs
    ]


def _held(p: ProcessInfo) -> str:
    ports = [f"port {port}" for port in p.listens_on]
    vram = [f"{p.gpu_bytes / GIB:.1f} GiB VRAM"] if p.gpu_bytes else []
    return " and ".join(ports + vram) or "nothing"


def _settle(sit: Situation) -> tuple[Situation, list[Finding]]:
    """TabbyAPI answers: the recovery grace is over, and a back-off that saw `reset_after` of
    health is reset (before that, only its pending attempt is dropped)."""
    s, now, r = sit.s, sit.now, sit.cfg.restart_loop
    notes: list[Finding] = []
    s = changed(s, recovery_started=None)
    if s.backoff_step > 0:
        healthy_for = now - (s.healthy_since if s.healthy_since is not None else now)
        if healthy_for >= r.reset_after:
            s = changed(s, backoff_step=0, backoff_until=None, loop_since=None, escalated=False)
            notes.append(say.backoff_reset(healthy_for))
        else:
            s = changed(s, backoff_until=None)
    return changed(sit, s=s), notes


# --- the remedies the rules share ---


def _restart_or_loop(
    sit: Situation,
    s: PolicyState,
    rule: Rule,
    evidence: str,
    before: list[Action],
    *,
    stopped: bool = False,
) -> Plan:
    """Remediate with a (re)start when allowed; otherwise this is a restart loop. `stopped`:
    `before` already stops the unit (full recovery), so the remedy is a plain start."""
    if not sit.unit.available:
        return (
            _enter(s, Phase.BLOCKED, sit.now),
            before,
            [say.cannot_act(rule, evidence, sit.unit.detail)],
        )
    if sit.blocking:
        return _enter(_cite(s, sit.blocking[0]), Phase.BLOCKED, sit.now), before, []
    wait = _library_wait(sit)
    if wait is not None:
        return _enter(s, Phase.DOWN, sit.now), before, [wait]
    r = sit.cfg.restart_loop
    ran = s.restarts_in_window(sit.now, r.window, RestartOrigin.WATCHDOG)
    if sit.in_restart_loop or (not sit.budget_left and ran >= r.max_restarts):
        return _enter_loop(sit, s, before, stopped=stopped)
    if not sit.budget_left:
        # The budget went on (re)starts that did not run: not a loop (nothing restarted), and
        # hammering a failing start would not help: wait until they leave the window.
        note = say.starts_not_running(evidence, len(sit.s.start_attempts) - ran)
        return _enter(s, Phase.BLOCKED, sit.now), before, [note]
    s, start = _start_actions(sit, s, rule, evidence, stopped=stopped)
    return s, before + start, []


def _start_actions(
    sit: Situation, s: PolicyState, rule: Rule, evidence: str, *, stopped: bool
) -> tuple[PolicyState, list[Action]]:
    """Bring the unit up: restart when it runs, else (reset-failed and) start. Records the
    restart against the budget and opens the startup grace."""
    unit, reason, now = sit.unit, Reason(rule, evidence), sit.now
    actions: list[Action] = []
    if sit.unit_up and not stopped:
        actions.append(UnitCommand(UnitVerb.RESTART, unit.name, reason))
    else:
        if unit.active_state == ActiveState.FAILED and not stopped:
            actions.append(UnitCommand(UnitVerb.RESET_FAILED, unit.name, reason))
        actions.append(UnitCommand(UnitVerb.START, unit.name, reason))
    s = changed(
        s,
        restarts=(*s.restarts, RestartRecord(now, RestartOrigin.WATCHDOG)),
        start_attempts=(*s.start_attempts, now),
        recovery_started=now,
        failures=0,
    )
    return _enter(s, Phase.RECOVERING, now), actions


def _enter_loop(
    sit: Situation, s: PolicyState, before: list[Action], *, stopped: bool = False
) -> Plan:
    """TabbyAPIRestartLoop: DO NOT just restart again. Stop it, then back off."""
    r, now = sit.cfg.restart_loop, sit.now
    step = s.backoff_step + 1
    wait = backoff_delay(step, sit.cfg)
    note = say.restart_loop(
        s.restarts_in_window(now, r.window), r.window, r.max_restarts, step, wait
    )
    actions = list(before)
    if not stopped and (sit.unit_up or auto_restarting(sit.unit)):
        actions.append(
            UnitCommand(UnitVerb.STOP, sit.unit.name, Reason(Rule.RESTART_LOOP, note.message))
        )
    s = changed(
        s,
        backoff_step=step,
        backoff_until=now + wait,
        loop_invocation=sit.unit.invocation_id,
        loop_since=s.loop_since if s.loop_since is not None else now,
        recovery_started=None,
        failures=0,
    )
    return _enter(s, Phase.ESCALATED if s.escalated else Phase.BACKOFF, now), actions, [note]


# --- the rules' remedies, in PLAN order ---


def _orphan_on_port(sit: Situation) -> Plan:
    evidence = (
        f"port {sit.cfg.tabbyapi.port} held by orphan pid {sit.orphans_on_port[0].pid}; "
        "restart so TabbyAPI binds its own port again"
    )
    return _restart_or_loop(sit, sit.s, Rule.PORT_CONFLICT, evidence, list(sit.cleanup))


def _backoff(sit: Situation) -> Plan:
    """One start attempt per back-off step, and only when nothing a restart cannot fix is in
    the way; an attempt that does not come up healthy is the next step."""
    s, now, cfg = sit.s, sit.now, sit.cfg
    cleanup = list(sit.cleanup)
    notes: list[Finding] = []
    waiting = Phase.ESCALATED if s.escalated else Phase.BACKOFF

    if s.backoff_until is not None and sit.unit_up:
        entered = sit.unit.active_enter_mono
        if s.loop_invocation:
            same = sit.unit.invocation_id == s.loop_invocation
        else:  # the loop began without systemd to ask: judge by when the unit became active
            same = entered is None or s.loop_since is None or entered <= s.loop_since
        if same:
            # The very process the loop stopped still runs: that stop did not happen (skipped
            # behind a failed kill, a dry run). Stop it again; it is no attempt of this step.
            reason = Reason(Rule.RESTART_LOOP, "the restart loop's stop did not happen")
            stop = UnitCommand(UnitVerb.STOP, sit.unit.name, reason)
            return _enter(s, waiting, now), [*cleanup, stop], notes
        # Someone else (a human, a timer) started it while we waited: that is this step's attempt.
        s = changed(s, backoff_until=None, recovery_started=now)
        return _enter(s, Phase.RECOVERING, now), cleanup, notes
    if s.backoff_until is not None:  # waiting for the next attempt
        if now < s.backoff_until:
            notes.append(say.backoff_waiting(s.backoff_step, backoff_delay(s.backoff_step, cfg)))
            return _enter(s, waiting, now), cleanup, notes
        if sit.blocking:
            notes.append(say.backoff_deferred(" until the cause is fixed"))
            return _enter(s, waiting, now), cleanup, notes
        if not sit.budget_left:
            notes.append(say.backoff_deferred(": restart budget spent"))
            return _enter(s, waiting, now), cleanup, notes
        if not sit.unit.available:
            notes.append(say.backoff_deferred(f": systemd cannot be asked ({sit.unit.detail})"))
            return _enter(s, waiting, now), cleanup, notes
        wait = _library_wait(sit)
        if wait is not None:
            return _enter(s, waiting, now), cleanup, [*notes, wait]
        s = changed(s, backoff_until=None)
        evidence = f"back-off step {s.backoff_step} elapsed: one start attempt"
        s, start = _start_actions(sit, s, Rule.BACKOFF_ATTEMPT, evidence, stopped=False)
        return s, cleanup + start, notes

    # An attempt was made: starting inside the grace is fine, anything else failed the step
    # (completions still failing on the new process too). Without systemd to ask, whether it
    # ran cannot be told: the same step waits again rather than count it as a failed attempt.
    entered, attempt = sit.unit.active_enter_mono, s.recovery_started
    since = attempt if attempt is not None else now
    never_came_up = (
        not sit.unit_up
        and (entered is None or attempt is None or entered < attempt)
        and not any(r.by is RestartOrigin.SYSTEMD and r.at >= since for r in s.restarts)
    )
    if not sit.unit.available or never_came_up:
        # (or the unit has not been active since the attempt: that start never ran, e.g. a
        # failed job whose result was lost while the watchdog was away)
        s = changed(s, backoff_until=now + backoff_delay(s.backoff_step, cfg))
        return _enter(s, waiting, now), cleanup, notes
    if starting(s, sit.obs, now, cfg) or (
        sit.unit_up
        and s.failures < cfg.tabbyapi.failures_before_down
        and not _completions_fail(sit)
    ):
        return _enter(s, Phase.RECOVERING, now), cleanup, notes
    s2, actions, more = _enter_loop(sit, s, cleanup)
    return s2, actions, notes + more


def _generation_hang(sit: Situation) -> Plan:
    evidence = say.completions_stalled(sit.s, sit.cfg).message
    return _restart_or_loop(sit, sit.s, Rule.GENERATION_HANG, evidence, list(sit.cleanup))


def _no_model(sit: Situation) -> Plan:
    """TabbyAPINoModel: check VRAM, clean leaked holders, load (once), fall back when needed."""
    s, obs, now, cfg = sit.s, sit.obs, sit.now, sit.cfg
    m, host, cleanup = cfg.model, obs.host, list(sit.cleanup)
    if s.load_in_flight:
        return _enter(s, Phase.LOADING, now), cleanup, []
    if host.models_dir_ok is False:
        return _enter(_because(s, sit, Rule.MODELS_MOUNT), Phase.BLOCKED, now), cleanup, []
    if s.next_load_at is not None and now < s.next_load_at:
        return _enter(_because(s, sit, Rule.LOAD_FAILED), Phase.NO_MODEL, now), cleanup, []

    free = vram_free(obs.gpus, cfg.gpu.device)
    main_failed = s.permanent_failure(m.name)
    main_usable = (host.model is None or host.model.usable) and main_failed is None
    fallback_usable = (
        bool(m.fallback)
        and (host.fallback is None or host.fallback.usable)
        and s.permanent_failure(m.fallback) is None
    )
    want_fallback = fallback_usable and (
        s.escalated or s.load_failures >= m.max_load_attempts or not main_usable
    )
    candidates = ([] if want_fallback or not main_usable else [(m.name, False)]) + (
        [(m.fallback, True)] if fallback_usable else []
    )
    notes: list[Finding] = []
    if not candidates:  # neither the main model (unusable) nor a fallback can be loaded
        s = (
            _because(s, sit, Rule.LOAD_FAILED, f"permanent {m.name}")
            if main_failed is not None
            else _because(s, sit, Rule.MODELS_MOUNT)
        )
        return _enter(s, Phase.BLOCKED, now), cleanup, []
    vram_refused = False
    for name, is_fallback in candidates:
        need = vram_needed(cfg, host.fallback if is_fallback else host.model, fallback=is_fallback)
        if need is not None and free is not None and free < need:
            leaked = [p for p in sit.orphans_in_the_way if p.gpu_bytes > 0]
            if leaked and cfg.orphans.enabled:  # cleanup first; re-check
                s = changed(s, cause=cleanup[0].reason.evidence) if cleanup else s
                return _enter(s, Phase.NO_MODEL, now), cleanup, notes
            others = [p for p in obs.processes if p.gpu_bytes > 0 and p.role is ProcessRole.FOREIGN]
            notes.append(say.vram_refused(name, need, free, others, fallback=is_fallback))
            vram_refused = vram_refused or not is_fallback
            continue
        rule = Rule.FALLBACK_MODEL if is_fallback else Rule.NO_MODEL
        why = "healthy but no model loaded"
        if is_fallback:
            blocker = (
                "it cannot succeed: " + cut(main_failed.detail, 120)
                if main_failed is not None
                else "escalated"
                if s.escalated
                else f"{s.load_failures} failed loads"
            )
            unusable = not main_usable and main_failed is None
            why = (
                f"fallback: {m.name} cannot be loaded now ({blocker}"
                f"{', model folder unusable' if unusable else ''})"
            )
        if obs.model is None or not obs.model.fresh:
            # "No model" as of up to a minute ago (observe.py asks seldom while none is
            # loaded): asked again first, so a model loaded by hand meanwhile is never replaced.
            return _enter(s, Phase.NO_MODEL, now), cleanup, notes
        vram = (
            f"; VRAM {free / GIB:.1f} GiB free, needs {need / GIB:.1f} GiB"
            if need is not None and free is not None
            else "; VRAM not checked (unknown)"
        )
        s = changed(
            s,
            load_in_flight=name,
            load_started=now,
            next_load_at=now + backoff_delay(s.load_failures + 1, cfg),
            using_fallback=is_fallback,
            main_retry_at=now + cfg.restart_loop.backoff_max if is_fallback else None,
            fallback_blocker=_blocker(s, cfg, main_failed, main_usable, vram_refused)
            if is_fallback
            else "",
        )
        load = LoadModel(name, need, Reason(rule, why + vram))
        s = changed(s, cause=load.reason.evidence)
        return _enter(s, Phase.LOADING, now), [*cleanup, load], notes
    return _enter(s, Phase.BLOCKED, now), cleanup, notes


# Seconds after the watchdog's own (re)start during which a job queued on a stopped unit is taken
# for that command's: a restart is a stop, then a start that systemd queues once the stop is
# done, and a read in between finds the unit inactive with that start pending. Past this, a job
# that has not started the unit (waiting on a dependency) no longer holds the watchdog back.
OWN_JOB_SETTLE = 10.0


def job_under_way(sit: Situation) -> bool:
    """systemd is carrying out a stop or restart: the unit deactivates, or it is stopped with a
    job queued shortly after the watchdog's own (re)start (see OWN_JOB_SETTLE)."""
    unit = sit.unit
    if not unit.available:
        return False
    if unit.active_state == ActiveState.DEACTIVATING:
        return True
    stopped = unit.active_state in (ActiveState.INACTIVE, ActiveState.FAILED)
    attempts = sit.s.start_attempts
    own = bool(attempts) and sit.now - attempts[-1] < OWN_JOB_SETTLE
    return stopped and own and unit.job_id is not None


def _job_running(sit: Situation) -> Plan:
    # A stop or restart job is under way (ours: restarts go out with --no-block, and the old
    # process takes a while to exit). Another unit command now would only pile up jobs.
    phase = Phase.RECOVERING if sit.s.recovery_started is not None else Phase.DOWN
    return _enter(sit.s, phase, sit.now), list(sit.cleanup), []


def _sticky_unhealthy(sit: Situation) -> Plan:
    issues = sit.obs.health.unhealthy_issues
    issue = cut(issues[-1], 160) if issues else "no detail"
    evidence = f"/health 503 unhealthy (sticky until restart): {issue}"
    return _restart_or_loop(sit, sit.s, Rule.STICKY_UNHEALTHY, evidence, list(sit.cleanup))


def _starting(sit: Situation) -> Plan:
    phase = Phase.RECOVERING if sit.s.recovery_started is not None else Phase.STARTING
    return _enter(sit.s, phase, sit.now), list(sit.cleanup), []


def _systemd_restarting(sit: Situation) -> Plan:
    # systemd's Restart= is on it; its restarts are counted through NRestarts.
    if sit.in_restart_loop:
        return _enter_loop(sit, sit.s, list(sit.cleanup))
    return _enter(sit.s, Phase.DOWN, sit.now), list(sit.cleanup), []


def _down_evidence(sit: Situation) -> str:
    unit = sit.unit
    state = f"{unit.active_state}/{unit.sub_state}" if unit.available else "unknown"
    if sit.unit_down:
        return f"{unit.name} is {state} (Result={unit.result or 'n/a'})"
    return f"unreachable for {sit.s.failures} probes ({sit.s.last_failure}); unit {state}"


def _check_libraries_first(sit: Situation) -> Plan:
    """Nothing is stopped, killed or started before this outage's library check: a restart
    that cannot succeed would only stop what runs and loop."""
    wait = say.library_check_awaited(sit.s.library_misses, sit.obs)  # due: the rule's `when`
    return _enter(sit.s, Phase.DOWN, sit.now), list(sit.cleanup), [wait]


def _blocked(sit: Situation) -> Plan:
    s = _enter(_cite(sit.s, sit.blocking[0]), Phase.DOWN, sit.now)
    return _enter(s, Phase.BLOCKED, sit.now), list(sit.cleanup), []


def _full_recovery(sit: Situation) -> Plan:
    """The runbook's Full Service Recovery: stop -> GPU reset (if enabled and nobody else uses
    the GPU) -> kill orphans -> verify mounts (a finding blocks the start) -> start -> verify."""
    s, obs, holders = _enter(sit.s, Phase.DOWN, sit.now), sit.obs, sit.orphans_in_the_way
    why = f"{_down_evidence(sit)}; {len(holders)} orphan(s) hold the port or VRAM"
    reason = Reason(Rule.FULL_RECOVERY, why)
    before: list[Action] = []
    if sit.unit_up or auto_restarting(sit.unit):
        before.append(UnitCommand(UnitVerb.STOP, sit.unit.name, reason))
    before += _kill(holders, Rule.FULL_RECOVERY, "orphan outside the unit:")
    if sit.cfg.gpu_reset.enabled:
        # Only GPUs where an orphan leaked memory, and only when every user is TabbyAPI's
        # (the actuator re-checks right before the reset).
        leaked_pids = {p.pid for p in holders if p.gpu_bytes > 0}
        for gpu in obs.gpus.devices:
            users = [obs.process(p.pid) for p in gpu.processes]
            leaked = any(p.pid in leaked_pids for p in gpu.processes)
            if leaked and all(u is not None and u.role is not ProcessRole.FOREIGN for u in users):
                before.append(ResetGpu(gpu.index, reason))
    if obs.host.models_dir_ok is False:
        return _enter(s, Phase.BLOCKED, sit.now), before, []
    return _restart_or_loop(sit, s, Rule.FULL_RECOVERY, why, before, stopped=True)


def _down(sit: Situation) -> Plan:
    s = _enter(sit.s, Phase.DOWN, sit.now)
    return _restart_or_loop(sit, s, Rule.DOWN, _down_evidence(sit), list(sit.cleanup))


def _completions_fail(sit: Situation) -> bool:
    """The last canary's verdict, which stands until a newer canary replaces it."""
    return sit.s.canary_verdict in (CanaryVerdict.STALLED, CanaryVerdict.FAILED)


def _restart_trigger(sit: Situation) -> str:
    """What would restart the running TabbyAPI this cycle ("" : nothing)."""
    if sit.healthy:
        return "completions stall or fail (the canary)" if _completions_fail(sit) else ""
    if sit.orphans_on_port and sit.cleanup:
        return f"orphan pid {sit.orphans_on_port[0].pid} on port {sit.cfg.tabbyapi.port}"
    if sit.starting or sit.unit.active_state == ActiveState.DEACTIVATING:
        return ""
    if sit.obs.health.sticky_unhealthy:
        return "/health 503 unhealthy (sticky until restart)"
    if sit.s.failures >= sit.cfg.tabbyapi.failures_before_down:
        return f"unreachable for {sit.s.failures} probes ({sit.s.last_failure})"
    return ""


def _restart_will_fail(sit: Situation) -> Plan:
    """A restart would fail (the extension misses libraries since a NixOS switch) while the
    running TabbyAPI still has them mapped: a hang, a 503 or an unreachable port is not worth
    trading a live process for one that cannot start. Only a real outage (the process gone:
    this rule no longer holds) is remediated, and then the fresh library check blocks a start
    that would fail. Orphans are still cleaned up (they are not TabbyAPI's running process).
    What would have been restarted (a hang, a 503, an unreachable port) is then left to a
    human, and said so: BLOCKED, not a warning that waits for nothing."""
    trigger = _restart_trigger(sit)
    notes = [say.restart_deferred(trigger, sit.will_fail)] if trigger else []
    phase = Phase.BLOCKED if trigger else Phase.DEGRADED if sit.healthy else Phase.DOWN
    return _enter(sit.s, phase, sit.now), list(sit.cleanup), notes


def _model_missing(sit: Situation) -> bool:
    model = sit.obs.model
    return model is not None and model.known and model.loaded is None and bool(sit.cfg.model.name)


def _key_rejected(sit: Situation) -> bool:
    """TabbyAPI refuses the admin key, as the key_rejected rule (BLOCKED) reads it: the model
    probe's 401, or a load's refusal while a load is wanted. A load's refusal with a model
    loaded is not this (no load is held back): key_rejected_serving makes that DEGRADED."""
    model = sit.obs.model
    if model is not None and model.result.outcome is Outcome.UNAUTHORIZED:
        return True
    return _model_missing(sit) and key_refused(sit.s, sit.obs)


def _serving_fallback(sit: Situation) -> bool:
    model, m = sit.obs.model, sit.cfg.model
    return model is not None and bool(m.fallback) and model.loaded == m.fallback != m.name


def _library_wait(sit: Situation) -> Finding | None:
    """No (re)start, on any path, before this outage's library check (a missing library would
    only turn the restart into a loop); but a check that cannot run (the host check hangs) is
    waited for LIBRARY_CHECK_TRIES cycles, not for ever (then library_check says so)."""
    if library_check_due(sit.s, sit.cfg) and sit.s.library_misses < LIBRARY_CHECK_TRIES:
        return say.library_check_awaited(sit.s.library_misses, sit.obs)
    return None


def _blocker(s: PolicyState, cfg: Config, failed: object, usable: bool, vram_refused: bool) -> str:
    """Why the fallback was loaded: what must clear before the main model is tried early."""
    if failed is not None:
        return "permanent"
    if s.escalated:
        return "escalated"
    if s.load_failures >= cfg.model.max_load_attempts:
        return "failures"
    if not usable:
        return "unusable"
    return "vram" if vram_refused else ""


def _main_retry_due(sit: Situation) -> bool:
    s, cfg, host = sit.s, sit.cfg, sit.obs.host
    # The fallback serves: the main model is tried only on a folder seen usable on a mount
    # seen in place (never on a guess), and not before its load back-off is over.
    main_usable = host.models_dir_ok is True and host.model is not None and host.model.usable
    failed = s.permanent_failure(cfg.model.name) is not None
    if not main_usable or failed or s.load_in_flight or s.escalated or key_refused(s, sit.obs):
        return False
    if s.next_load_at is not None and sit.now < s.next_load_at:
        return False
    # The main model must fit once the fallback gives its VRAM back (a load replaces it):
    # retrying a load that cannot fit would only thrash between the two.
    need = vram_needed(cfg, host.model, fallback=False)
    free = vram_free(sit.obs.gpus, cfg.gpu.device)
    freed = vram_needed(cfg, host.fallback, fallback=True) or 0
    if need is not None and free is not None and need > free + freed:
        return False
    # What made the fallback necessary has cleared, or the slow timer says: try again.
    cleared = {
        "failures": s.load_failures < cfg.model.max_load_attempts,  # a fresh process
        "vram": True,  # it fits now (checked above)
        "unusable": True,  # the folder is usable again (checked above)
        "permanent": True,  # the config, folder or process changed (checked above)
    }.get(s.fallback_blocker, False)
    due = s.main_retry_at is not None and sit.now >= s.main_retry_at
    return cleared or due


def _fallback_serving(sit: Situation) -> Plan:
    """Serving, but the fallback: degraded (WARNING), never "recovered"; the main model is
    tried again when its blocker clears, or hourly (restart_loop.backoff_max)."""
    s, cfg, now = sit.s, sit.cfg, sit.now
    if s.main_retry_at is None:
        s = changed(s, main_retry_at=now + cfg.restart_loop.backoff_max)
    if not _main_retry_due(changed(sit, s=s)):
        return _enter(s, Phase.DEGRADED, now), list(sit.cleanup), []
    name = cfg.model.name
    need = vram_needed(cfg, sit.obs.host.model, fallback=False)
    s = changed(
        s,
        load_in_flight=name,
        load_started=now,
        next_load_at=now + backoff_delay(s.load_failures + 1, cfg),
        using_fallback=False,
        main_retry_at=now + cfg.restart_loop.backoff_max,
    )
    why = f"serving the fallback {cfg.model.fallback}: trying {name} again (it replaces it)"
    load = LoadModel(name, need, Reason(Rule.FALLBACK_MODEL, why))
    return _enter(s, Phase.LOADING, now), [*sit.cleanup, load], []


def _model_unknown(sit: Situation) -> bool:
    return sit.obs.model is None or not sit.obs.model.known


DOWN = "TabbyAPIDown"
ORPHANS = "TabbyAPIDown: orphans, zombie on the port"
NO_MODEL = "TabbyAPINoModel"
LOOP = "TabbyAPIRestartLoop"
SLOW = "TabbyAPISlowHealthCheck"

PLAN: tuple[PlanRule, ...] = (
    # The watchdog's own fault (out of descriptors, memory, threads): the other probes may be as
    # blind, so nothing is acted on until it can see again. Verdict UNKNOWN.
    PlanRule(
        "impaired",
        "",
        (Rule.WATCHDOG_IMPAIRED,),
        lambda x: x.obs.health.result.outcome is Outcome.LOCAL_ERROR,
        _stay(Phase.UNKNOWN, cleanup=False),
        sees=False,
    ),
    # Nothing to restart, or nothing that may be restarted around.
    PlanRule(
        "unit_missing",
        DOWN,
        (Rule.DOWN,),
        lambda x: x.unit.available and not x.unit.exists,
        _stay(Phase.BLOCKED, cleanup=False),
    ),
    PlanRule(
        "foreign_on_port",
        "Port conflict with a foreign process",
        (Rule.FOREIGN_HOLDER,),
        lambda x: x.foreign_on_port,
        _stay(Phase.BLOCKED),
    ),
    # The running TabbyAPI is the last one that works until the venv is rebuilt: no restart for
    # anything short of its process being gone. A model load is no restart: those go on, and
    # the rules below that could restart (an orphan, the back-off, a hang) stand aside too.
    PlanRule(
        "restart_will_fail",
        "Library path issues after a NixOS rebuild",
        (Rule.RESTART_WILL_FAIL, Rule.SYSTEM_SWITCHED),
        lambda x: (
            bool(x.will_fail)
            and not (x.healthy and (_model_missing(x) or bool(x.s.load_in_flight)))
        ),
        _restart_will_fail,
    ),
    PlanRule(
        "orphan_on_port",
        ORPHANS,
        (Rule.PORT_CONFLICT, Rule.ORPHAN_CLEANUP),
        lambda x: (
            bool(x.orphans_on_port)
            and bool(x.cleanup)
            and x.s.backoff_step == 0
            and not x.will_fail
        ),
        _orphan_on_port,
    ),
    # /health not asked (WITHHELD): whoever holds the port is not verified as TabbyAPI, so
    # nothing it says, and nothing it keeps from TabbyAPI, is evidence to restart, stop or load
    # on (findings.unverified_health says who). Orphan cleanup, verified by /proc, goes on.
    PlanRule(
        "health_unverified",
        "Port conflict with a foreign process",
        (Rule.FOREIGN_HOLDER,),
        lambda x: x.obs.health.result.outcome is Outcome.WITHHELD,
        _stay(Phase.BLOCKED),
    ),
    PlanRule(
        "backoff",
        LOOP,
        (Rule.RESTART_LOOP, Rule.BACKOFF_ATTEMPT, Rule.ESCALATION),
        lambda x: (
            x.s.backoff_step > 0 and (not x.healthy or _completions_fail(x)) and not x.will_fail
        ),
        _backoff,
    ),
    # TabbyAPI answers /health.
    PlanRule(
        "generation_hang",
        SLOW,
        (Rule.GENERATION_HANG,),
        lambda x: x.healthy and _completions_fail(x) and not x.will_fail,
        _generation_hang,
        settles=True,
    ),
    PlanRule(
        "no_model",
        NO_MODEL,
        (Rule.NO_MODEL, Rule.VRAM_CHECK, Rule.FALLBACK_MODEL),
        lambda x: x.healthy and _model_missing(x) and not _key_rejected(x),
        _no_model,
        settles=True,
    ),
    PlanRule(
        "loading",
        NO_MODEL,
        (),
        lambda x: x.healthy and bool(x.s.load_in_flight),
        _stay(Phase.LOADING),
        settles=True,
    ),
    PlanRule(
        "key_rejected",
        NO_MODEL,
        (Rule.ADMIN_KEY_REJECTED,),
        lambda x: x.healthy and _key_rejected(x),
        _stay(Phase.BLOCKED),
        settles=True,
    ),
    # A refused key with a model loaded: TabbyAPI serves, but a lost model could not be loaded
    # again (nor, on a 401 canary, generation checked). Not OK while that finding stands.
    PlanRule(
        "key_rejected_serving",
        NO_MODEL,
        (Rule.ADMIN_KEY_REJECTED,),
        lambda x: x.healthy and any(f.rule is Rule.ADMIN_KEY_REJECTED for f in x.findings),
        _stay(Phase.DEGRADED),
        settles=True,
    ),
    PlanRule(
        "unverified",
        SLOW,
        (Rule.CANARY_PENDING,),
        lambda x: (
            x.healthy
            and x.s.canary_verdict is CanaryVerdict.UNVERIFIED
            and not canary_impossible(x.obs, x.cfg)
        ),
        _stay(Phase.RECOVERING),
        settles=True,
    ),
    PlanRule(
        "fallback_serving",
        NO_MODEL,
        (Rule.FALLBACK_MODEL,),
        lambda x: x.healthy and _serving_fallback(x),
        _fallback_serving,
        settles=True,
    ),
    PlanRule(
        "slow",
        SLOW,
        (Rule.SLOW_HEALTH,),
        lambda x: x.healthy and x.s.slow_streak >= x.cfg.tabbyapi.slow_probes,
        _stay(Phase.DEGRADED),
        settles=True,
    ),
    # No model configured and none loaded: no canary can be sent (it goes only to a loaded
    # model), so waiting for one would never end. Healthy on /health alone, and said so; a
    # model loaded by hand later gets its canary (the verdict stays UNVERIFIED until then).
    # After slow: the skipped canary settles nothing a slow /health says.
    PlanRule(
        "canary_impossible",
        SLOW,
        (Rule.CANARY_PENDING,),
        lambda x: (
            x.healthy
            and x.s.canary_verdict is CanaryVerdict.UNVERIFIED
            and canary_impossible(x.obs, x.cfg)
        ),
        _stay(Phase.HEALTHY),
        settles=True,
    ),
    PlanRule(
        "model_unknown",
        "",
        (),
        lambda x: x.healthy and _model_unknown(x),
        _keep,
        settles=True,
    ),
    PlanRule(
        "healthy",
        LOOP,
        (Rule.BACKOFF_RESET,),
        lambda x: x.healthy,
        _stay(Phase.HEALTHY),
        settles=True,
    ),
    # TabbyAPI does not answer (or answers 503).
    PlanRule(
        "job_running",
        "",
        (),
        job_under_way,
        _job_running,
    ),
    PlanRule(
        "sticky_unhealthy",
        DOWN,
        (Rule.STICKY_UNHEALTHY,),
        lambda x: x.obs.health.sticky_unhealthy,
        _sticky_unhealthy,
    ),
    PlanRule("starting", DOWN, (Rule.STARTING,), lambda x: x.starting, _starting),
    PlanRule(
        "systemd_restarting",
        LOOP,
        (Rule.RESTART_LOOP,),
        lambda x: x.unit.available and auto_restarting(x.unit),
        _systemd_restarting,
    ),
    PlanRule(
        "unconfirmed",
        "",  # one bad probe is not an outage
        (),
        lambda x: not x.unit_down and x.s.failures < x.cfg.tabbyapi.failures_before_down,
        _keep,
    ),
    PlanRule(
        "check_libraries_first",
        "Library path issues after a NixOS rebuild",
        (Rule.LIBRARY_CHECK,),
        lambda x: _library_wait(x) is not None,
        _check_libraries_first,
    ),
    PlanRule(
        "restart_loop",
        LOOP,
        (Rule.RESTART_LOOP,),
        lambda x: x.in_restart_loop,
        lambda x: _enter_loop(x, x.s, list(x.cleanup)),
    ),
    PlanRule(
        "blocked",
        "Library path issues after a NixOS rebuild",
        (Rule.MISSING_LIBRARIES,),
        lambda x: bool(x.blocking),
        _blocked,
    ),
    PlanRule(
        "full_recovery",
        ORPHANS,
        (Rule.FULL_RECOVERY,),
        lambda x: bool(x.orphans_in_the_way) and x.cfg.orphans.enabled,
        _full_recovery,
    ),
    PlanRule("down", DOWN, (Rule.DOWN,), lambda x: True, _down),
)


# --- 5. always ---------------------------------------------------------------------------------


def _power_targets(obs: Observation, cfg: Config) -> list[tuple[GpuSnapshot, float, float, float]]:
    """(GPU, its limit now, the configured limit, that clamped to the card's constraints) for
    each configured limit whose GPU was read."""
    found = []
    for dev in cfg.gpu.device:
        if dev.power_limit_watts is None:
            continue
        gpu = snapshot_for(dev, obs.gpus.devices)
        if gpu is None or gpu.power.limit_w is None:
            continue
        target = dev.power_limit_watts
        if gpu.power.min_w is not None:
            target = max(target, gpu.power.min_w)
        if gpu.power.max_w is not None:
            target = min(target, gpu.power.max_w)
        found.append((gpu, gpu.power.limit_w, dev.power_limit_watts, target))
    return found


def _power_back_on_target(s: PolicyState, obs: Observation, cfg: Config) -> PolicyState:
    """A GPU whose limit is on target again, by whatever means (set by hand, restored by the
    driver), has nothing left to retry or to say: its hold goes."""
    if not (s.power_denied or s.power_held):
        return s
    on_target = {
        gpu.index
        for gpu, limit, _, target in _power_targets(obs, cfg)
        if abs(limit - target) <= POWER_TOLERANCE_W
    }
    return changed(
        s,
        power_denied=tuple(d for d in s.power_denied if d.gpu_index not in on_target),
        power_held=tuple(d for d in s.power_held if d.gpu_index not in on_target),
    )


def _power_limits(s: PolicyState, obs: Observation, now: float, cfg: Config) -> list[Action]:
    """Preventive: enforce configured power limits at start and whenever they drift (a driver
    reload or GPU reset loses them), clamped to the card's constraints."""
    actions: list[Action] = []
    for gpu, limit, wanted, target in _power_targets(obs, cfg):
        if abs(limit - target) <= POWER_TOLERANCE_W:
            continue
        if any(
            d.gpu_index == gpu.index and d.until > now for d in (*s.power_denied, *s.power_held)
        ):
            continue
        clamped = "" if target == wanted else f" (clamped from {wanted:g} W)"
        actions.append(
            SetPowerLimit(
                gpu.index,
                target,
                Reason(
                    Rule.POWER_LIMIT,
                    f"gpu{gpu.index} limit {limit:g} W, target {target:g} W{clamped}",
                ),
            )
        )
    return actions


def _fallback_route(s: PolicyState, cfg: Config) -> list[Action]:
    """RUNBOOK: while TabbyAPI is down, verify LiteLLM falls back. Once per outage."""
    url = cfg.fallback_route.url
    troubled = s.phase in (Phase.DOWN, Phase.BACKOFF, Phase.ESCALATED)
    if not url or not troubled or s.fallback_route_checked:
        return []
    reason = Reason(Rule.FALLBACK_ROUTE, f"TabbyAPI is {s.phase.value}: is the fallback serving?")
    return [CheckFallbackRoute(url, cfg.fallback_route.model, reason)]


def _wants(s: PolicyState, obs: Observation, now: float, cfg: Config) -> frozenset[Probe]:
    """The expensive probes the next cycle should run, and only when a rule needs them."""
    wants: set[Probe] = set()
    t = cfg.tabbyapi
    serving = obs.health.healthy and obs.model is not None and bool(obs.model.loaded)
    since_canary = None if s.last_canary_at is None else now - s.last_canary_at
    if serving:
        due = t.canary_interval > 0 and (since_canary is None or since_canary >= t.canary_interval)
        slow = s.slow_streak >= t.slow_probes and (
            since_canary is None or since_canary >= t.slow_probes * cfg.watchdog.interval
        )
        # after a restart that followed a bad verdict, as soon as a model is loaded
        unverified = s.canary_verdict is CanaryVerdict.UNVERIFIED
        if due or slow or unverified:
            wants.add(Probe.CANARY)
    if obs.port is not None and any(lst.pid is None for lst in obs.port.listeners):
        wants.add(Probe.PORT_SCAN)
    troubled = s.failures > 0 or s.phase in (
        Phase.DOWN,
        Phase.BACKOFF,
        Phase.ESCALATED,
        Phase.BLOCKED,
        Phase.RECOVERING,
    )
    if s.will_fail and t.venv:
        wants.add(Probe.LIBRARIES)  # re-checked each cycle: it clears once the venv is rebuilt
    # A TabbyAPI being (re)started (systemd's Restart= waiting, or the new process loading before
    # it opens its port) is not diagnosed yet: its journal and an ldd run then only take CPU from
    # the start. They are read once the start failed or outlived startup_grace (the log lines
    # stay in the journal meanwhile).
    settling = auto_restarting(obs.unit) or starting(s, obs, now, cfg)
    if troubled and not settling:
        if t.venv:
            wants.add(Probe.LIBRARIES)
        wants.add(Probe.JOURNAL)
    return frozenset(wants)

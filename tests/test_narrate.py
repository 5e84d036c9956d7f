"""narrate(): edge-triggered events from (before, after, results). Pure: no processes needed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hydra_watchdog.actions import (
    ActionResult,
    KillOrphan,
    LoadModel,
    Reason,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.config import Config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import (
    Health,
    HostReport,
    HttpResult,
    LoadProgress,
    Observation,
    Outcome,
    PauseRequest,
    UnitStatus,
)
from hydra_watchdog.policy_state import Finding, PolicyState, RestartOrigin, RestartRecord
from hydra_watchdog.states import Phase, Rule, Severity
from tests import policy_kit as kit

CFG = Config()
UNIT = CFG.tabbyapi.unit


def _obs(**kw: Any) -> Observation:
    base = Observation(
        at=1000.0,
        health=Health(HttpResult(Outcome.OK, 0.01, 200), healthy=True),
        unit=UnitStatus(name=UNIT, available=True, load_state="loaded", active_state="active"),
        host=HostReport(models_dir_ok=True),
    )
    return replace(base, **kw)


def _kinds(events: tuple[Event, ...]) -> list[EventKind]:
    return [e.kind for e in events]


def test_nothing_happened_nothing_told() -> None:
    s = PolicyState(phase=Phase.HEALTHY, findings=(Finding(Rule.SLOW_HEALTH, Severity.INFO, "x"),))
    assert narrate(s, s, (), (), _obs(), config=CFG, wall=1.0) == ()


def test_a_finding_is_told_once_when_it_appears() -> None:
    oom = Finding(Rule.DOWN, Severity.ERR, "tabbyapi.service failed: oom-kill")
    before = PolicyState(phase=Phase.DOWN)
    after = replace(before, findings=(oom,))
    first = narrate(before, after, (), (), _obs(), config=CFG, wall=5.0)
    assert _kinds(first) == [EventKind.DIAGNOSIS]
    (event,) = first
    assert (event.rule, event.severity, event.message, event.unit, event.wall) == (
        Rule.DOWN,
        Severity.ERR,
        oom.message,
        UNIT,
        5.0,
    )
    assert narrate(after, after, (), (), _obs(), config=CFG, wall=6.0) == ()


def test_state_change_names_both_phases_and_the_cause() -> None:
    before = PolicyState(phase=Phase.HEALTHY)
    after = PolicyState(phase=Phase.DOWN, last_failure="refused x3")
    (event,) = narrate(before, after, (), (), _obs(), config=CFG, wall=1.0)
    assert event.kind is EventKind.STATE_CHANGED
    assert event.message == "healthy -> down: refused x3"
    assert event.severity is Severity.ERR  # CRITICAL verdict
    assert ("HYDRA_PREV_STATE", "healthy") in event.fields
    assert event.state is Phase.DOWN and event.unit == UNIT


def test_entering_backoff_is_a_restart_loop() -> None:
    restarts = tuple(RestartRecord(900.0 + i, RestartOrigin.SYSTEMD) for i in range(4))
    before = PolicyState(phase=Phase.DOWN, restarts=restarts)
    after = replace(before, phase=Phase.BACKOFF, backoff_step=1)
    events = narrate(before, after, (), (), _obs(), config=CFG, wall=1.0)
    # the loop's record first, then the change it decided (said once: not the evidence again)
    assert _kinds(events) == [EventKind.RESTART_LOOP, EventKind.STATE_CHANGED]
    loop, change = events
    assert change.message == "down -> backoff" and change.rule is Rule.RESTART_LOOP
    assert loop.severity is Severity.CRIT and loop.rule is Rule.RESTART_LOOP
    assert "4 restarts" in loop.message and "step 1" in loop.message


def test_escalation_is_told_once() -> None:
    before = PolicyState(phase=Phase.BACKOFF, backoff_step=4)
    after = replace(before, phase=Phase.ESCALATED, escalated=True)
    events = narrate(before, after, (), (), _obs(), config=CFG, wall=1.0)
    assert _kinds(events) == [EventKind.STATE_CHANGED, EventKind.ESCALATED]
    assert events[1].severity is Severity.CRIT
    # still escalated, back in back-off for the next attempt: no second ESCALATED
    again = replace(after, phase=Phase.BACKOFF)
    assert EventKind.ESCALATED not in _kinds(narrate(after, again, (), (), _obs(), config=CFG))
    assert EventKind.RESTART_LOOP not in _kinds(narrate(after, again, (), (), _obs(), config=CFG))


def test_recovery_is_told_but_first_health_is_not() -> None:
    down = PolicyState(phase=Phase.RECOVERING)
    healthy = PolicyState(phase=Phase.HEALTHY)
    assert EventKind.RECOVERED in _kinds(narrate(down, healthy, (), (), _obs(), config=CFG))
    unknown = PolicyState(phase=Phase.UNKNOWN)
    assert _kinds(narrate(unknown, healthy, (), (), _obs(), config=CFG)) == [
        EventKind.STATE_CHANGED
    ]


def test_pause_and_resume() -> None:
    healthy = PolicyState(phase=Phase.HEALTHY)
    paused = PolicyState(phase=Phase.PAUSED)
    obs = _obs(pause=PauseRequest("driver upgrade", None))
    events = narrate(healthy, paused, (), (), obs, config=CFG)
    assert _kinds(events) == [EventKind.STATE_CHANGED, EventKind.PAUSED]
    assert events[1].message == "paused: driver upgrade"
    back = narrate(paused, healthy, (), (), _obs(), config=CFG)
    assert _kinds(back) == [EventKind.STATE_CHANGED, EventKind.RESUMED]


def test_each_result_is_told_with_rule_reason_and_fields() -> None:
    kill = KillOrphan(4242, 100, ("python", "main.py"), 0, Reason(Rule.ORPHAN_CLEANUP, "18 GiB"))
    restart = UnitCommand(UnitVerb.RESTART, UNIT, Reason(Rule.FULL_RECOVERY, "after cleanup"))
    power = SetPowerLimit(1, 300.0, Reason(Rule.POWER_LIMIT, "450 W, want 300 W"))
    results = (
        ActionResult(kill, ResultStatus.OK, "pid 4242 exited after SIGTERM", 1.0),
        ActionResult(restart, ResultStatus.FAILED, "exit 1", 1.0, ErrorKind.COMMAND_FAILED),
        ActionResult(power, ResultStatus.REFUSED, "no", 1.0, ErrorKind.NO_PERMISSION),
        ActionResult(power, ResultStatus.SKIPPED, "skipped: ...", 1.0, ErrorKind.SKIPPED),
    )
    s = PolicyState(phase=Phase.DOWN)
    events = narrate(s, s, [r.action for r in results], results, _obs(), config=CFG)
    assert _kinds(events) == [
        EventKind.ACTION,
        EventKind.ACTION_FAILED,
        EventKind.ACTION_REFUSED,
        EventKind.ACTION_REFUSED,
    ]
    k, r, p, _ = events
    assert (k.rule, k.reason, k.action, k.unit) == (
        Rule.ORPHAN_CLEANUP,
        "18 GiB",
        "kill_orphan",
        UNIT,
    )
    assert ("TARGET_PID", "4242") in k.fields
    assert (r.action, r.severity, r.unit) == ("restart_unit", Severity.ERR, UNIT)
    assert ("HYDRA_ERROR_KIND", "command_failed") in r.fields
    assert ("GPU_INDEX", "1") in p.fields and p.unit == ""
    assert ("HYDRA_ERROR_KIND", "no_permission") in p.fields


def test_dry_run_result_reads_would() -> None:
    restart = UnitCommand(UnitVerb.RESTART, UNIT, Reason(Rule.STICKY_UNHEALTHY, "503"))
    res = ActionResult(restart, ResultStatus.DRY_RUN, f"would restart {UNIT}", 1.0)
    s = PolicyState(phase=Phase.DOWN)
    (event,) = narrate(s, s, [restart], [res], _obs(), config=CFG)
    assert event.kind is EventKind.ACTION and event.message == f"would restart {UNIT}"
    assert ("HYDRA_RESULT", "dry_run") in event.fields


def test_load_progress_in_quarter_steps() -> None:
    s = PolicyState(phase=Phase.LOADING, load_in_flight="m1")
    told = []
    prev: LoadProgress | None = None
    for module in range(0, 161, 8):
        load = LoadProgress("m1", 0.0, module, 160)
        events = narrate(s, s, (), (), _obs(load=load), config=CFG, prev_load=prev)
        told += [e.message for e in events if e.kind is EventKind.LOAD_PROGRESS]
        prev = load
    assert [m.split(": ")[1].split("%")[0] for m in told] == ["0", "25", "50", "75", "100"]


def test_load_started_event_is_an_action_in_progress() -> None:
    load = LoadModel("m1", None, Reason(Rule.NO_MODEL, "healthy, no model"))
    res = ActionResult(load, ResultStatus.IN_PROGRESS, "loading m1 in the background", 1.0)
    s = PolicyState(phase=Phase.NO_MODEL)
    (event,) = narrate(s, s, [load], [res], _obs(), config=CFG)
    assert (event.kind, event.severity, event.action) == (
        EventKind.ACTION,
        Severity.INFO,
        "load_model",
    )
    assert ("HYDRA_MODEL", "m1") in event.fields


def test_a_finding_with_new_numbers_is_not_news() -> None:
    def wait(n: int) -> PolicyState:
        msg = f"back-off step 1: next start attempt in {n}s"
        finding = Finding(Rule.RESTART_LOOP, Severity.CRIT, msg, subject="waiting")
        return PolicyState(phase=Phase.BACKOFF, findings=(finding,))

    assert narrate(wait(599), wait(598), (), (), _obs(), config=CFG) == ()
    worse = PolicyState(
        phase=Phase.BACKOFF,
        findings=(Finding(Rule.RESTART_LOOP, Severity.CRIT, "start limit hit", "stopped"),),
    )
    assert _kinds(narrate(wait(598), worse, (), (), _obs(), config=CFG)) == [EventKind.DIAGNOSIS]


def test_the_wait_of_a_back_off_step_its_loop_record_told_is_not_told_again() -> None:
    """Review 1 item 7: "restart loop: ... back-off step 1, next start attempt in 5s", then at
    the next cycle "back-off step 1: one start attempt after 5s". The wait stands for status;
    it is told only where no loop record of the previous cycle said its step."""
    stopped = Finding(Rule.RESTART_LOOP, Severity.CRIT, "4 restarts: stopped; step 1", "stopped")
    waiting = Finding(Rule.RESTART_LOOP, Severity.CRIT, "back-off step 1: one start", "waiting")
    entered = PolicyState(phase=Phase.BACKOFF, backoff_step=1, findings=(stopped,))
    waits = replace(entered, findings=(waiting,))
    assert narrate(entered, waits, (), (), _obs(), config=CFG) == ()
    assert waits.findings == (waiting,)  # it stands: status shows it
    earlier = replace(entered, backoff_step=0)  # no record of this step before: news
    assert _kinds(narrate(earlier, waits, (), (), _obs(), config=CFG)) == [EventKind.DIAGNOSIS]


def test_a_second_gpus_finding_beside_the_first_is_news() -> None:
    """Same text but for the GPU's digit: not the first one with new numbers."""

    def denied(*gpus: int) -> PolicyState:
        return PolicyState(
            phase=Phase.HEALTHY,
            findings=tuple(
                Finding(Rule.POWER_LIMIT, Severity.WARNING, f"gpu{i}: setting 450 W failed")
                for i in gpus
            ),
        )

    told = narrate(denied(0), denied(0, 1), (), (), _obs(), config=CFG)
    assert [e.message for e in told] == ["gpu1: setting 450 W failed"]
    assert narrate(denied(0, 1), denied(0, 1), (), (), _obs(), config=CFG) == ()


def test_a_change_citing_a_fresh_finding_says_its_text_once() -> None:
    """Issue 23: the diagnosis, then the change it decided with its [rule] but not the text
    again; journald still gets the evidence as the change's HYDRA_REASON."""
    slow = Finding(Rule.SLOW_HEALTH, Severity.WARNING, "/health took 1201 ms (> 1000 ms)")
    before = PolicyState(phase=Phase.HEALTHY)
    after = PolicyState(phase=Phase.DEGRADED, findings=(slow,), cause=slow.message)
    diagnosis, change = narrate(before, after, (), (), _obs(), config=CFG, wall=1.0)
    assert (diagnosis.kind, diagnosis.message) == (EventKind.DIAGNOSIS, slow.message)
    assert (change.kind, change.rule) == (EventKind.STATE_CHANGED, Rule.SLOW_HEALTH)
    assert (change.message, change.reason) == ("healthy -> degraded", slow.message)


def test_a_change_with_no_cause_cites_the_rule_of_its_phase() -> None:
    """healthy -> down with no finding cited is TabbyAPIDown; degraded -> healthy names the
    rule that held the phase, now cleared, with what /health says."""
    (down,) = narrate(
        PolicyState(phase=Phase.HEALTHY),
        PolicyState(phase=Phase.DOWN, last_failure="refused"),
        (),
        (),
        _obs(),
        config=CFG,
    )
    assert (down.rule, down.message) == (Rule.DOWN, "healthy -> down: refused")
    slow = Finding(Rule.SLOW_HEALTH, Severity.WARNING, "/health took 1201 ms (> 1000 ms)")
    degraded = PolicyState(phase=Phase.DEGRADED, findings=(slow,), cause=slow.message)
    (cleared,) = narrate(degraded, PolicyState(phase=Phase.HEALTHY), (), (), _obs(), config=CFG)
    assert cleared.rule is Rule.SLOW_HEALTH
    assert cleared.message == "degraded -> healthy: cleared; /health answered 200 in 10 ms"


def test_a_pause_and_its_end_are_each_said_once() -> None:
    """The pause's finding is the pause's own record (not a diagnosis, then a state change,
    then "paused: why" again); the resume names no phase the state change already named."""
    run = kit.Run()
    why = "maintenance: driver update by alice"
    lines: list[Event] = []
    for t, pause in ((0, None), (5, PauseRequest(why, 3600.0)), (10, PauseRequest(why, 3600.0))):
        before, o = run.state, kit.obs(t, unit=kit.unit(n=0), pause=pause)
        acts = run.step(o)
        lines += narrate(before, run.state, acts, (), o, config=CFG, wall=1e9 + t)
    before, o = run.state, kit.obs(15, unit=kit.unit(n=0))
    acts = run.step(o)
    back = narrate(before, run.state, acts, (), o, config=CFG, wall=1e9 + 15)
    assert sum(why in e.message for e in lines) == 1
    assert next(e.kind for e in lines if e.rule is Rule.PAUSED) is EventKind.PAUSED
    resumed = next(e for e in back if e.kind is EventKind.RESUMED)
    assert run.state.phase.value not in resumed.message

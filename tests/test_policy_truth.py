"""Scenarios for what the policy concludes and says (issues "Say what is true" and "An oracle
for the policy"): each one a runbook situation where the old policy acted or spoke on a guess."""

from __future__ import annotations

from hydra_watchdog.actions import (
    Action,
    KillOrphan,
    LoadModel,
    ResultStatus,
    SetPowerLimit,
    UnitVerb,
)
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import HttpResult, ModelStatus, Outcome, ProcessRole
from hydra_watchdog.policy_state import CanaryVerdict, PolicyState, RestartOrigin
from hydra_watchdog.states import Phase, Rule, Severity
from tests.policy_kit import (
    CFG,
    MAIN,
    PORT,
    Run,
    canary,
    config,
    gpu,
    gpus,
    host,
    loading,
    model,
    obs,
    ok,
    ok_results,
    paused,
    ports,
    proc,
    refused,
    result,
    unit,
)


def _rules(run: Run) -> set[Rule]:
    return {f.rule for f in run.state.findings}


def _unauthorized() -> ModelStatus:
    detail = "HTTP 401: Invalid admin key (the admin key read from the file /etc/k was rejected)"
    return ModelStatus(HttpResult(Outcome.UNAUTHORIZED, 0.01, 401, detail), None, known=False)


# --- a rejected admin key ----------------------------------------------------------------------


def test_a_rejected_admin_key_is_a_critical_finding_not_an_unknown() -> None:
    run = Run()
    acts = run.step(obs(0, model=_unauthorized()))
    assert acts == ()
    assert run.state.phase is Phase.BLOCKED and run.state.phase.verdict.name == "CRITICAL"
    finding = next(f for f in run.state.findings if f.rule is Rule.ADMIN_KEY_REJECTED)
    assert finding.severity is Severity.CRIT
    assert "the file /etc/k" in finding.message and "loads are impossible" in finding.message
    events = narrate(PolicyState(), run.state, acts, (), obs(0), config=CFG)
    assert EventKind.ADMIN_KEY_REJECTED in {e.kind for e in events}


def test_a_401_on_a_load_is_not_a_load_failure_to_back_off_from() -> None:
    run = Run()
    acts = run.step(obs(0, model=model(None)))
    load = next(a for a in acts if isinstance(a, LoadModel))
    rejected = result(
        load, ResultStatus.FAILED, "load refused: HTTP 401", 1, ErrorKind.UNAUTHORIZED
    )
    run.step(obs(1, model=_unauthorized(), results=(rejected,)))
    assert run.state.load_failures == 0  # no back-off step for a key problem
    assert not run.state.load_in_flight
    assert Rule.ADMIN_KEY_REJECTED in _rules(run)


# --- permanent load failures ---------------------------------------------------------------------


def test_a_permanent_load_failure_is_not_retried_and_the_fallback_is_loaded() -> None:
    run = Run()
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    words = (
        "Models quantized with 'exl2' require the exllamav2 backend, which is no longer supported"
    )
    failed = result(load, ResultStatus.FAILED, words, 5, ErrorKind.LOAD_PERMANENT)
    acts = run.step(obs(5, model=model(None), results=(failed,)))
    loads = [a for a in acts if isinstance(a, LoadModel)]
    assert [a.model for a in loads] == ["F"]  # the fallback, at once: no back-off for M
    assert [p.model for p in run.state.permanent] == ["M"]
    crit = [f for f in run.state.findings if f.subject == "permanent M"]
    assert crit and crit[0].severity is Severity.CRIT and "no longer supported" in crit[0].message
    # Much later, nothing relevant changed: M is still not retried.
    fallback_ok = result(loads[0], ResultStatus.OK, "confirmed", 6)
    run.step(obs(6, model=model("F"), results=(fallback_ok,)))
    run.step(obs(6.5, model=model("F"), canary=canary(Outcome.OK)))
    later = [run.step(obs(t, model=model("F"))) for t in range(7, 200, 10)]
    assert not [a for acts in later for a in acts if isinstance(a, LoadModel) and a.model == "M"]
    assert run.state.phase is Phase.DEGRADED  # the fallback is WARNING, not OK


def test_a_permanent_failure_clears_when_tabbyapi_is_restarted_by_someone_else() -> None:
    run = Run()
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    failed = result(
        load, ResultStatus.FAILED, "Could not find the model path", 5, ErrorKind.LOAD_PERMANENT
    )
    run.step(obs(5, model=model(None), results=(failed,)))
    assert [p.model for p in run.state.permanent] == ["M"]
    fresh = unit()
    fresh = type(fresh)(**{**fresh.__dict__, "invocation_id": "inv-2"})
    run.step(obs(6, model=model(None), unit=fresh))
    assert run.state.permanent == ()


def test_a_transient_failure_keeps_the_back_off() -> None:
    run = Run()
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    oom = result(load, ResultStatus.FAILED, "Insufficient VRAM in split", 5, ErrorKind.LOAD_ERROR)
    run.step(obs(5, model=model(None), results=(oom,)))
    assert run.state.load_failures == 1 and run.state.next_load_at is not None
    assert not run.state.permanent


# --- every failed load is told, with TabbyAPI's words --------------------------------------------


def test_every_failed_load_is_an_event_with_attempt_error_and_next_time() -> None:
    run = Run(cfg=config(model={"max_load_attempts": 9}))
    told: list[Event] = []
    t = 0.0
    for attempt in (1, 2, 3):
        acts: tuple[Action, ...] = ()
        while not any(isinstance(a, LoadModel) for a in acts):
            t += 1
            acts = run.step(obs(t, model=model(None)))
        load = next(a for a in acts if isinstance(a, LoadModel))
        prev = run.state
        t += 1
        o = obs(
            t,
            model=model(None),
            results=(
                result(load, ResultStatus.FAILED, f"OOM #{attempt}", t, ErrorKind.LOAD_ERROR),
            ),
        )
        run.step(o)
        told += [
            e
            for e in narrate(prev, run.state, (), (), o, config=run.cfg, wall=1e9)
            if e.kind is EventKind.LOAD_FAILED
        ]
    assert [e.message.split(": ")[1].split(";")[0] for e in told] == ["OOM #1", "OOM #2", "OOM #3"]
    assert all("attempt" in e.message and "next attempt at" in e.message for e in told)


# --- completions: a verdict stands until a newer canary ------------------------------------------


def test_a_hang_is_not_forgotten_when_the_next_cycle_runs_no_canary() -> None:
    run = Run()
    run.step(obs(0, pause=paused()))
    run.step(obs(1, canary=canary(Outcome.TIMEOUT), pause=paused()))  # seen, cannot act
    acts = run.step(obs(2))  # resumed, no canary this cycle: the hang still stands
    assert [a.verb for a in acts if hasattr(a, "verb")] == [UnitVerb.RESTART]
    assert run.state.phase is Phase.RECOVERING
    finding = next(f for f in run.state.findings if f.rule is Rule.GENERATION_HANG)
    assert "completions stalled while /health is 200" in finding.message


def test_a_failed_canary_is_evidence_as_strong_as_a_hung_one() -> None:
    run = Run()
    acts = run.step(obs(0, canary=canary(Outcome.HTTP_ERROR)))
    assert [a.verb for a in acts if hasattr(a, "verb")] == [UnitVerb.RESTART]
    assert run.state.canary_verdict is CanaryVerdict.FAILED


def test_recovery_from_a_hang_needs_a_passing_canary_after_the_restart() -> None:
    run = Run()
    acts = run.step(obs(0, canary=canary(Outcome.TIMEOUT)))
    restart = ok_results(acts, 1)
    run.step(obs(1, health=refused(), results=restart, unit=unit(enter=0.5)))
    assert run.state.canary_verdict is CanaryVerdict.UNVERIFIED
    run.step(obs(3, unit=unit(enter=0.5)))  # /health 200 and the model: what the hang looked like
    assert run.state.phase is Phase.RECOVERING  # not HEALTHY
    assert "canary" in {p.value for p in run.state.wants}
    run.step(obs(4, unit=unit(enter=0.5), canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY


def test_a_hang_that_cannot_be_acted_on_never_turns_into_healthy() -> None:
    run = Run()
    libs = host(missing_libraries=("libcudart.so.12",))  # a restart would fail: deferred
    run.step(obs(0, canary=canary(Outcome.TIMEOUT), host=libs))
    assert run.state.phase is not Phase.HEALTHY and not run.unit_commands()
    for t in range(1, 5):
        run.step(obs(t, host=host(libraries_checked=False)))
        assert run.phase() is not Phase.HEALTHY
        assert Rule.GENERATION_HANG in _rules(run)


# --- only restarts that ran count ----------------------------------------------------------------


def test_a_skipped_restart_gives_back_its_place_in_the_budget() -> None:
    run = Run()
    acts = run.step(obs(0, canary=canary(Outcome.TIMEOUT)))
    assert run.state.restarts_in_window(0, 60, RestartOrigin.WATCHDOG) == 1
    skipped = tuple(result(a, ResultStatus.SKIPPED, "an earlier action failed", 1) for a in acts)
    again = run.step(obs(1, results=skipped))
    # The one that never ran is gone; the hang still stands, so this cycle tries again.
    assert [a.verb for a in again if hasattr(a, "verb")] == [UnitVerb.RESTART]
    assert run.state.restarts_in_window(1, 60, RestartOrigin.WATCHDOG) == 1


def test_an_orphan_that_survives_sigkill_is_not_tried_again_and_blocks() -> None:
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=18)
    node = {"health": refused(), "unit": unit("failed", "failed", result="exit-code"),
            "processes": (orphan,), "gpus": gpus()}  # fmt: skip
    run = Run()
    acts = run.step(obs(0, **node))
    kill = next(a for a in acts if isinstance(a, KillOrphan))
    survived = result(kill, ResultStatus.FAILED, "survived SIGKILL", 1, ErrorKind.UNKILLABLE)
    acts = run.step(obs(1, results=(survived,), **node))
    assert not [a for a in acts if isinstance(a, KillOrphan)]
    assert Rule.UNKILLABLE_ORPHAN in _rules(run)
    assert run.state.phase is Phase.BLOCKED
    assert not run.unit_commands(UnitVerb.START)[1:]  # no second start around it


# --- systemd restarts seen late ------------------------------------------------------------------


def test_restarts_seen_after_a_long_gap_are_not_a_burst() -> None:
    run = Run()
    run.step(obs(0, unit=unit(n=0)))
    run.step(obs(3600, unit=unit(n=4)))  # the watchdog was away for an hour
    assert run.state.restarts_in_window(3600, 60) == 0
    late = [f for f in run.state.findings if f.subject == "late"]
    assert late and "unknown" in late[0].message
    assert run.state.backoff_step == 0


# --- the fallback is degraded, and the main model comes back -------------------------------------


def test_the_fallback_is_degraded_and_the_main_model_is_retried_when_it_can_be() -> None:
    run = Run(cfg=config(model={"max_load_attempts": 1}))
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    run.step(
        obs(
            1,
            model=model(None),
            results=(result(load, ResultStatus.FAILED, "OOM", 1, ErrorKind.LOAD_ERROR),),
        )
    )
    fb = [
        a
        for t in range(2, 30)
        for a in run.step(obs(t, model=model(None)))
        if isinstance(a, LoadModel)
    ]
    assert fb and fb[0].model == "F"
    run.step(obs(31, model=model("F"), results=(result(fb[0], ResultStatus.OK, "ok", 31),)))
    run.step(obs(31.5, model=model("F"), canary=canary(Outcome.OK)))
    assert run.state.phase is Phase.DEGRADED
    assert Rule.FALLBACK_MODEL in _rules(run)
    # A new TabbyAPI process: the failures that forced the fallback are forgotten: retry M,
    # once a canary has passed on it (a new process serves nothing until one does).
    fresh = unit()
    fresh = type(fresh)(**{**fresh.__dict__, "invocation_id": "inv-2"})
    assert not run.step(obs(32, model=model("F"), unit=fresh))
    assert run.phase() is Phase.RECOVERING
    acts = run.step(obs(33, model=model("F"), unit=fresh, canary=canary(Outcome.OK)))
    assert [a.model for a in acts if isinstance(a, LoadModel)] == ["M"]


# --- libraries, power, pause, escalation ---------------------------------------------------------


def test_a_known_missing_library_blocks_until_a_fresh_check_says_fixed() -> None:
    run = Run()
    down = {"health": refused(), "unit": unit("failed", "failed", result="exit-code")}
    run.step(obs(0, host=host(missing_libraries=("libcudart.so.12",)), **down))
    assert run.state.phase is Phase.BLOCKED
    for t in range(1, 4):  # checks not run these cycles: the knowledge stands
        assert not run.step(obs(t, host=host(libraries_checked=False), **down))
        assert Rule.MISSING_LIBRARIES in _rules(run)
    acts = run.step(obs(4, host=host(missing_libraries=()), **down))  # fixed
    assert UnitVerb.START in [a.verb for a in acts if hasattr(a, "verb")]


def test_the_power_limit_failure_clears_after_a_retry_succeeds() -> None:
    run = Run()
    low = gpus(limit0=300.0)
    acts = run.step(obs(0, gpus=low))
    setter = next(a for a in acts if isinstance(a, SetPowerLimit))
    run.step(obs(1, gpus=low, results=(result(setter, ResultStatus.FAILED, "no permission", 1),)))
    assert Rule.POWER_LIMIT in _rules(run)
    acts = run.step(obs(3700, gpus=low))
    setter = next(a for a in acts if isinstance(a, SetPowerLimit))
    run.step(obs(3701, gpus=gpus(), results=(result(setter, ResultStatus.OK, "set", 3701),)))
    assert Rule.POWER_LIMIT not in _rules(run)


def test_after_resume_the_phase_is_not_paused() -> None:
    run = Run()
    run.step(obs(0, pause=paused()))
    assert run.state.phase is Phase.PAUSED
    slow_model = ModelStatus(HttpResult(Outcome.TIMEOUT, 3.0, None, "timeout"), None, known=False)
    run.step(obs(1, model=slow_model))  # /health 200, /v1/model times out: nothing known
    assert run.state.phase is not Phase.PAUSED


def test_escalation_is_announced_once_per_escalation() -> None:
    run = Run()
    down = {"health": refused(), "unit": unit("failed", "failed", result="exit-code", n=0)}
    escalations = 0
    prev = run.state
    for t in range(0, 400):
        o = obs(float(t), **down)
        acts = run.step(o)
        events = narrate(prev, run.state, acts, ok_results(acts, t), o, config=run.cfg, wall=1e9)
        escalations += sum(1 for e in events if e.kind is EventKind.ESCALATED)
        prev = run.state
    assert run.state.escalated
    assert escalations == 1


def test_an_unchanged_pause_is_announced_once() -> None:
    run = Run()
    prev = run.state
    told = 0
    for t in range(0, 200, 7):
        o = obs(float(t), pause=paused(until=10_000.0))
        run.step(o)
        told += sum(
            1
            for e in narrate(prev, run.state, (), (), o, config=CFG)
            if e.rule is Rule.PAUSED and e.kind in (EventKind.DIAGNOSIS, EventKind.PAUSED)
        )
        prev = run.state
    assert told == 1


def test_a_state_change_cites_the_finding_that_caused_it() -> None:
    run = Run()
    run.step(obs(0))
    prev = run.state
    o = obs(1, canary=canary(Outcome.TIMEOUT), gpus=gpus())
    acts = run.step(o)
    told = narrate(prev, run.state, acts, (), o, config=CFG)
    change = next(e for e in told if e.kind is EventKind.STATE_CHANGED)
    # said once (issue 23): the finding's own record says it; the change cites its rule, and
    # keeps the evidence for journald (HYDRA_REASON)
    assert change.rule is Rule.GENERATION_HANG and "completions stalled" in change.reason
    assert any("completions stalled" in e.message for e in told[: told.index(change)])


def test_kit_sanity() -> None:
    assert MAIN.listens_on == (PORT,) and ports((PORT, 100)).owners(PORT) == (100,)
    assert gpu(0, free_gib=1.0).index == 0 and loading().model == "M" and ok().healthy

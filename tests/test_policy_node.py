"""What an independent model of the node found (issue 23 item 12), each class as a minimal story
on a fake clock (the oracle, tests/oracle/, runs the same stories among its random traces).

A story fails on the policy before its fix: each test names the line that was wrong."""

from __future__ import annotations

import dataclasses
import itertools

from hydra_watchdog.actions import (
    Action,
    LoadModel,
    Reason,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import (
    GpuReport,
    Health,
    HostReport,
    HttpResult,
    ModelDir,
    NvmlErrorKind,
    Observation,
    Outcome,
    ProcessRole,
    UnitStatus,
)
from hydra_watchdog.policy_state import (
    CanaryVerdict,
    PolicyState,
    RestartOrigin,
    RestartRecord,
)
from hydra_watchdog.situation import LIBRARY_CHECK_TRIES, tabby_process
from hydra_watchdog.states import Phase, Rule
from tests.policy_kit import (
    MAIN,
    PORT,
    Run,
    canary,
    config,
    gpus,
    host,
    model,
    obs,
    ok_results,
    paused,
    ports,
    proc,
    refused,
    result,
    sticky,
    timeout,
    unit,
)

VENV = config(tabbyapi={"venv": "/opt/tabbyapi/venv"})
LIBS_GONE = host(missing_libraries=("libcudart.so.12",))
HUNG = host(  # the host check did not answer: neither the folders nor the libraries read
    models_dir_ok=None,
    models_dir_detail="not checked: the host check did not answer within 12 s",
    libraries_checked=False,
    model=None,
    fallback=None,
)


def invocation(u: UnitStatus, inv: str, **kw: object) -> UnitStatus:
    return dataclasses.replace(u, invocation_id=inv, **kw)  # type: ignore[arg-type]


def starts(acts: tuple[Action, ...]) -> list[UnitCommand]:
    return [
        a
        for a in acts
        if isinstance(a, UnitCommand) and a.verb in (UnitVerb.START, UnitVerb.RESTART)
    ]


def recovered(run: Run, o: Observation) -> bool:
    """Step `o`; True when that cycle says "recovered"."""
    prev = run.state
    acts = run.step(o)
    events = narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)
    return any(e.kind is EventKind.RECOVERED for e in events)


# --- "recovered" and HEALTHY after any restart only after a passing canary -----------------------


def test_a_crash_that_systemd_restarted_is_not_recovered_before_a_canary() -> None:
    """Old: a crash, systemd's Restart=, "recovered" at the next cycle with no canary."""
    run = Run()
    run.step(obs(0))
    crashed = unit("activating", "auto-restart", result="signal", n=0)
    run.step(obs(1, health=refused(), unit=crashed))
    back = invocation(unit(enter=3, n=1), "inv-2")
    assert not recovered(run, obs(8, unit=back))
    assert run.state.phase is Phase.RECOVERING
    assert run.state.canary_verdict is CanaryVerdict.UNVERIFIED
    assert "canary" in {p.value for p in run.state.wants}
    assert recovered(run, obs(9, unit=back, canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY


def test_a_restart_by_hand_needs_a_canary_too() -> None:
    """A human's `systemctl restart` between two cycles: a new InvocationID, NRestarts 0."""
    run = Run()
    run.step(obs(0))
    run.step(obs(1, unit=invocation(unit(enter=0.5), "inv-by-hand")))
    assert run.state.phase is Phase.RECOVERING
    run.step(obs(2, unit=invocation(unit(enter=0.5), "inv-by-hand"), canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY


def test_without_systemd_a_new_process_on_the_port_needs_a_canary() -> None:
    """No unit to ask: TabbyAPI's process is told apart by its pid and start ticks."""
    run = Run()
    nosd = unit(available=False, enter=None)
    first = proc(300, ProcessRole.ORPHAN, listens=(PORT,))
    run.step(obs(0, unit=nosd, port=ports((PORT, 300)), processes=(first,)))
    assert run.state.phase is Phase.HEALTHY
    again = dataclasses.replace(first, start_ticks=first.start_ticks + 500)  # the pid reused
    run.step(obs(1, unit=nosd, port=ports((PORT, 300)), processes=(again,)))
    assert run.phase() is Phase.RECOVERING
    # The same process, read again (or not seen this cycle): nothing new.
    run.step(obs(2, unit=nosd, port=ports(), processes=(), canary=canary(Outcome.OK)))
    run.step(obs(3, unit=nosd, port=ports((PORT, 300)), processes=(again,)))
    assert run.phase() is Phase.HEALTHY


def test_what_answers_after_a_closed_port_was_started_since() -> None:
    """Refused: nothing listened. What answers next was started since, even where it cannot
    be told apart by its process (no systemd, no listener seen): a canary first."""
    run = Run()
    nosd = {"unit": unit(available=False, enter=None), "port": ports(), "processes": ()}
    run.step(obs(0, **nosd))
    for t in range(1, 4):
        run.step(obs(t, health=refused(), **nosd))
    assert not recovered(run, obs(4, **nosd))
    assert run.state.phase is Phase.RECOVERING
    assert recovered(run, obs(5, canary=canary(Outcome.OK), **nosd))


# --- no restart while restart_will_fail stands, nor before this outage's library check ----------


def _will_fail(run: Run) -> None:
    """A switch removed libcudart: TabbyAPI runs on what it mapped before (restart_will_fail)."""
    run.step(obs(0, host=host(missing_libraries=())))
    run.step(obs(1, host=LIBS_GONE))
    assert run.state.will_fail == ("libcudart.so.12",)


def test_a_failed_canary_and_an_unloaded_model_do_not_restart_while_it_would_fail() -> None:
    """Old: `restart tabbyapi.service [generation_hang]` once the model was gone."""
    run = Run(cfg=VENV)
    _will_fail(run)
    run.step(obs(2, canary=canary(Outcome.HTTP_ERROR)))
    assert run.state.canary_verdict is CanaryVerdict.FAILED
    for t in range(3, 12):
        acts = run.step(obs(t, model=model(None)))
        assert not starts(acts), acts
    assert any(isinstance(a, LoadModel) for a in run.actions)  # a load is no restart


def test_no_back_off_attempt_while_a_restart_would_fail() -> None:
    run = Run(cfg=VENV)
    _will_fail(run)
    run.state = dataclasses.replace(
        run.state,
        backoff_step=1,
        backoff_until=2.0,
        loop_since=0.0,
        canary_verdict=CanaryVerdict.FAILED,
    )
    for t in range(3, 12):  # neither a start nor a stop of the process that still works
        assert not [a for a in run.step(obs(t, model=model(None))) if isinstance(a, UnitCommand)]


def test_no_restart_for_an_orphan_while_a_restart_would_fail() -> None:
    run = Run(cfg=VENV)
    _will_fail(run)
    orphan = proc(300, ProcessRole.ORPHAN, listens=(PORT,))
    main = proc(100, ProcessRole.MAIN, listens=(PORT,))
    acts = run.step(
        obs(3, model=model(None), port=ports((PORT, 100), (PORT, 300)), processes=(main, orphan))
    )
    assert not starts(acts)
    assert [a.kind for a in acts] == ["kill_orphan", "load_model"]


def test_a_generation_hang_restart_waits_for_this_outages_library_check() -> None:
    """Old: a generation-hang restart with no library check at all while the libraries were
    gone; the check had run only before the outage."""
    run = Run(cfg=VENV)
    run.step(obs(0, host=host(missing_libraries=())))  # a check, long before
    unchecked = host(libraries_checked=False)
    acts = run.step(obs(100, host=unchecked, canary=canary(Outcome.TIMEOUT)))
    assert not starts(acts)
    assert run.state.phase is Phase.DOWN
    assert "libraries" in {p.value for p in run.state.wants}
    [wait] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert "no (re)start before this outage's library check" in wait.message
    run2 = Run(cfg=VENV, state=run.state)
    run2.step(obs(100.5, host=unchecked))  # asked for, not run
    [wait] = [f for f in run2.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert "not run yet (1 cycle(s) without it)" in wait.message
    # The check runs and finds them gone under the running process: never restarted.
    for t in range(101, 110):
        assert not starts(run.step(obs(t, host=LIBS_GONE if t == 101 else unchecked)))
    assert run.state.will_fail == ("libcudart.so.12",)
    assert any(
        f.subject == "deferred" for f in run.state.findings if f.rule is Rule.RESTART_WILL_FAIL
    )


def test_after_the_library_check_the_hang_is_restarted() -> None:
    run = Run(cfg=VENV)
    run.step(obs(0, host=host(missing_libraries=())))
    run.step(obs(100, host=host(libraries_checked=False), canary=canary(Outcome.TIMEOUT)))
    acts = run.step(obs(101, host=host(missing_libraries=())))
    assert [(a.verb, a.reason.rule) for a in starts(acts)] == [
        (UnitVerb.RESTART, Rule.GENERATION_HANG)
    ]


# --- a check that cannot run never blocks recovery for ever --------------------------------------


def test_a_hung_host_check_delays_the_start_a_few_cycles_and_says_why() -> None:
    """Old: a failed unit never started while the host check hung (an hour and more)."""
    run = Run(cfg=VENV)
    run.step(obs(0, host=host(missing_libraries=())))
    hung = HUNG
    down = {"health": refused(), "unit": unit("failed", "failed", result="exit-code")}
    waited = 0
    for t in range(1, 40):
        acts = run.step(obs(t, host=hung, **down))
        if starts(acts):
            break
        waited += 1
        [wait] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
        assert "did not answer within 12 s" in wait.message
    assert waited == LIBRARY_CHECK_TRIES  # asked, and missed TRIES times (the last one starts)
    [said] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert said.message.startswith("the library check could not run in 3 cycles (not checked")
    assert said.message.endswith("(re)starts go ahead without it")


def test_a_back_off_attempt_waits_for_the_library_check_a_few_cycles() -> None:
    run = Run(cfg=VENV)
    run.state = dataclasses.replace(
        run.state, phase=Phase.BACKOFF, backoff_step=1, backoff_until=1.0, trouble_since=0.0
    )
    stopped = {"health": refused(), "unit": unit("inactive", "dead"), "host": HUNG}
    for t in range(1, 10):
        if starts(run.step(obs(t, **stopped))):
            break
    assert t == 1 + LIBRARY_CHECK_TRIES  # due at 1: asked, then missed TRIES times
    [said] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert said.subject == "skipped"


def test_a_full_recovery_stops_nothing_before_the_library_check() -> None:
    """check_libraries_first comes before the full recovery: no stop of TabbyAPI and no GPU
    reset for a start that may not be allowed (issue 23 item 11: a mutant dropped it)."""
    run = Run(cfg=VENV)
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=10.0)
    down = {
        "health": refused(),
        "host": host(libraries_checked=False),
        "processes": (orphan,),
        "port": ports(),
    }
    for t in range(1, 4):
        acts = run.step(obs(t, **down))
    assert not [a for a in acts if isinstance(a, UnitCommand)], acts
    assert run.state.phase is Phase.DOWN
    acts = run.step(obs(4, **{**down, "host": host(missing_libraries=())}))
    assert [a.verb for a in acts if isinstance(a, UnitCommand)] == [UnitVerb.STOP, UnitVerb.START]


# --- an impaired watchdog acts on nothing; the power finding clears once on target ---------------


def test_an_impaired_watchdog_sets_no_power_limit_and_checks_no_route() -> None:
    """Old: `_power_limits` ran after the impaired rule (179 hits)."""
    run = Run(cfg=config(fallback_route={"url": "http://127.0.0.1:4000"}))
    run.step(obs(0))
    blind = Health(HttpResult(Outcome.LOCAL_ERROR, 0.0, None, "out of descriptors (EMFILE)"), False)
    for t in range(1, 5):
        assert run.step(obs(t, health=blind, gpus=gpus(limit0=575.0))) == ()
    assert run.state.phase is Phase.UNKNOWN
    acts = run.step(obs(5, gpus=gpus(limit0=575.0)))  # seeing again: the drift is mended
    assert [(a.gpu_index, a.watts) for a in acts if isinstance(a, SetPowerLimit)] == [(0, 450.0)]


def test_the_power_finding_clears_once_the_limit_is_back_on_target() -> None:
    """Old: "setting the power limit ... failed; retried hourly" stood for hours after the
    limit was put back by hand (or restored, or the refusal was for a drift that went)."""
    run = Run()
    acts = run.step(obs(0, gpus=gpus(limit0=575.0)))
    denied = result(acts[0], ResultStatus.FAILED, "NoPermission", 0.1, ErrorKind.NO_PERMISSION)
    run.step(obs(1, gpus=gpus(limit0=575.0), results=(denied,)))
    assert [f.rule for f in run.state.findings] == [Rule.POWER_LIMIT]
    run.step(obs(2, gpus=gpus(limit0=450.0)))  # set by hand
    assert run.state.findings == () and run.state.power_denied == ()
    # Should it drift again, it is mended at once (and a refusal said again).
    acts = run.step(obs(3, gpus=gpus(limit0=575.0)))
    assert [a.watts for a in acts if isinstance(a, SetPowerLimit)] == [450.0]


def test_an_unread_gpu_keeps_its_power_hold() -> None:
    run = Run()
    acts = run.step(obs(0, gpus=gpus(limit0=575.0)))
    denied = result(acts[0], ResultStatus.FAILED, "NoPermission", 0.1, ErrorKind.NO_PERMISSION)
    run.step(obs(1, gpus=gpus(limit0=575.0), results=(denied,)))
    run.step(obs(2, gpus=GpuReport(error=NvmlErrorKind.DRIVER_NOT_LOADED, detail="gone")))
    assert [d.gpu_index for d in run.state.power_denied] == [0]


# --- no escalation the cycle after "recovered", nor during a pause -------------------------------


def _long_loop() -> Run:
    return Run(
        state=PolicyState(
            phase=Phase.RECOVERING, backoff_step=3, loop_since=0.0, recovery_started=190.0
        )
    )


def test_no_escalation_the_cycle_after_recovered() -> None:
    """Old: `escalated` was set from loop_since before health was looked at."""
    run = _long_loop()
    assert recovered(run, obs(199, canary=canary(Outcome.OK)))
    assert not recovered(run, obs(200))
    assert not run.state.escalated and run.state.phase is Phase.HEALTHY
    assert not [f for f in run.state.findings if f.rule is Rule.ESCALATION]


def test_no_escalation_during_a_pause() -> None:
    run = _long_loop()
    for t in range(199, 400, 10):
        run.step(obs(t, health=refused(), unit=unit("inactive", "dead"), pause=paused()))
        assert not run.state.escalated
    run.step(obs(400, health=refused(), unit=unit("inactive", "dead")))  # resumed, still down
    assert run.state.escalated


# --- while the fallback serves ------------------------------------------------------------------


def _on_the_fallback(run: Run, blocker: str = "vram") -> None:
    run.state = dataclasses.replace(
        run.state,
        phase=Phase.DEGRADED,
        using_fallback=True,
        fallback_blocker=blocker,
        main_retry_at=10_000.0,
        canary_verdict=CanaryVerdict.OK,
    )


def test_the_main_model_is_not_loaded_with_the_models_mount_missing() -> None:
    """Old: while the fallback served, the main model was loaded with the mount gone."""
    run = Run()
    _on_the_fallback(run)
    gone = host(models_dir_ok=False, models_dir_detail="not a mount point")
    for t in range(0, 5):
        assert not run.step(obs(t, model=model("F"), host=gone))
    hung = host(models_dir_ok=None, models_dir_detail="not checked: timed out", model=None)
    assert not run.step(obs(5, model=model("F"), host=hung))
    acts = run.step(obs(6, model=model("F")))  # back: the blocker (VRAM) cleared, retry
    assert [a.model for a in acts if isinstance(a, LoadModel)] == ["M"]


def test_a_failing_retry_of_the_main_model_keeps_to_the_load_back_off() -> None:
    """Old: next_load_at was cleared whenever any model was loaded, so a retry that failed
    was sent again as soon as the fallback served again (every cycle)."""
    run = Run()
    _on_the_fallback(run)
    loads: list[float] = []
    t = 0.0
    while t < 120:
        acts = run.step(obs(t, model=model("F")))
        for load in (a for a in acts if isinstance(a, LoadModel)):
            failed = load.model == "M"
            if failed:
                loads.append(t)
            status = ResultStatus.FAILED if failed else ResultStatus.OK
            run.step(obs(t + 0.5, model=model(None), results=(result(load, status, "OOM"),)))
        t += 1
    gaps = [b - a for a, b in itertools.pairwise(loads)]
    assert len(loads) >= 2 and all(gap >= 5 for gap in gaps), loads
    assert gaps == sorted(gaps)  # it backs off: the waits grow


# --- minor: announced once; counted alike ---------------------------------------------------------


def test_the_journal_finding_stands_between_reads() -> None:
    """Old: the last log lines went with the cycles that did not read the journal, and came
    back as news with the next read."""
    run = Run()
    down = {"health": refused(), "unit": unit("failed", "failed", result="exit-code")}
    read = host(journal_excerpt=("CUDA out of memory",))
    run.step(obs(0, host=read, **down))
    first = [f for f in run.state.findings if f.subject == "journal"]
    assert first
    for t in range(1, 4):
        prev = run.state
        o = obs(t, **down)  # not read this cycle
        acts = run.step(o)
        assert [f for f in run.state.findings if f.subject == "journal"] == first
        assert not [
            e
            for e in narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)
            if e.message.startswith("last log lines")
        ]
    run.step(obs(4))
    assert not [f for f in run.state.findings if f.subject == "journal"]


def test_a_systemd_restart_is_dated_by_the_unit_not_by_the_cycle_that_saw_it() -> None:
    """Old: a restart that happened at 0.5 s, seen at 1 s, was "within 1m" until 61 s: at
    60.7 s, "2 restarts within 1m" with only 1 in it."""
    run = Run()
    run.step(obs(0, unit=unit(n=0)))
    run.step(obs(1, unit=invocation(unit(n=1, enter=0.5), "inv-2")))
    assert [r.at for r in run.state.restarts] == [0.5]
    assert run.state.restarts_in_window(60.4, 60.0) == 1
    assert run.state.restarts_in_window(60.6, 60.0) == 0


def test_a_restart_exactly_a_window_ago_has_left_it() -> None:
    """Counted as the window is trimmed (`< window`): `status`, between two cycles, reads a
    state whose records were trimmed at the last cycle (the budget and the trim already
    agreed within a cycle, where the trim runs first)."""
    state = PolicyState(restarts=(RestartRecord(0.0, RestartOrigin.SYSTEMD),))
    assert state.restarts_in_window(59.9, 60.0) == 1
    assert state.restarts_in_window(60.0, 60.0) == 0


# --- issue 23 item 11: what two surviving mutants showed untested -------------------------------
# (check_libraries_first dropped from PLAN: test_a_full_recovery_stops_nothing_before_the_...)


def test_a_fresh_process_drops_the_old_load_back_off() -> None:
    """A new TabbyAPI process starts with empty VRAM: its first load goes at once, not at the
    back-off deadline the old process earned (a mutant that kept next_load_at survived)."""
    run = Run()
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    failed = result(load, ResultStatus.FAILED, "CUDA out of memory", 1, ErrorKind.LOAD_ERROR)
    run.step(obs(1, model=model(None), results=(failed,)))
    assert run.state.next_load_at is not None and run.state.next_load_at > 2
    assert not run.step(obs(2, model=model(None)))  # the same process: it waits
    acts = run.step(obs(3, model=model(None), unit=invocation(unit(enter=2.5), "inv-2")))
    assert [a.model for a in acts if isinstance(a, LoadModel)] == ["M"]


# --- issue 23 item 11: the survivors of `make mutants`, each a missing test --------------------

BIG = 1.0e7  # a node up for months: arithmetic that only holds near t=0 shows here


def test_a_back_off_attempt_that_did_not_run_is_tried_again_at_the_same_step() -> None:
    run = Run(state=PolicyState(phase=Phase.BACKOFF, backoff_step=1, backoff_until=1.0))
    stopped = {"health": refused(), "unit": unit("inactive", "dead")}
    [start] = starts(run.step(obs(1, **stopped)))
    refused_ = result(start, ResultStatus.REFUSED, "job failed: dependency", 1.5)
    run.step(obs(2, results=(refused_,), **stopped))
    assert run.state.backoff_step == 1 and run.state.backoff_until == 2 + 5.0
    assert run.state.recovery_started is None and run.state.restarts == ()
    assert not any(starts(run.step(obs(t, **stopped))) for t in range(3, 7))
    assert starts(run.step(obs(7, **stopped))) and run.state.backoff_step == 1


def test_a_start_that_did_not_run_gives_back_only_its_own_place() -> None:
    mine = RestartRecord(0.0, RestartOrigin.WATCHDOG)
    theirs = RestartRecord(0.5, RestartOrigin.SYSTEMD)
    start = UnitCommand(UnitVerb.START, "tabbyapi.service", Reason(Rule.DOWN, "down"))
    run = Run(state=PolicyState(restarts=(mine, theirs), start_attempts=(0.0,)))
    run.step(obs(1, results=(result(start, ResultStatus.FAILED, "job failed", 0.5),)))
    assert run.state.restarts == (theirs,)


def test_the_process_told_by_systemd_is_told_again_without_it() -> None:
    """The pid and start ticks kept from systemd's MainPID tell the same process (and another
    one) once systemd cannot be asked any more."""
    main = proc(100, ProcessRole.MAIN, listens=(PORT,))
    run = Run()
    run.step(obs(0, processes=(main,)))
    nosd = unit(available=False, enter=None)
    as_listener = dataclasses.replace(main, role=ProcessRole.ORPHAN)
    same = Run(state=run.state)
    same.step(obs(1, unit=nosd, processes=(as_listener,)))
    assert same.state.phase is Phase.HEALTHY  # the same process
    other = dataclasses.replace(as_listener, pid=101, start_ticks=5000)
    run.step(obs(1, unit=nosd, port=ports((PORT, 101)), processes=(other,)))
    assert run.state.phase is Phase.RECOVERING  # restarted as systemd went: a canary first


def test_a_listener_whose_owner_is_unseen_is_no_identity() -> None:
    run = Run()
    nosd = {"unit": unit(available=False, enter=None), "port": ports((PORT, None))}
    run.step(obs(0, processes=(), **nosd))
    assert run.state.tabby_process == "" and run.state.phase is Phase.HEALTHY


def test_a_loop_escalates_at_escalate_after_not_before_nor_while_blind() -> None:
    down = {"health": refused(), "unit": unit("inactive", "dead")}
    young = PolicyState(phase=Phase.BACKOFF, backoff_step=1, backoff_until=1e9, loop_since=0.0)
    run = Run(state=young)
    run.step(obs(119.9, **down))
    assert not run.state.escalated
    run.step(obs(120.0, **down))
    assert run.state.escalated
    blind = Health(HttpResult(Outcome.LOCAL_ERROR, 0.0, None, "EMFILE"), False)
    run = Run(state=young)
    run.step(obs(200, health=blind, unit=unit("inactive", "dead")))
    assert not run.state.escalated


def test_a_restart_behind_an_orphan_cleanup_cites_the_restart() -> None:
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=4.0)
    run = Run()
    prev = run.state
    o = obs(0, health=sticky(), processes=(MAIN, orphan))
    acts = run.step(o)
    assert [a.kind for a in acts] == ["kill_orphan", "unit"]
    change = next(
        e
        for e in narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)
        if e.kind is EventKind.STATE_CHANGED
    )
    assert change.rule is Rule.STICKY_UNHEALTHY and "/health 503 unhealthy" in change.message


def test_a_change_with_nothing_to_cite_cites_nothing() -> None:
    run = Run()
    run.step(obs(0, health=refused(), unit=unit(enter=-1.0)))
    assert run.state.phase is Phase.STARTING and run.state.cause == ""


def test_the_back_off_wait_cites_the_failed_load_not_another_warning() -> None:
    no_nvml = GpuReport(error=NvmlErrorKind.LIBRARY_NOT_FOUND, detail="libnvidia-ml.so.1")
    run = Run()
    load = next(
        a for a in run.step(obs(0, model=model(None), gpus=no_nvml)) if isinstance(a, LoadModel)
    )
    failed = result(load, ResultStatus.FAILED, "CUDA out of memory", 1, ErrorKind.LOAD_ERROR)
    run.step(obs(1, model=model(None), gpus=no_nvml, results=(failed,)))
    assert run.state.phase is Phase.NO_MODEL
    assert run.state.cause.startswith("model load failed 1x: CUDA out of memory")


def test_the_fallback_lost_soon_after_it_loaded_waits_for_the_back_off() -> None:
    """The main model's back-off stands on the fallback; losing the fallback inside it waits,
    with nothing failed to cite."""
    run = Run(state=PolicyState(load_failures=5))  # past max_load_attempts: the fallback
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    assert load.model == "F"
    run.step(obs(1, model=model("F"), results=(result(load, ResultStatus.OK, "loaded", 1),)))
    assert not run.step(obs(2, model=model(None)))
    assert run.state.phase is Phase.NO_MODEL and run.state.cause == ""


def test_a_mended_model_folder_ends_a_permanent_failure() -> None:
    def folder(mtime: float) -> HostReport:
        return host(model=ModelDir("M", "/mnt/models/M", True, True, 3, 21 << 30, mtime=mtime))

    run = Run(cfg=config(model={"fallback": ""}))
    load = next(
        a
        for a in run.step(obs(0, model=model(None), host=folder(100.0)))
        if isinstance(a, LoadModel)
    )
    bad = result(load, ResultStatus.FAILED, "no longer supported", 1, ErrorKind.LOAD_PERMANENT)
    run.step(obs(1, model=model(None), host=folder(100.0), results=(bad,)))
    assert run.state.permanent and not run.step(obs(2, model=model(None), host=folder(100.0)))
    acts = run.step(obs(3, model=model(None), host=folder(200.0)))  # the folder was replaced
    assert run.state.permanent == () and [a.model for a in acts if isinstance(a, LoadModel)]


def test_restarts_seen_late_and_on_time_at_any_uptime() -> None:
    """With a 5 s interval: a gap of 10 s is on time, one of 10.5 s is late (dated to its
    start, and said); a restart seen the instant it happened is dated then."""
    run = Run(cfg=config(watchdog={"interval": 5}))
    run.step(obs(BIG, unit=unit(n=0)))
    run.step(obs(BIG + 10, unit=unit(n=1, enter=BIG + 10)))
    assert [r.at - BIG for r in run.state.restarts] == [10.0]
    assert not [f for f in run.state.findings if f.subject == "late"]
    run.step(obs(BIG + 20.5, unit=unit(n=3, enter=BIG + 19)))
    assert [r.at - BIG for r in run.state.restarts] == [10.0, 10.0, 10.0]
    [late] = [f for f in run.state.findings if f.subject == "late"]
    assert late.message.startswith("2 restart(s) by systemd happened while the watchdog was not")


def test_restarts_seen_late_are_no_loop_and_no_cause_of_the_outage() -> None:
    """Review 1 item 6: the note on restarts seen late named a restart loop before one existed
    ("[restart_loop] healthy -> down"), and the down rule could cite it as the outage's cause.
    It is a tabbyapi_down note that no change of phase rests on."""
    run = Run(cfg=config(tabbyapi={"failures_before_down": 1}))
    run.step(obs(0, unit=unit(n=0)))
    prev = run.state
    o = obs(10, health=refused(), unit=unit(n=1))  # away 10 s; the unit runs, /health refuses
    acts = run.step(o)
    [late] = [f for f in run.state.findings if f.subject == "late"]
    assert late.rule is Rule.DOWN
    assert run.state.phase is Phase.RECOVERING and run.state.cause != late.message  # restarted
    [change] = [
        e
        for e in narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)
        if e.kind is EventKind.STATE_CHANGED
    ]
    assert change.rule is Rule.DOWN and "not looking" not in change.message, change.message


def test_an_orphans_command_line_is_said_by_its_finding_not_by_the_change() -> None:
    """Review 1 item 9: the state change quoted the orphan's command line after the diagnosis
    had; it cites what the orphan holds. The diagnosis (and the kill's own line) keep it."""
    command = "/opt/tabbyapi/venv/bin/python /opt/tabbyapi/main.py --port 5001"
    orphan = proc(300, ProcessRole.ORPHAN, command, gpu_gib=30.0)
    run = Run()
    run.step(obs(0, canary=canary(Outcome.OK)))
    prev = run.state
    o = obs(
        1,
        model=model(None),
        processes=(MAIN, orphan),
        gpus=gpus(free0=2.0, free1=10.0, procs0=((300, 30.0),)),
    )
    acts = run.step(o)
    told = narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)
    [change] = [e for e in told if e.kind is EventKind.STATE_CHANGED]
    assert change.message.endswith(": orphan pid 300 holds 30.0 GiB VRAM"), change.message
    assert [e.kind for e in told if command in e.message] == [EventKind.DIAGNOSIS]


def test_the_units_result_is_told_once_an_outage_unless_it_changes() -> None:
    """Review 1 item 8: a crash, systemd's restart comes up for a moment, the same crash: the
    Result diagnosis went for a cycle and was told again in the same words. Another Result is
    news at once; so is the next outage's (a canary passed), not a /health 200 for a moment."""
    run = Run()
    run.step(obs(0, canary=canary(Outcome.OK)))
    told: list[str] = []

    def step(o: Observation) -> None:
        prev = run.state
        acts = run.step(o)
        events = narrate(prev, run.state, acts, (), o, config=run.cfg, wall=0.0)
        told.extend(e.message for e in events if e.kind is EventKind.DIAGNOSIS)

    def crashed(n: int, result: str = "exit-code") -> UnitStatus:
        return unit("activating", "auto-restart", result=result, n=n)

    step(obs(1, health=refused(), unit=crashed(0)))
    stopped = unit("inactive", "dead", result="exit-code", n=1)  # the same finding, new words
    step(obs(1.5, health=refused(), unit=stopped))
    step(obs(2, health=refused(), unit=unit("activating", "start", n=1, enter=2)))
    step(obs(3, health=refused(), unit=crashed(1)))
    step(obs(4, unit=unit(n=2, enter=4)))  # /health 200 for a moment: no canary passed yet
    assert run.state.phase is not Phase.HEALTHY and run.state.trouble_since is None
    step(obs(5, health=refused(), unit=crashed(2)))
    step(obs(5.5, health=refused(), unit=crashed(2, "signal")))
    said = [m for m in told if "Result=" in m]
    assert said == [
        "tabbyapi.service is activating/auto-restart, Result=exit-code (exit status 1)",
        "tabbyapi.service is activating/auto-restart, Result=signal (killed by a signal)",
    ]
    step(obs(6, unit=unit(n=3, enter=6)))
    step(obs(7, unit=unit(n=3, enter=6), canary=canary(Outcome.OK)))
    well = run.state  # (a name of its own: mypy narrowed run.state.phase above)
    assert well.phase is Phase.HEALTHY and well.down_told == ()
    step(obs(8, health=refused(), unit=crashed(3)))
    assert [m for m in told if "Result=" in m][2:] == said[:1]  # the next outage's


def test_a_queued_job_after_the_watchdogs_restart_holds_it_back_at_any_uptime() -> None:
    run = Run()
    for t in (0.0, 1.0, 2.0):
        acts = run.step(obs(BIG + t, health=timeout()))
    waiting = unit("inactive", "dead", job=7)
    done = ok_results(acts, BIG + 2)
    assert not run.step(obs(BIG + 2 + 9.9, health=refused(), unit=waiting, results=done))
    assert starts(run.step(obs(BIG + 2 + 10.0, health=refused(), unit=waiting)))


def test_the_library_wait_counts_the_cycles_without_a_check() -> None:
    run = Run(cfg=VENV)
    down = {"health": refused(), "unit": unit("failed", "failed", result="exit-code")}
    run.step(obs(0, host=HUNG, **down))
    assert run.state.phase is Phase.DOWN and run.state.phase_since == 0
    run.step(obs(1, host=HUNG, **down))
    run.step(obs(2, host=HUNG, **down))
    [wait] = [f for f in run.state.findings if f.rule is Rule.LIBRARY_CHECK]
    assert "not run yet (2 cycle(s) without it)" in wait.message


def test_the_budget_frees_after_the_window_at_any_uptime() -> None:
    run = Run(state=PolicyState(start_attempts=(BIG, BIG + 1, BIG + 2)))
    down = {"health": refused(), "unit": unit("failed", "failed", result="exit-code")}
    assert not starts(run.step(obs(BIG + 30, **down)))  # three issued within the window
    assert starts(run.step(obs(BIG + 60.5, **down)))  # the first has left it


def test_the_wait_after_the_watchdogs_own_restart_names_it() -> None:
    """Its result and the new process are seen in the same cycle: the watchdog's own words
    stand ("TabbyAPI's restart (a new process)" is for restarts it did not make)."""
    run = Run()
    acts = run.step(obs(0, health=sticky()))
    fresh = invocation(unit(enter=0.5), "inv-2")
    run.step(obs(1, unit=fresh, results=ok_results(acts, 0.5)))
    [wait] = [f for f in run.state.findings if f.rule is Rule.CANARY_PENDING]
    assert "after the watchdog's restart of tabbyapi.service:" in wait.message
    other = Run()
    other.step(obs(0))
    other.step(obs(1, unit=invocation(unit(enter=0.5), "inv-2")))
    [wait] = [f for f in other.state.findings if f.rule is Rule.CANARY_PENDING]
    assert "after TabbyAPI's restart (a new process):" in wait.message


def test_a_dry_runs_power_hold_goes_once_the_limit_is_on_target() -> None:
    run = Run()
    [setter] = run.step(obs(0, gpus=gpus(limit0=575.0)))
    dry = result(setter, ResultStatus.DRY_RUN, "would set gpu0 power limit to 450 W", 0.1)
    run.step(obs(1, gpus=gpus(limit0=575.0), results=(dry,)))
    assert [h.gpu_index for h in run.state.power_held] == [0]
    run.step(obs(2, gpus=gpus(limit0=450.0)))
    assert run.state.power_held == ()


def test_a_main_process_not_seen_by_the_scan_is_no_identity() -> None:
    assert tabby_process(obs(0, processes=())) == ""  # unread: never compared
    assert tabby_process(obs(0)) == "100@1100"
